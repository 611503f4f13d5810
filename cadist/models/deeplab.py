"""DeepLabv3 head and model (method.md §2.2), with the reference's parameter names (§2.3).

`model.backbone.*` are torchvision ResNet names; the head lives at `model.classifier.classifier.*`
(torchvision's DeepLabv3 has one nesting level less).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: ASPP atrous rates per output stride the head runs at.
ASPP_RATES = {32: (3, 6, 9), 16: (6, 12, 18), 8: (12, 24, 36), 4: (24, 48, 72)}


def _conv_bn_relu(cin: int, cout: int, k: int = 1, dilation: int = 1) -> list[nn.Module]:
    pad = dilation if k == 3 else 0
    return [
        nn.Conv2d(cin, cout, k, padding=pad, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    ]


class ASPPPooling(nn.Sequential):
    """Image pooling branch: global mean → 1×1 conv + BN + ReLU → broadcast back to (H, W)."""

    def __init__(self, cin: int, cout: int):
        super().__init__(nn.AdaptiveAvgPool2d(1), *_conv_bn_relu(cin, cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        return F.interpolate(super().forward(x), size=size, mode="bilinear", align_corners=False)


class ASPP(nn.Module):
    """Five parallel branches of `ch` channels, concatenated and projected: (B, cin, H, W) → (B, ch, H, W)."""

    def __init__(self, cin: int, rates: tuple[int, int, int], ch: int = 256):
        super().__init__()
        self.convs = nn.ModuleList(
            [nn.Sequential(*_conv_bn_relu(cin, ch))]
            + [nn.Sequential(*_conv_bn_relu(cin, ch, 3, r)) for r in rates]
            + [ASPPPooling(cin, ch)]
        )
        self.project = nn.Sequential(*_conv_bn_relu(5 * ch, ch), nn.Dropout(0.1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(torch.cat([c(x) for c in self.convs], dim=1))


class DeepLabHead(nn.Module):
    """ASPP → 3×3 conv (classifier dilation) + BN + ReLU → 1×1 conv with bias to classes."""

    def __init__(
        self,
        cin: int,
        num_classes: int,
        output_stride: int,
        ch: int = 256,
        classifier_dilation: int = 1,
    ):
        super().__init__()
        self.classifier = nn.Sequential(
            ASPP(cin, ASPP_RATES[output_stride], ch),
            *_conv_bn_relu(ch, ch, 3, classifier_dilation),
            nn.Conv2d(ch, num_classes, 1),
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)  # fan-in, ReLU gain
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(x)


class DeepLabV3(nn.Module):
    """(B, 3, H, W) normalised image → (B, num_classes, H, W) logits at input resolution."""

    def __init__(self, backbone: nn.Module, classifier: DeepLabHead):
        super().__init__()
        self.backbone = backbone
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.classifier(self.backbone(x))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
