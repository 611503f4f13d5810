"""DeepLabv3 with a content-adaptive backbone (method.md §4): mask from the input (edge mask, §6)
or from the backbone's features (learned mask, §7.5), adaptive ResNet, the ordinary head on the
dense map at the finest grid."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cadist.adaptive.head import AdaptiveDeepLabHead, upsample_levels
from cadist.adaptive.masks import EdgeMask
from cadist.adaptive.resnet import AdaptiveResNet
from cadist.models.deeplab import DeepLabHead


class AdaptiveDeepLabV3(nn.Module):
    """(B, 3, H, W) → (B, C, H, W) logits; `mask` overrides the generator (B, H/os, W/os).

    `classifier`: the dense head (on the dense map at the finest grid, the method's model) or an
    `AdaptiveDeepLabHead` (on the backbone's element list, each element at its own level).
    After each forward `last_mask` holds the pooling mask used (for logging and MAC counts)."""

    def __init__(
        self,
        backbone: AdaptiveResNet,
        classifier: DeepLabHead | AdaptiveDeepLabHead,
        mask_fn: EdgeMask | None,
    ):
        super().__init__()
        self.backbone = backbone
        self.classifier = classifier
        self.mask_fn = mask_fn
        self.last_mask: torch.Tensor | None = None

    def make_mask(self, x: torch.Tensor) -> torch.Tensor:
        """The pooling mask for images x; learned masks need the backbone's layer2 features."""
        if self.mask_fn is None:
            return self.backbone.learned_mask(self.backbone.dense_part(x))
        return self.mask_fn(x)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        given = mask is not None
        if mask is None and self.mask_fn is not None:
            mask = self.mask_fn(x)
        if isinstance(self.classifier, AdaptiveDeepLabHead):
            f, layout = self.backbone(x, mask, check_mask=given, as_list=True)
            self.last_mask = self.backbone.last_mask
            k = self.backbone.num_steps
            return upsample_levels(self.classifier(f, layout, k), layout, k, x.shape[-2:])
        feats = self.backbone(x, mask, check_mask=given)  # mask None: the learned estimator
        self.last_mask = self.backbone.last_mask
        logits = self.classifier(feats)
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


def mask_from_file(model: AdaptiveDeepLabV3, path, height: int, width: int) -> torch.Tensor:
    """`masks.load_mask_file` for `model` and an H×W input: its finest stride, its low level and
    its adaptive steps."""
    from cadist.adaptive.masks import load_mask_file

    bb = model.backbone
    return load_mask_file(path, height, width, bb.finest_stride,
                          2 if bb.mode == "os8to32" else 1, bb.num_steps)  # fmt: skip
