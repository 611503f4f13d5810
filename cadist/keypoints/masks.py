"""The keypoint pooling mask of APD2Net (method.md §11.4): cells near a keypoint keep the start
stride s; farther ones are pooled once, twice, …, up to L = log2(8/s) times (OS8)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def check_windows(windows: tuple[int, ...], num_steps: int) -> tuple[int, ...]:
    """The first L window sizes; each odd (or 0 = skip that level), non-zero ones non-decreasing
    (nested windows keep the mask a valid union of aligned boxes at every level, §3.1)."""
    if len(windows) < num_steps:
        raise ValueError(f"window sizes {windows}: need {num_steps} (one per pooling level)")
    ws = tuple(int(d) for d in windows[:num_steps])
    nonzero = [d for d in ws if d]
    if any(d < 0 or (d and d % 2 == 0) for d in ws):
        raise ValueError(f"window sizes {ws}: each must be odd (or 0 to skip a level)")
    if nonzero != sorted(nonzero) or any(ws[i] and not ws[i + 1] for i in range(len(ws) - 1)):
        raise ValueError(
            f"window sizes {ws}: non-zero sizes must not shrink and may not be followed by a 0 "
            "(the mask would not be a union of aligned boxes)"
        )
    return ws


def keypoint_mask(
    points: torch.Tensor, height: int, width: int, start_stride: int, windows: tuple[int, ...]
) -> torch.Tensor:
    """(N, 2) integer pixel keypoints [x, y] of an H×W image → (H/s, W/s) int64 pooling mask."""
    s = start_stride
    num_steps = {1: 3, 2: 2, 4: 1}[s]
    ws = check_windows(windows, num_steps)
    if height % 8 or width % 8:
        raise ValueError(f"image {height}×{width}: both sides must be multiples of 8 (§11.2)")
    hits = torch.zeros(1, 1, height, width)
    if len(points):
        hits[0, 0, points[:, 1].long(), points[:, 0].long()] = 1.0
    mask = torch.full((height // s, width // s), num_steps, dtype=torch.long)
    for i in range(num_steps - 1, -1, -1):
        d = ws[i]
        if not d:
            continue
        box = F.conv2d(hits, torch.ones(1, 1, d, d), padding=d // 2)[0, 0, ::s, ::s]
        b = 1 << (i + 1)
        touched = F.max_pool2d((box > 0).float()[None, None], b, b)[0, 0] > 0
        block = touched.repeat_interleave(b, 0).repeat_interleave(b, 1)
        mask[block] = i
    return mask
