"""Pooling masks from image content (method.md §6): the edge mask, as the reference computes it and
a corrected variant. Input: the normalised network input (B, 3, H, W); output: (B, H/os, W/os)
int64 pooling mask (0 = keep the finest resolution, `low` = downsample).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

_GREY = (0.299, 0.587, 0.114)


def grey(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) normalised RGB → (B, 1, H, W) luma of the normalised channels (§6.1)."""
    w = torch.tensor(_GREY, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def gradients(g: torch.Tensor, padding: Literal["zeros", "replicate"] = "zeros"):
    """Central differences gx = g(x+1) − g(x−1), gy = g(y+1) − g(y−1) (§6.2)."""
    if padding == "zeros":
        p = F.pad(g, (1, 1, 1, 1))
    else:
        p = F.pad(g, (1, 1, 1, 1), mode="replicate")
    gx = p[:, :, 1:-1, 2:] - p[:, :, 1:-1, :-2]
    gy = p[:, :, 2:, 1:-1] - p[:, :, :-2, 1:-1]
    return gx, gy


@dataclass(frozen=True)
class EdgeMask:
    """§6 edge mask. variant "reference": one-sided threshold, zero-padded gradients (borders fire),
    top-left pixel of each cell, `block`×`block` cells per decision (4). variant "corrected":
    |gradient| ≥ τ, replicate padding (no border artefacts), any edge pixel inside a cell counts,
    2×2-cell blocks (enough for one step)."""

    threshold: float = 0.15
    trimap_width: int = 11
    variant: Literal["reference", "corrected"] = "reference"
    stride: int = 8
    low: int = 1
    block: int | None = None

    @property
    def block_cells(self) -> int:
        return self.block or (4 if self.variant == "reference" else 2)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        s, blk = self.stride, self.block_cells
        if h % (s * blk) or w % (s * blk):
            raise ValueError(
                f"input {h}×{w} must be divisible by {s * blk} for {blk}×{blk} blocks of "
                f"{s}×{s}-pixel cells"
            )
        g = grey(x.float())
        ref = self.variant == "reference"
        gx, gy = gradients(g, "zeros" if ref else "replicate")
        if ref:
            edges = (gx >= self.threshold) | (gy >= self.threshold)
        else:
            edges = (gx.abs() >= self.threshold) | (gy.abs() >= self.threshold)
        k = self.trimap_width
        near = F.max_pool2d(edges.float(), k, 1, k // 2) if k > 1 else edges.float()
        near = near[:, :, :h, :w]
        if ref:
            cells = near[:, :, ::s, ::s]  # the top-left pixel of each cell
        else:
            cells = F.max_pool2d(near, s, s)  # any pixel of the cell
        keep = F.max_pool2d(cells, blk, blk) > 0  # any cell of the block near an edge
        keep = keep.repeat_interleave(blk, 2).repeat_interleave(blk, 3)[:, 0]
        return torch.where(keep, 0, self.low).long()

    def flops_gmac(self, h: int, w: int) -> float:
        """The two gradient convolutions, counted as 3×3 convolutions (§10.2): 2·9·H·W."""
        return 2 * 9 * h * w / 1e9


def high_res_fraction(mask: torch.Tensor) -> torch.Tensor:
    """(B,) share of finest cells that keep the finest resolution (M = 0)."""
    return (mask == 0).float().mean(dim=(1, 2))


def load_mask_file(
    path: str | Path, height: int, width: int, stride: int, low: int = 1, steps: int = 2
):
    """A pooling mask from a `.npy` file (the format `cadist predict --save-mask` writes) for one
    H×W input: (H/stride, W/stride) integers, 0 = the finest grid, `low` = downsampled, in the
    method's blocks (§3.1). Returns (1, H0, W0) int64; anything else is one `CadistError` naming the
    file, what it holds, what was expected and how to make one. `steps`: the model's adaptive
    steps (its blocks are 2^steps cells)."""
    import numpy as np

    from cadist.adaptive.layout import MixedLayout
    from cadist.errors import CadistError

    path = Path(path)
    fix = "write one with `cadist predict --save-mask` or numpy.save"
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exn:
        raise CadistError(
            f"mask {path}: not a readable .npy array ({str(exn).splitlines()[0]}); expected a "
            f"uint8 array of shape (H/{stride}, W/{stride}); {fix}"
        ) from None
    want = (height // stride, width // stride)
    if arr.shape != want:
        raise CadistError(
            f"mask {path}: shape {arr.shape}, expected {want} for a {height}×{width} input (one "
            f"value per {stride}×{stride} pixels); {fix}"
        )
    if arr.dtype.kind not in "iub":
        raise CadistError(f"mask {path}: dtype {arr.dtype}, expected integers (uint8); {fix}")
    bad = sorted(set(np.unique(arr).tolist()) - {0, low})
    if bad:
        raise CadistError(
            f"mask {path}: values {bad[:5]}, expected 0 (OS{stride}) and {low} "
            f"(OS{stride << low}) only; {fix}"
        )
    mask = torch.from_numpy(arr.astype(np.int64)).unsqueeze(0)
    try:
        MixedLayout(mask, steps)
    except ValueError as exn:
        raise CadistError(f"mask {path}: {exn}; {fix}") from None
    return mask
