"""Model names as users know them from the reference → modules. A plain dict, no registry."""

from __future__ import annotations

from dataclasses import dataclass

from cadist.errors import ConfigError
from cadist.models.deeplab import DeepLabHead, DeepLabV3
from cadist.models.names import DENSE_MODELS, OUTPUT_STRIDES
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
}


def model_info(name: str) -> ModelInfo:
    if name not in _INFO:
        raise ConfigError(f"model {name!r} is not known; expected one of {', '.join(DENSE_MODELS)}")
    return _INFO[name]


def build_model(
    name: str, output_stride: int = 16, num_classes: int = 19, classifier_dilation: int = 1
) -> DeepLabV3:
    """A dense DeepLabv3 with randomly initialised weights (load weights with `models.weights`)."""
    info = model_info(name)
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
