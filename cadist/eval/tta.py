"""Test-time augmentation (mmsegmentation's "aug test"): every image is also run resized by a few
factors and, optionally, mirrored; the class probabilities of all passes are averaged at the
image's own resolution. Not the paper's protocol (method.md §9: single scale, no flip), which is
`scales=(1.0,), flip=False` and gives exactly the plain prediction.

Sliding-window inference (mmsegmentation's "slide" mode, `Window`): each pass runs the model on
overlapping crops instead of the whole (resized) image and averages the logits where crops
overlap — for GPUs that cannot hold a whole image, or to predict at the crop size a network was
trained on. An adaptive network then builds one mask per crop."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cadist.config.passes import Pass, Window
from cadist.errors import ConfigError


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


def input_multiple(build_kwargs: dict) -> int:
    """`size_multiple` of the model `build_model(**build_kwargs)` makes, from its structure on the
    meta device: no memory, no initialisation."""
    from cadist.nets.build import build_model

    with torch.device("meta"):
        return size_multiple(build_model(**build_kwargs))


def plan_passes(
    height: int,
    width: int,
    scales: Sequence[float],
    flip: bool,
    multiple: int,
    window: Window | None = None,
) -> list[Pass]:
    """The passes for an H×W image: each scale's size rounded to the nearest `multiple` (at least
    one multiple), each also mirrored with `flip`. Scale 1 of an H×W that is a multiple already
    runs at H×W itself. With a `window` each pass runs in crops of the window's size (of the
    pass's size where the pass is smaller); the window's sides must be multiples of `multiple`."""
    if not scales:
        raise ValueError("test-time augmentation needs at least one scale, e.g. 1.0")
    if window is not None and (window.height % multiple or window.width % multiple):
        up = [-(-v // multiple) * multiple for v in (window.height, window.width)]
        raise ConfigError(
            f"--window {window.height}x{window.width}: this model takes inputs whose sides are "
            f"multiples of {multiple}; use e.g. --window {up[0]}x{up[1]}"
        )
    passes = []
    for s in scales:
        if not s > 0:
            raise ValueError(f"test-time scale {s}: expected a factor > 0, e.g. 0.75, 1.0, 1.25")
        h = max(multiple, round(height * s / multiple) * multiple)
        w = max(multiple, round(width * s / multiple) * multiple)
        tile, tiles = None, 1
        if window is not None:
            tile = (min(window.height, h), min(window.width, w))
            tiles = len(crop_boxes(h, w, *tile, window.stride_h, window.stride_w))
        passes += [Pass(h, w, f, tile, tiles) for f in ((False, True) if flip else (False,))]
    return passes


def crop_boxes(
    height: int, width: int, tile_h: int, tile_w: int, stride_h: int, stride_w: int
) -> list[tuple[int, int, int, int]]:
    """The crops (y0, y1, x0, x1) that cover an H×W input: one every stride from the top-left,
    the last of each row and column moved back to end at the edge (mmsegmentation's grid)."""
    rows = max(height - tile_h + stride_h - 1, 0) // stride_h + 1
    cols = max(width - tile_w + stride_w - 1, 0) // stride_w + 1
    boxes = []
    for r in range(rows):
        y1 = min(r * stride_h + tile_h, height)
        for c in range(cols):
            x1 = min(c * stride_w + tile_w, width)
            boxes.append((max(y1 - tile_h, 0), y1, max(x1 - tile_w, 0), x1))
    return boxes


@torch.no_grad()
def predict_augmented(
    model: nn.Module, x: torch.Tensor, passes: Sequence[Pass], window: Window | None = None
) -> tuple[torch.Tensor, list[torch.Tensor | None], list[torch.Tensor | None]]:
    """Images x (B, 3, H, W) → mean class probabilities (B, C, H, W) in fp32 over `passes`; each
    pass's pooling mask (B, h/8, w/8) as the model used it (adaptive models; None for dense
    ones; a mirrored pass's mask is of the mirrored image; with a window the crops' masks put
    together, a later crop's where they overlap); and each pass's per-image high-res fraction
    (B,) — with a window the mean over its crops, which is what the crops computed.

    A pass resizes x bilinearly (align_corners=False, as the network's own upsampling), mirrors
    it if asked, runs the model (on each crop of `window`, the logits of overlapping crops
    averaged), mirrors the logits back and resizes them to H×W before the softmax; an adaptive
    model builds its mask from the resized image (or crop), as it would for an image of that
    size."""
    h, w = x.shape[-2:]
    probs, masks, fractions = None, [], []
    for p in passes:
        xs = x if (p.height, p.width) == (h, w) else _resize(x, p.height, p.width)
        xs = xs.flip(-1) if p.flip else xs
        if p.tile is None:
            logits = model(xs)
            mask = getattr(model, "last_mask", None)
            fraction = None if mask is None else high_res_fraction(mask)
        else:
            assert window is not None, "a pass with crops needs the window it was planned with"
            logits, mask, fraction = _slide(model, xs, p.tile, window)
        masks.append(mask)
        fractions.append(fraction)
        logits = logits.flip(-1) if p.flip else logits
        if logits.shape[-2:] != (h, w):
            logits = F.interpolate(
                logits.float(), size=(h, w), mode="bilinear", align_corners=False
            )
        prob = logits.float().softmax(1)
        probs = prob if probs is None else probs.add_(prob)
    return probs.div_(len(passes)), masks, fractions


def _slide(model: nn.Module, x: torch.Tensor, tile: tuple[int, int], window: Window):
    """The model on every crop of x (B, 3, h, w): logits (B, C, h, w) in fp32 averaged where
    crops overlap, the crops' masks put together at the finest grid (or None) and the per-image
    mean high-res fraction over the crops (or None)."""
    h, w = x.shape[-2:]
    boxes = crop_boxes(h, w, *tile, window.stride_h, window.stride_w)
    total = count = mask = fraction = None
    for y0, y1, x0, x1 in boxes:
        out = model(x[..., y0:y1, x0:x1]).float()
        if total is None:
            total = out.new_zeros(*out.shape[:2], h, w)
            count = out.new_zeros(1, 1, h, w)
        total[..., y0:y1, x0:x1] += out
        count[..., y0:y1, x0:x1] += 1
        m = getattr(model, "last_mask", None)
        if m is not None:
            cell = tile[0] // m.shape[-2]  # pixels per mask cell (8); crops start anywhere
            if mask is None:
                mask = m.new_zeros(m.shape[0], h // cell, w // cell)
                fraction = torch.zeros(m.shape[0], device=m.device)
            mask[
                :, y0 // cell : y0 // cell + m.shape[-2], x0 // cell : x0 // cell + m.shape[-1]
            ] = m
            fraction += high_res_fraction(m) / len(boxes)
    return total / count, mask, fraction


def high_res_fraction(mask: torch.Tensor) -> torch.Tensor:
    """Per-image share of cells a pooling mask (B, h, w) keeps at the finest resolution, (B,)."""
    return (mask == 0).float().mean(dim=(1, 2))


def _resize(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    dtype = x.dtype
    y = F.interpolate(x.float(), size=(h, w), mode="bilinear", align_corners=False)
    return y.to(dtype)
