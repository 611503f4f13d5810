"""The mixed-resolution representation of a batch (method.md §3), built once per batch of masks.

Features live in one (N, C) matrix for the whole batch: image 0's elements, then image 1's, …; inside
an image ascending level, then raster order of the boxes (§3.2). Images are concatenated, never
padded, so BatchNorm statistics see every element exactly once and no padding (§3.6, a deliberate
difference from the reference). All tables are built with vectorised tensor ops, once per mask and
step (lookup maps, selections) or per mask and tap spacing (3×3 index tables), and shared by every
convolution that needs them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

# tap (i, j) ∈ {−1, 0, 1}², row-major: tap index 3·(i+1) + (j+1) (§3.4)
_TAPS_Y = torch.tensor([-1, -1, -1, 0, 0, 0, 1, 1, 1], device="cpu")
_TAPS_X = torch.tensor([-1, 0, 1, -1, 0, 1, -1, 0, 1], device="cpu")


@dataclass
class Elements:
    """The element list after k adaptive steps.

    b, level, y0, x0: (N,) int64 — image, level and top-left finest cell of each element's box.
    lookup: (B, H0, W0) int64 — index of the element containing each finest cell (§3.3).
    counts: (B,) int64 — elements per image.
    """

    b: torch.Tensor
    level: torch.Tensor
    y0: torch.Tensor
    x0: torch.Tensor
    lookup: torch.Tensor
    counts: torch.Tensor

    @property
    def n(self) -> int:
        return int(self.b.shape[0])


class MixedLayout:
    """Element lists, lookup maps, selections and 3×3 index tables of a batch of pooling masks.

    mask: (B, H0, W0) integer pooling mask M (§3.1), values 0..num_steps, each {M ≥ ℓ} a union of
    aligned 2^ℓ×2^ℓ boxes; H0 and W0 divisible by 2^num_steps.
    """

    def __init__(self, mask: torch.Tensor, num_steps: int, check: bool = True):
        if mask.dim() != 3:
            raise ValueError(f"mask must be (B, H0, W0), got {tuple(mask.shape)}")
        self.mask = mask.long()
        self.num_steps = num_steps
        b, h, w = mask.shape
        self.shape = (b, h, w)
        s = 1 << num_steps
        if h % s or w % s:
            raise ValueError(f"finest grid {h}×{w} is not divisible by 2^{num_steps} = {s}")
        if check:
            self._check()
        self._elements: dict[int, Elements] = {}
        self._tables: dict[tuple[int, int, bool], torch.Tensor] = {}
        self._selection: dict[int, torch.Tensor] = {}

    def _check(self) -> None:
        ok = (self.mask.min() >= 0) & (self.mask.max() <= self.num_steps)
        boxes = []
        for lvl in range(1, self.num_steps + 1):
            k = 1 << lvl
            ge = (self.mask >= lvl).float().unsqueeze(1)
            # a k×k box is uniform iff its max equals its min
            boxes.append(torch.equal(F.max_pool2d(ge, k, k), -F.max_pool2d(-ge, k, k)))
        if bool(ok) and all(boxes):  # one host sync for the value range
            return
        lo, hi = int(self.mask.min()), int(self.mask.max())
        if lo < 0 or hi > self.num_steps:
            raise ValueError(f"mask values {lo}..{hi} outside 0..{self.num_steps}")
        lvl = boxes.index(False) + 1
        k = 1 << lvl
        raise ValueError(
            f"mask violates the block constraint: {{M ≥ {lvl}}} is not a union of aligned "
            f"{k}×{k} boxes"
        )

    # -- element lists ---------------------------------------------------------------------------
    def elements(self, k: int) -> Elements:
        """Elements after k adaptive steps (k = 0: one element per finest cell)."""
        if k not in self._elements:
            self._elements[k] = self._build(k)
        return self._elements[k]

    def _build(self, k: int) -> Elements:
        """Every box of every level ≤ k is a *slot* (image-major, then level, then raster order:
        §3.2 order); a slot is an element iff its top-left cell has current level = its level.
        One cumulative sum numbers the elements, one `nonzero` lists them."""
        bsz, h, w = self.shape
        dev = self.mask.device
        cur = self.mask.clamp(max=k)
        sizes = [(h >> lvl) * (w >> lvl) for lvl in range(k + 1)]
        per_image = sum(sizes)
        offs = torch.tensor([0] + sizes, device=dev).cumsum(0)  # level → first slot in an image
        ind = torch.cat(
            [(cur[:, :: 1 << lvl, :: 1 << lvl] == lvl).reshape(bsz, -1) for lvl in range(k + 1)], 1
        ).reshape(-1)
        number = ind.cumsum(0) - 1  # slot → element index (valid where ind)
        slots = ind.nonzero().squeeze(1) if k else torch.arange(bsz * h * w, device=dev)
        b, r = slots // per_image, slots % per_image
        level = torch.searchsorted(offs[1:-1], r, right=True)
        q, gw = r - offs[level], w >> level
        y0, x0 = (q // gw) << level, (q % gw) << level
        yy = torch.arange(h, device=dev).view(1, h, 1)
        xx = torch.arange(w, device=dev).view(1, 1, w)
        bb = torch.arange(bsz, device=dev).view(bsz, 1, 1)
        cell_slot = bb * per_image + offs[cur] + (yy >> cur) * (w >> cur) + (xx >> cur)
        lookup = number[cell_slot]
        counts = ind.view(bsz, per_image).sum(1)
        return Elements(b, level, y0, x0, lookup, counts)

    # -- tables ----------------------------------------------------------------------------------
    def table(self, k: int, t: int, per_level: bool = False) -> torch.Tensor:
        """(N_k, 9) indexes of the 3×3 taps at spacing t for the elements after k steps (§3.4);
        a tap outside the image reads row N_k (the zero row appended by the convolution).

        `per_level`: spacing t·2^ℓ for an element of level ℓ — dilation t on each element's own
        grid, as the dense network at that level's output stride (the adaptive head's classifier
        conv); otherwise the same spatial offset t for every element (dilation t/2^ℓ)."""
        key = (k, t, per_level)
        if key not in self._tables:
            e = self.elements(k)
            _, h, w = self.shape
            off = (1 << e.level) // 2
            ty, tx = _TAPS_Y.to(e.b.device), _TAPS_X.to(e.b.device)
            if per_level:
                step = (t << e.level)[:, None]
                ty, tx = ty[None, :] * step, tx[None, :] * step
            else:
                ty, tx = ty[None, :] * t, tx[None, :] * t
            py = (e.y0 + off)[:, None] + ty
            px = (e.x0 + off)[:, None] + tx
            inside = (py >= 0) & (py < h) & (px >= 0) & (px < w)
            flat = (e.b[:, None] * h + py.clamp(0, h - 1)) * w + px.clamp(0, w - 1)
            idx = e.lookup.view(-1)[flat]
            self._tables[key] = torch.where(inside, idx, torch.full_like(idx, e.n))
        return self._tables[key]

    def step_table(self, k: int, t: int) -> torch.Tensor:
        """(N_k, 9) taps at spacing t on the step-(k−1) list, for the elements that step k keeps:
        the stride-carrying conv evaluated only where its output survives (§3.5)."""
        key = (-k, t, False)
        if key not in self._tables:
            full = self.table(k - 1, t)
            self._tables[key] = (
                full if self.is_identity(k) else full.index_select(0, self.selection(k))
            )
        return self._tables[key]

    def prepare(self, tables: list[tuple[int, int, bool]]) -> None:
        """Build every table a network needs up front — (k, t, strided) triples — so the forward
        pass itself never waits on the device (building uses `nonzero`, a host sync)."""
        for k, t, strided in tables:
            self.step_table(k, t) if strided else self.table(k, t)

    def selection(self, k: int) -> torch.Tensor:
        """(N_k,) rows of the step-(k−1) list that step k keeps, in step-k order (§3.5, strided
        variant: a new coarse element is the top-left member of its 2×2 group)."""
        if k not in self._selection:
            prev, cur = self.elements(k - 1), self.elements(k)
            _, h, w = self.shape
            flat = (cur.b * h + cur.y0) * w + cur.x0
            self._selection[k] = prev.lookup.view(-1)[flat]
        return self._selection[k]

    def pool_members(self, k: int) -> torch.Tensor:
        """(N_k, 4) rows of the step-(k−1) list pooled into each step-k element (§3.5, max-pool
        variant): the four quadrants of a new level-k box; an unchanged element lists itself 4×."""
        key = -k  # cached beside the selections
        if key not in self._selection:
            prev, cur = self.elements(k - 1), self.elements(k)
            _, h, w = self.shape
            half = torch.where(cur.level == k, 1 << (k - 1), 0)
            dy = torch.stack([torch.zeros_like(half), torch.zeros_like(half), half, half], 1)
            dx = torch.stack([torch.zeros_like(half), half, torch.zeros_like(half), half], 1)
            flat = (cur.b[:, None] * h + cur.y0[:, None] + dy) * w + cur.x0[:, None] + dx
            self._selection[key] = prev.lookup.view(-1)[flat]
        return self._selection[key]

    def is_identity(self, k: int) -> bool:
        """True when step k changes nothing (e.g. layer4's step when the mask is {0, 1})."""
        return self.elements(k).n == self.elements(k - 1).n

    # -- entering and leaving ------------------------------------------------------------------
    @staticmethod
    def from_dense(x: torch.Tensor) -> torch.Tensor:
        """(B, C, H0, W0) → (B·H0·W0, C): every cell a level-0 element, in §3.2 order."""
        b, c, h, w = x.shape
        if x.is_meta:
            return x.new_empty(b * h * w, c)
        return x.permute(0, 2, 3, 1).reshape(b * h * w, c)

    def to_dense(self, feats: torch.Tensor, k: int) -> torch.Tensor:
        """(N_k, C) → (B, C, H0, W0): every cell takes its element's feature (§3.7)."""
        bsz, h, w = self.shape
        c = feats.shape[1]
        if feats.is_meta:
            return feats.new_empty(bsz, c, h, w)
        lookup = self.elements(k).lookup
        return feats.index_select(0, lookup.view(-1)).view(bsz, h, w, c).permute(0, 3, 1, 2)
