"""Model names (no torch import, so the CLI can list them instantly)."""

from typing import Literal, get_args

DenseModelName = Literal["deeplabv3_resnet101", "deeplabv3_resnet50", "deeplabv3_resnet_tiny"]
DENSE_MODELS: tuple[str, ...] = get_args(DenseModelName)
OUTPUT_STRIDES = (8, 16)
