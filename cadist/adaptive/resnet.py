"""Adaptive ResNet stages (method.md §3.9, §4): the dense stem and early stages, then stages that
run on element lists, each performing one adaptive downsampling step, then back to a dense map.

Modes (§4.1, §4.2):
* "os8to16": layer2 output (OS8) is the finest grid; layer3 and layer4 adaptive; mask ∈ {0, 1}.
* "os8to32": same stages; mask ∈ {0, 2}.
* "os16to32": layer3 dense with its stride (OS16 finest grid); only layer4 adaptive; mask ∈ {0, 1}.
Parameter names and shapes equal the dense ResNet's, so dense weights load unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from cadist.adaptive.layout import MixedLayout
from cadist.adaptive.ops import IrregularConv3x3, ListBatchNorm, ListReLU, PointwiseConv, take_rows
from cadist.models.resnet import BACKBONE_BN_MOMENTUM, Bottleneck, ResNet, ResNetSpec

#: mode → (dense output stride of the finest grid, names of the adaptive stages)
MODES = {
    "os8to16": (8, ("layer3", "layer4")),
    "os8to32": (8, ("layer3", "layer4")),
    "os16to32": (16, ("layer4",)),
}


def _bn(c: int) -> ListBatchNorm:
    # momentum 0.01 like every backbone BN (the reference keeps 0.1 for its 1-D BNs, §3.6 quirk)
    return ListBatchNorm(c, momentum=BACKBONE_BN_MOMENTUM)


class BlockTables:
    """Which index table a block reads: blocks carry `t` (tap spacing) and `step` (the adaptive
    step the block performs, or None)."""

    t: int
    step: int | None

    def needs(self, k_in: int) -> tuple[int, int, bool]:
        """The (k, t, strided) table this block reads (see `MixedLayout.prepare`)."""
        return (self.step, self.t, True) if self.step is not None else (k_in, self.t, False)

    def tables(self, layout: MixedLayout, k_in: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The 3×3 index table and, for a block that performs a step, the kept rows (else None).
        The strided conv is evaluated only where its output is kept."""
        if self.step is None:
            return layout.table(k_in, self.t), None
        keep = None if layout.is_identity(self.step) else layout.selection(self.step)
        return layout.step_table(self.step, self.t), keep


class AdaptiveBottleneck(BlockTables, nn.Module):
    """Bottleneck on an element list; `step` = k for a stage's first block (performs step k)."""

    def __init__(self, inplanes: int, planes: int, t: int, step: int | None):
        super().__init__()
        out = planes * Bottleneck.expansion
        self.t, self.step = t, step
        self.conv1 = PointwiseConv(inplanes, planes)
        self.bn1 = _bn(planes)
        self.conv2 = IrregularConv3x3(planes, planes, strided=step is not None)
        self.bn2 = _bn(planes)
        self.conv3 = PointwiseConv(planes, out)
        self.bn3 = _bn(out)
        self.relu = ListReLU(inplace=True)
        self.downsample = (
            nn.Sequential(PointwiseConv(inplanes, out), _bn(out))
            if step is not None or inplanes != out
            else None
        )

    def forward(self, x: torch.Tensor, layout: MixedLayout, k_in: int) -> torch.Tensor:
        """x: (N_{k_in}, C) → (N_k, 4·planes) with k = step (first block) or k_in."""
        idx, keep = self.tables(layout, k_in)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out, idx)))
        out = self.bn3(self.conv3(out))
        identity = x
        if self.downsample is not None:
            identity = self.downsample(take_rows(x, keep) if keep is not None else x)
        return self.relu(out + identity)


class AdaptiveStage(nn.ModuleList):
    """Adaptive stage number k (1-based): first block t = 2^(k−1) and step k, others t = 2^k.
    A ModuleList, so parameter names are layerK.i.* as in the dense ResNet."""

    def __init__(self, inplanes: int, planes: int, blocks: int, k: int):
        layers = [AdaptiveBottleneck(inplanes, planes, 1 << (k - 1), k)]
        layers += [AdaptiveBottleneck(planes * 4, planes, 1 << k, None) for _ in range(1, blocks)]
        super().__init__(layers)
        self.k = k

    def k_in(self, i: int) -> int:
        """Adaptive steps applied before block i."""
        return self.k - 1 if i == 0 else self.k

    def needs(self) -> list[tuple[int, int, bool]]:
        return sorted({blk.needs(self.k_in(i)) for i, blk in enumerate(self)})

    def forward(self, x: torch.Tensor, layout: MixedLayout) -> torch.Tensor:
        for i, blk in enumerate(self):
            x = blk(x, layout, self.k_in(i))
        return x


class AdaptiveResNet(nn.Module):
    """(B, 3, H, W) image + (B, H0, W0) pooling mask → (B, C, H0, W0) dense map at the finest grid."""

    def __init__(self, spec: ResNetSpec, mode: str = "os8to16"):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"adaptive mode {mode!r}: expected one of {', '.join(MODES)}")
        finest, adaptive = MODES[mode]
        self.mode, self.spec, self.finest_stride = mode, spec, finest
        self.num_steps = len(adaptive)
        dense = ResNet(spec, finest)
        self.conv1, self.bn1, self.relu, self.maxpool = (
            dense.conv1,
            dense.bn1,
            dense.relu,
            dense.maxpool,
        )
        self.layer1, self.layer2 = dense.layer1, dense.layer2
        w = spec.width
        if mode == "os16to32":
            self.layer3 = dense.layer3
            self.layer4 = AdaptiveStage(w * 16, w * 8, spec.blocks[3], 1)
        else:
            self.layer3 = AdaptiveStage(w * 8, w * 4, spec.blocks[2], 1)
            self.layer4 = AdaptiveStage(w * 16, w * 8, spec.blocks[3], 2)
        self.adaptive = adaptive
        # learned mode (§7.5): set by cadist.nets.build; None for masks given from outside
        self.mask_estimator: nn.Module | None = None
        self.tau, self.sampling = 1.0, "gumbel"

    def dense_part(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer2(self.layer1(x))
        return self.layer3(x) if self.mode == "os16to32" else x

    def layout(self, mask: torch.Tensor, device: torch.device, check: bool = True) -> MixedLayout:
        """The batch's layout with every table the adaptive stages read already built."""
        mask = mask.to("cpu" if device.type == "meta" else device)
        layout = MixedLayout(mask, self.num_steps, check=check)
        layout.prepare([n for name in self.adaptive for n in getattr(self, name).needs()])
        return layout

    def learned_mask(self, feats: torch.Tensor) -> torch.Tensor:
        """Learned mode (§7.5): the pooling mask sampled from the mask estimator on layer2's output
        (the estimator, `tau` and `sampling` are set by `cadist.nets.build`)."""
        from cadist.adaptive.learned import pooling_mask, sample_mask

        if feats.is_meta:
            self.mask_estimator(feats)  # counted by MAC hooks; shapes only
            b, _, h, w = feats.shape
            return torch.zeros(b, h, w, dtype=torch.long)
        return pooling_mask(sample_mask(self.mask_estimator(feats), self.tau, self.sampling))

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        check_mask: bool = True,
        as_list: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, MixedLayout]:
        """`mask` (B, H0, W0); None: from the learned mask estimator. `check_mask=False` skips
        validating it (for masks made by cadist's generators). After the call `last_mask` holds
        the mask used. `as_list`: return the element list and its layout (for the adaptive head)
        instead of the dense map at the finest grid."""
        if mask is None:
            if getattr(self, "mask_estimator", None) is None:
                raise ValueError("this adaptive backbone has no mask estimator: pass a mask")
            feats = self.dense_part(x)
            mask = self.learned_mask(feats)
            layout = self.layout(mask, x.device, check=False)
        else:
            # tables first: their host syncs then wait on nothing, the stages enqueue sync-free
            layout = self.layout(mask, x.device, check_mask)
            feats = self.dense_part(x)
        self.last_mask = mask
        f = MixedLayout.from_dense(feats)
        for name in self.adaptive:
            f = getattr(self, name)(f, layout)
        self.last_layout = layout
        return (f, layout) if as_list else layout.to_dense(f, self.num_steps)
