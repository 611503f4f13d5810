"""Test-time augmentation (mmsegmentation's "aug test"): every image is also run resized by a few
factors and, optionally, mirrored; the class probabilities of all passes are averaged at the
image's own resolution. Not the paper's protocol (method.md §9: single scale, no flip), which is
`scales=(1.0,), flip=False` and gives exactly the plain prediction."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cadist.errors import ConfigError


@dataclass(frozen=True)
class Pass:
    """One forward of the augmentation: the input size it runs at and whether it is mirrored."""

    height: int
    width: int
    flip: bool


@dataclass(frozen=True)
class Augmentation:
    """Test-time scales (factors of the image's sides) and whether each is also run mirrored."""

    scales: tuple[float, ...] = (1.0,)
    flip: bool = False

    @classmethod
    def parse(cls, scales: str, flip: bool) -> Augmentation:
        """From a comma list like "0.75,1,1.25" (`--scales`), with one clear error."""
        try:
            values = tuple(float(v) for v in scales.split(",") if v.strip())
        except ValueError:
            values = ()
        if not values or not all(v > 0 and math.isfinite(v) for v in values):
            raise ConfigError(
                f"--scales {scales!r}: expected factors > 0 separated by commas, e.g. 0.75,1,1.25"
            )
        return cls(values, flip)

    @property
    def plain(self) -> bool:
        """The paper's single-scale protocol: one unmirrored pass at the image's size."""
        return self.scales == (1.0,) and not self.flip


def size_multiple(model: nn.Module) -> int:
    """The multiple a model's input sides must be: 32 for every model (OS32 grids, and the
    reference edge mask's 4×4 blocks of 8-pixel cells), more for adaptive modes whose coarsest
    level or mask blocks span more pixels."""
    m = 32
    backbone = getattr(model, "backbone", None)
    if hasattr(backbone, "finest_stride") and hasattr(backbone, "num_steps"):
        m = math.lcm(m, backbone.finest_stride * 2**backbone.num_steps)
    edge = getattr(model, "mask_fn", None)
    if edge is not None and hasattr(edge, "block_cells"):
        m = math.lcm(m, edge.stride * edge.block_cells)
    return m


def plan_passes(
    height: int, width: int, scales: Sequence[float], flip: bool, multiple: int
) -> list[Pass]:
    """The passes for an H×W image: each scale's size rounded to the nearest `multiple` (at least
    one multiple), each also mirrored with `flip`. Scale 1 of an H×W that is a multiple already
    runs at H×W itself."""
    if not scales:
        raise ValueError("test-time augmentation needs at least one scale, e.g. 1.0")
    passes = []
    for s in scales:
        if not s > 0:
            raise ValueError(f"test-time scale {s}: expected a factor > 0, e.g. 0.75, 1.0, 1.25")
        h = max(multiple, round(height * s / multiple) * multiple)
        w = max(multiple, round(width * s / multiple) * multiple)
        passes += [Pass(h, w, False)] + ([Pass(h, w, True)] if flip else [])
    return passes


@torch.no_grad()
def predict_augmented(
    model: nn.Module, x: torch.Tensor, passes: Sequence[Pass]
) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """Images x (B, 3, H, W) → mean class probabilities (B, C, H, W) in fp32 over `passes`, and
    each pass's pooling mask (B, h/8, w/8) as the model used it (adaptive models; None for
    dense ones; a mirrored pass's mask is of the mirrored image).

    A pass resizes x bilinearly (align_corners=False, as the network's own upsampling), mirrors
    it if asked, runs the model, mirrors the logits back and resizes them to H×W before the
    softmax; an adaptive model builds its mask from the resized image, as it would for an image
    of that size."""
    h, w = x.shape[-2:]
    probs, masks = None, []
    for p in passes:
        xs = x if (p.height, p.width) == (h, w) else _resize(x, p.height, p.width)
        logits = model(xs.flip(-1) if p.flip else xs)
        mask = getattr(model, "last_mask", None)
        masks.append(mask)
        logits = logits.flip(-1) if p.flip else logits
        if logits.shape[-2:] != (h, w):
            logits = F.interpolate(
                logits.float(), size=(h, w), mode="bilinear", align_corners=False
            )
        prob = logits.float().softmax(1)
        probs = prob if probs is None else probs.add_(prob)
    return probs.div_(len(passes)), masks


def high_res_fraction(mask: torch.Tensor) -> torch.Tensor:
    """Per-image share of cells a pooling mask (B, h, w) keeps at the finest resolution, (B,)."""
    return (mask == 0).float().mean(dim=(1, 2))


def _resize(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    dtype = x.dtype
    y = F.interpolate(x.float(), size=(h, w), mode="bilinear", align_corners=False)
    return y.to(dtype)
