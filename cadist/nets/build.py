"""Model names as users know them from the reference → modules. A plain dict, no registry."""

from __future__ import annotations

from dataclasses import dataclass

from cadist.config.names import ADAPTIVE_MODELS, ALL_MODELS, HEADS, LEARNED_MODELS, OUTPUT_STRIDES
from cadist.errors import ConfigError
from cadist.models.deeplab import DeepLabHead, DeepLabV3
from cadist.models.resnet import SPECS, ResNet


@dataclass(frozen=True)
class ModelInfo:
    name: str
    backbone: str  # key of resnet.SPECS
    head_channels: int


_INFO = {
    "deeplabv3_resnet101": ModelInfo("deeplabv3_resnet101", "resnet101", 256),
    "deeplabv3_resnet50": ModelInfo("deeplabv3_resnet50", "resnet50", 256),
    "deeplabv3_resnet_tiny": ModelInfo("deeplabv3_resnet_tiny", "resnet_tiny", 64),
    "deeplabv3_batch_ap_resnet101": ModelInfo("deeplabv3_batch_ap_resnet101", "resnet101", 256),
    "deeplabv3_batch_ap_resnet50": ModelInfo("deeplabv3_batch_ap_resnet50", "resnet50", 256),
    "deeplabv3_batch_ap_resnet_tiny": ModelInfo(
        "deeplabv3_batch_ap_resnet_tiny", "resnet_tiny", 64
    ),
    "deeplabv3_ad_resnet101": ModelInfo("deeplabv3_ad_resnet101", "resnet101", 256),
    "deeplabv3_ad_resnet50": ModelInfo("deeplabv3_ad_resnet50", "resnet50", 256),
    "deeplabv3_ad_resnet_tiny": ModelInfo("deeplabv3_ad_resnet_tiny", "resnet_tiny", 64),
}


def model_info(name: str) -> ModelInfo:
    if name not in _INFO:
        raise ConfigError(f"model {name!r} is not known; expected one of {', '.join(ALL_MODELS)}")
    return _INFO[name]


def is_adaptive(name: str) -> bool:
    """Content-adaptive (has a pooling mask): edge-mask or learned-mask models."""
    return name in ADAPTIVE_MODELS or name in LEARNED_MODELS


def is_learned(name: str) -> bool:
    return name in LEARNED_MODELS


def build_model(
    name: str,
    output_stride: int = 16,
    num_classes: int = 19,
    classifier_dilation: int = 1,
    adaptive_mode: str = "os8to16",
    edge_threshold: float = 0.15,
    trimap_width: int = 11,
    mask_variant: str = "reference",
    gumbel_tau: float = 1.0,
    target_low_res: float = 0.3,
    mask_sampling: str = "gumbel",
    network: str = "training",
    head: str = "dense",
):
    """A DeepLabv3 with randomly initialised weights (load weights with `models.weights`).

    Dense models use `output_stride`; edge-mask models (`deeplabv3_batch_ap_*`) use
    `adaptive_mode` (the head runs at the mode's finest stride) and the edge-mask options (§6).
    Learned-mask models (`deeplabv3_ad_*`, OS 8→16) use the Gumbel temperature, the target low-res
    share ρ, the evaluation sampling ("gumbel" as the reference, or "argmax") and `network`:
    "training" (two dense branches, §7.3) or "inference" (the adaptive backbone, §7.5).
    `head`: "dense" (the method's: the DeepLabv3 head on the dense map at the finest grid) or
    "adaptive" (adaptive models only: the head on the element list, `cadist.adaptive.head`)."""
    info = model_info(name)
    if head not in HEADS:
        raise ConfigError(f"model.head {head!r}: expected one of {', '.join(HEADS)}")
    if head == "adaptive" and not is_adaptive(name):
        raise ConfigError(
            f"model.head adaptive needs an adaptive model (deeplabv3_batch_ap_* or "
            f"deeplabv3_ad_*); {name} is dense: use model.head dense"
        )
    if is_learned(name):
        return build_learned(
            info, num_classes, gumbel_tau, target_low_res, mask_sampling, network, head
        )
    if is_adaptive(name):
        return build_adaptive(
            info, num_classes, adaptive_mode, edge_threshold, trimap_width, mask_variant, head
        )
    if output_stride not in OUTPUT_STRIDES:
        raise ConfigError(
            f"output stride {output_stride} for {name}: expected one of "
            f"{', '.join(map(str, OUTPUT_STRIDES))}"
        )
    spec = SPECS[info.backbone]
    backbone = ResNet(spec, output_stride)
    head = DeepLabHead(
        spec.out_channels, num_classes, output_stride, info.head_channels, classifier_dilation
    )
    return DeepLabV3(backbone, head)


def build_learned(
    info: ModelInfo,
    num_classes: int,
    tau: float,
    rho: float,
    sampling: str,
    network: str,
    head_kind: str = "dense",
):
    from cadist.adaptive.learned import LearnedDeepLabV3, LearnedResNet, MaskEstimator
    from cadist.adaptive.model import AdaptiveDeepLabV3
    from cadist.adaptive.resnet import AdaptiveResNet

    spec = SPECS[info.backbone]
    head = DeepLabHead(spec.out_channels, num_classes, 8, info.head_channels)
    if network == "training":
        return LearnedDeepLabV3(LearnedResNet(spec, tau, sampling), head, rho, head_kind)
    if network != "inference":
        raise ConfigError(f"network {network!r} for {info.name}: expected training or inference")
    backbone = AdaptiveResNet(spec, "os8to16")
    backbone.mask_estimator = MaskEstimator(spec.layer2_channels)
    backbone.tau, backbone.sampling = tau, sampling
    return AdaptiveDeepLabV3(backbone, _head(head, head_kind), None)


def _head(head: DeepLabHead, kind: str):
    """The dense head as is, or the adaptive head with its parameters."""
    if kind == "dense":
        return head
    from cadist.adaptive.head import AdaptiveDeepLabHead

    return AdaptiveDeepLabHead.from_dense(head)


def build_adaptive(
    info: ModelInfo,
    num_classes: int,
    mode: str,
    threshold: float,
    trimap: int,
    variant: str,
    head_kind: str = "dense",
):
    from cadist.adaptive.masks import EdgeMask
    from cadist.adaptive.model import AdaptiveDeepLabV3
    from cadist.adaptive.resnet import MODES, AdaptiveResNet

    if mode not in MODES:
        raise ConfigError(
            f"adaptive mode {mode!r} for {info.name}: expected one of {', '.join(MODES)}"
        )
    spec = SPECS[info.backbone]
    backbone = AdaptiveResNet(spec, mode)
    finest = backbone.finest_stride
    head = DeepLabHead(spec.out_channels, num_classes, finest, info.head_channels)
    low = 2 if mode == "os8to32" else 1
    edge = EdgeMask(
        threshold,
        trimap,
        variant,
        stride=finest,
        low=low,
        block=(4 if variant == "reference" and finest == 8 else 2),
    )
    return AdaptiveDeepLabV3(backbone, _head(head, head_kind), edge)
