"""Model names as users know them from the reference → modules. A plain dict, no registry."""

from __future__ import annotations

from dataclasses import dataclass

from cadist.errors import ConfigError
from cadist.models.deeplab import DeepLabHead, DeepLabV3
from cadist.models.names import ADAPTIVE_MODELS, ALL_MODELS, OUTPUT_STRIDES
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
}


def model_info(name: str) -> ModelInfo:
    if name not in _INFO:
        raise ConfigError(f"model {name!r} is not known; expected one of {', '.join(ALL_MODELS)}")
    return _INFO[name]


def is_adaptive(name: str) -> bool:
    return name in ADAPTIVE_MODELS


def build_model(
    name: str,
    output_stride: int = 16,
    num_classes: int = 19,
    classifier_dilation: int = 1,
    adaptive_mode: str = "os8to16",
    edge_threshold: float = 0.15,
    trimap_width: int = 11,
    mask_variant: str = "reference",
):
    """A DeepLabv3 with randomly initialised weights (load weights with `models.weights`).

    Dense models use `output_stride`; adaptive ones (`deeplabv3_batch_ap_*`) use `adaptive_mode`
    (the head runs at the mode's finest stride) and the edge-mask options (§6)."""
    info = model_info(name)
    if is_adaptive(name):
        return build_adaptive(
            info, num_classes, adaptive_mode, edge_threshold, trimap_width, mask_variant
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


def build_adaptive(
    info: ModelInfo, num_classes: int, mode: str, threshold: float, trimap: int, variant: str
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
    return AdaptiveDeepLabV3(backbone, head, edge)
