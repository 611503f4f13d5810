"""Model names (no torch import, so the CLI can list them instantly)."""

from typing import Literal, get_args

DenseModelName = Literal["deeplabv3_resnet101", "deeplabv3_resnet50", "deeplabv3_resnet_tiny"]
DENSE_MODELS: tuple[str, ...] = get_args(DenseModelName)
OUTPUT_STRIDES = (8, 16)

AdaptiveModelName = Literal[
    "deeplabv3_batch_ap_resnet101", "deeplabv3_batch_ap_resnet50", "deeplabv3_batch_ap_resnet_tiny"
]
ADAPTIVE_MODELS: tuple[str, ...] = get_args(AdaptiveModelName)
#: learned-mask models (§7); the name is the reference's ("ad" = adaptive downsampling)
LearnedModelName = Literal[
    "deeplabv3_ad_resnet101", "deeplabv3_ad_resnet50", "deeplabv3_ad_resnet_tiny"
]
LEARNED_MODELS: tuple[str, ...] = get_args(LearnedModelName)
ModelName = Literal[DenseModelName, AdaptiveModelName, LearnedModelName]
ALL_MODELS = DENSE_MODELS + ADAPTIVE_MODELS + LEARNED_MODELS
AdaptiveMode = Literal["os8to16", "os8to32", "os16to32"]
#: where the DeepLabv3 head runs: on the dense map at the finest grid (the method's) or, for adaptive
#: models, on the element list at each element's own level (cadist.adaptive.head)
HeadKind = Literal["dense", "adaptive"]
HEADS: tuple[str, ...] = get_args(HeadKind)
