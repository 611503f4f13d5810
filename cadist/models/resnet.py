"""Dilated ResNet backbones with torchvision's parameter names (method.md §2.1).

"v1.5" bottlenecks: the stride sits on the 3×3 convolution, the projection shortcut is a strided
1×1 convolution + BN. Replacing a stage's stride by dilation follows torchvision: the stage's first
block runs with stride 1 and the dilation accumulated before the stage, the others with the doubled
dilation. There is no `fc`/`avgpool`: this is a feature extractor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

#: BatchNorm momentum of every 2-D BN of the backbone (PyTorch convention; §2.1).
BACKBONE_BN_MOMENTUM = 0.01


@dataclass(frozen=True)
class ResNetSpec:
    """Blocks per stage and the width of the first stage (64 for the ImageNet ResNets)."""

    blocks: tuple[int, int, int, int]
    width: int = 64

    @property
    def out_channels(self) -> int:
        return self.width * 8 * Bottleneck.expansion

    @property
    def layer2_channels(self) -> int:
        return self.width * 2 * Bottleneck.expansion


SPECS = {
    "resnet101": ResNetSpec((3, 4, 23, 3)),
    "resnet50": ResNetSpec((3, 4, 6, 3)),
    # small bottleneck ResNet for tests, CPU demos and quick jobs (no ImageNet weights exist)
    "resnet_tiny": ResNetSpec((1, 1, 1, 1), width=16),
}

#: which stages have their stride replaced by dilation, per output stride (layer2, layer3, layer4)
DILATE = {
    32: (False, False, False),
    16: (False, False, True),
    8: (False, True, True),
    4: (True, True, True),
}


def _bn(ch: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(ch, momentum=BACKBONE_BN_MOMENTUM)


class Bottleneck(nn.Module):
    """1×1 → 3×3 (stride, dilation) → 1×1 with a residual; (B, Cin, H, W) → (B, 4w, H/s, W/s)."""

    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        dilation: int = 1,
        downsample: nn.Module | None = None,
    ):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = _bn(planes)
        self.conv2 = nn.Conv2d(
            planes, planes, 3, stride=stride, padding=dilation, dilation=dilation, bias=False
        )
        self.bn2 = _bn(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = _bn(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """Backbone: (B, 3, H, W) → (B, 8·4·width, H/os, W/os)."""

    def __init__(self, spec: ResNetSpec, output_stride: int = 16):
        super().__init__()
        if output_stride not in DILATE:
            raise ValueError(f"output_stride {output_stride}: expected one of {sorted(DILATE)}")
        self.spec, self.output_stride = spec, output_stride
        w = spec.width
        self.inplanes, self.dilation = w, 1
        self.conv1 = nn.Conv2d(3, w, 7, stride=2, padding=3, bias=False)
        self.bn1 = _bn(w)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        dil = DILATE[output_stride]
        self.layer1 = self._make_layer(w, spec.blocks[0])
        self.layer2 = self._make_layer(w * 2, spec.blocks[1], stride=2, dilate=dil[0])
        self.layer3 = self._make_layer(w * 4, spec.blocks[2], stride=2, dilate=dil[1])
        self.layer4 = self._make_layer(w * 8, spec.blocks[3], stride=2, dilate=dil[2])
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _make_layer(
        self, planes: int, blocks: int, stride: int = 1, dilate: bool = False
    ) -> nn.Sequential:
        previous = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        downsample = None
        if stride != 1 or self.inplanes != planes * Bottleneck.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(
                    self.inplanes, planes * Bottleneck.expansion, 1, stride=stride, bias=False
                ),
                _bn(planes * Bottleneck.expansion),
            )
        layers = [Bottleneck(self.inplanes, planes, stride, previous, downsample)]
        self.inplanes = planes * Bottleneck.expansion
        layers += [
            Bottleneck(self.inplanes, planes, dilation=self.dilation) for _ in range(1, blocks)
        ]
        return nn.Sequential(*layers)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.layer1(self.stem(x)))
        return self.layer4(self.layer3(x))
