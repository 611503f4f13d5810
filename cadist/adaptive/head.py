"""The adaptive DeepLabv3 head (beyond the paper): ASPP, projection and classifier run on the element
list the adaptive backbone ends with, each element at its own level, then one upsampling to the
input size per level. Parameter names and shapes are the dense head's (`models.deeplab`), so a
dense checkpoint of the finest output stride loads unchanged.

The rule (docs/method.md, "The adaptive head"): on a region whose cells are all at level ℓ the head
is the dense head at output stride s·2^ℓ (s: the finest grid's stride).
* ASPP 3×3 branch of rate r (the finest stride's rates, 12/24/36 at OS8): tap spacing r finest cells
  for every element — on a level-ℓ element's own grid dilation r/2^ℓ, i.e. 6/12/18 at OS16, the
  OS16 head's rates. A tap reads the element covering the tap cell (§3.4), across levels too.
* classifier 3×3 (dilation d = 1 at every stride): spacing d·2^ℓ, one step on the element's grid.
* image pooling: the mean over the image's area, an element of level ℓ counted 4^ℓ times (its box).
* upsampling: per level ℓ present, the level canvas of §3.8 (each level-ℓ box takes the element at
  its anchor cell) resized bilinearly to the input size; a pixel takes the canvas of its cell's
  level. With every cell at level 0 this is the dense head at the finest stride; all at level 1,
  the dense head one stride coarser.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cadist.adaptive.layout import MixedLayout
from cadist.adaptive.ops import IrregularConv3x3, ListBatchNorm, ListReLU, PointwiseConv, take_rows
from cadist.models.deeplab import DeepLabHead


class AreaMean(nn.Module):
    """Image pooling on an element list: each image's mean over its whole area, an element of level
    ℓ weighted by its box (4^ℓ cells): (N_k, C) → (B, C). Counted like a pooling layer (§10.1):
    its input values."""

    def forward(self, x: torch.Tensor, layout: MixedLayout, k: int) -> torch.Tensor:
        bsz, h, w = layout.shape
        if x.is_meta:
            return x.new_empty(bsz, x.shape[1])
        e = layout.elements(k)
        weight = torch.pow(4, e.level).to(x.dtype) / (h * w)
        return x.new_zeros(bsz, x.shape[1]).index_add_(0, e.b, x * weight[:, None])

    def count_macs(self, inp, out):
        m = float(inp.numel())
        return "pool", m, m


class AdaptiveASPP(nn.Module):
    """ASPP on an element list, with the dense ASPP's module tree (`convs.i.*`, `project.*`)."""

    def __init__(self, cin: int, rates: tuple[int, int, int], ch: int = 256):
        super().__init__()
        self.rates = rates
        self.convs = nn.ModuleList(
            [nn.Sequential(PointwiseConv(cin, ch), ListBatchNorm(ch), ListReLU())]
            + [
                nn.Sequential(IrregularConv3x3(cin, ch), ListBatchNorm(ch), ListReLU())
                for _ in rates
            ]
            + [nn.Sequential(AreaMean(), PointwiseConv(cin, ch), ListBatchNorm(ch), ListReLU())]
        )
        self.project = nn.Sequential(
            PointwiseConv(5 * ch, ch), ListBatchNorm(ch), ListReLU(), nn.Dropout(0.1)
        )

    def forward(self, x: torch.Tensor, layout: MixedLayout, k: int) -> torch.Tensor:
        outs = [self.convs[0](x)]
        for rate, (conv, bn, relu) in zip(self.rates, self.convs[1:4], strict=True):
            outs.append(relu(bn(conv(x, layout.table(k, rate)))))
        pool, conv, bn, relu = self.convs[4]
        pooled = relu(bn(conv(pool(x, layout, k))))  # (B, ch): one value per image
        outs.append(take_rows(pooled, layout.elements(k).b))  # broadcast to the image's elements
        return self.project(torch.cat(outs, dim=1))


class AdaptiveDeepLabHead(nn.Module):
    """The DeepLabv3 head on the element list after k adaptive steps: (N_k, Cin) → (N_k, classes).
    Module tree and parameters as `DeepLabHead` (`classifier.0` ASPP, `.1`–`.3` the 3×3 conv, BN,
    ReLU, `.4` the 1×1 conv with bias to the classes)."""

    def __init__(self, cin: int, num_classes: int, rates: tuple[int, int, int], ch: int = 256,
                 classifier_dilation: int = 1):  # fmt: skip
        super().__init__()
        self.dilation = classifier_dilation
        self.classifier = nn.Sequential(
            AdaptiveASPP(cin, rates, ch),
            IrregularConv3x3(ch, ch),
            ListBatchNorm(ch),
            ListReLU(),
            PointwiseConv(ch, num_classes, bias=True),
        )

    @classmethod
    def from_dense(cls, head: DeepLabHead) -> AdaptiveDeepLabHead:
        """The adaptive head with `head`'s configuration and (a copy of) its parameters."""
        aspp, conv3 = head.classifier[0], head.classifier[1]
        rates = tuple(branch[0].dilation[0] for branch in aspp.convs[1:4])
        cin, ch = aspp.convs[0][0].in_channels, conv3.out_channels
        out = cls(cin, head.classifier[4].out_channels, rates, ch, conv3.dilation[0])
        out.load_state_dict(head.state_dict())
        return out.to(head.classifier[4].weight.device)

    def forward(self, x: torch.Tensor, layout: MixedLayout, k: int) -> torch.Tensor:
        aspp, conv, bn, relu, last = self.classifier
        x = aspp(x, layout, k)
        x = relu(bn(conv(x, layout.table(k, self.dilation, per_level=True))))
        return last(x)


def upsample_levels(
    logits: torch.Tensor, layout: MixedLayout, k: int, size: tuple[int, int]
) -> torch.Tensor:
    """(N_k, C) element logits → (B, C, *size): each level's canvas (§3.8) resized bilinearly
    (align_corners False, as the dense model), each pixel from the canvas of its cell's level."""
    bsz, h, w = layout.shape
    c = logits.shape[1]
    if logits.is_meta:
        return logits.new_empty(bsz, c, *size)
    e = layout.elements(k)
    levels = [lvl for lvl in range(k + 1) if bool((e.level == lvl).any())]
    cell_level = layout.mask.clamp(max=k)
    out = None
    for lvl in levels:
        step, off = 1 << lvl, (1 << lvl) // 2
        anchors = e.lookup[:, off::step, off::step]  # (B, h/2^ℓ, w/2^ℓ)
        canvas = logits.index_select(0, anchors.reshape(-1))
        canvas = canvas.view(bsz, h >> lvl, w >> lvl, c).permute(0, 3, 1, 2)
        up = F.interpolate(canvas, size=size, mode="bilinear", align_corners=False)
        if len(levels) == 1:
            return up
        where = (cell_level == lvl).unsqueeze(1).to(up.dtype)
        up = up * F.interpolate(where, size=size, mode="nearest")
        out = up if out is None else out + up
    return out


def dense_head_at(head: DeepLabHead, x: torch.Tensor, scale: int) -> torch.Tensor:
    """`head` (configured for the finest stride) on a dense map `scale`× coarser: ASPP rates
    divided by `scale` (the same spatial offsets), the classifier's dilation kept — what the
    adaptive head computes on a region whose cells are all that much coarser. (B, Cin, h, w) →
    (B, classes, h, w). The learned model's training network uses it for its OS16 branch."""
    aspp, conv, bn, relu, last = head.classifier
    outs = []
    for i, branch in enumerate(aspp.convs):
        if 1 <= i <= 3:
            c, b, r = branch
            d = c.dilation[0] // scale
            outs.append(r(b(F.conv2d(x, c.weight, None, padding=d, dilation=d))))
        else:
            outs.append(branch(x))
    return last(relu(bn(conv(aspp.project(torch.cat(outs, dim=1))))))
