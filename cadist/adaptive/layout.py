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
        if check:
            self._check()
        self._elements: dict[int, Elements] = {}
        self._tables: dict[tuple[int, int], torch.Tensor] = {}
        self._selection: dict[int, torch.Tensor] = {}

    def _check(self) -> None:
        b, h, w = self.shape
        s = 1 << self.num_steps
        if h % s or w % s:
            raise ValueError(f"finest grid {h}×{w} is not divisible by 2^{self.num_steps} = {s}")
        lo, hi = int(self.mask.min()), int(self.mask.max())
        if lo < 0 or hi > self.num_steps:
            raise ValueError(f"mask values {lo}..{hi} outside 0..{self.num_steps}")
        for lvl in range(1, self.num_steps + 1):
            k = 1 << lvl
            ge = (self.mask >= lvl).float().unsqueeze(1)
            mx = torch.nn.functional.max_pool2d(ge, k, k)
            mn = -torch.nn.functional.max_pool2d(-ge, k, k)
            if not torch.equal(mx, mn):
                raise ValueError(
                    f"mask violates the block constraint: {{M ≥ {lvl}}} is not a union "
                    f"of aligned {k}×{k} boxes"
                )

    # -- element lists ---------------------------------------------------------------------------
    def elements(self, k: int) -> Elements:
        """Elements after k adaptive steps (k = 0: one element per finest cell)."""
        if k not in self._elements:
            self._elements[k] = self._build(k)
        return self._elements[k]

    def _build(self, k: int) -> Elements:
        bsz, h, w = self.shape
        dev = self.mask.device
        cur = self.mask.clamp(max=k)
        parts = []
        for lvl in range(0, k + 1):
            s = 1 << lvl
            at = (cur[:, ::s, ::s] == lvl).nonzero()  # (n, 3): b, qy, qx in b-major raster order
            if at.numel():
                parts.append(
                    torch.stack(
                        [at[:, 0], torch.full_like(at[:, 0], lvl), at[:, 1] * s, at[:, 2] * s], 1
                    )
                )
        allp = torch.cat(parts) if parts else torch.zeros(0, 4, dtype=torch.long, device=dev)
        order = torch.sort(allp[:, 0], stable=True).indices  # image-major; levels stay ascending
        allp = allp[order]
        b, level, y0, x0 = allp.unbind(1)
        n = allp.shape[0]
        lookup = torch.empty(bsz, h, w, dtype=torch.long, device=dev)
        idx = torch.arange(n, device=dev)
        for lvl in range(0, k + 1):
            s = 1 << lvl
            sel = level == lvl
            if not bool(sel.any()):
                continue
            coarse = torch.zeros(bsz, h // s, w // s, dtype=torch.long, device=dev)
            coarse[b[sel], y0[sel] // s, x0[sel] // s] = idx[sel]
            fine = coarse.repeat_interleave(s, 1).repeat_interleave(s, 2)
            lookup = torch.where(cur == lvl, fine, lookup)
        counts = torch.bincount(b, minlength=bsz)
        return Elements(b, level, y0, x0, lookup, counts)

    # -- tables ----------------------------------------------------------------------------------
    def table(self, k: int, t: int) -> torch.Tensor:
        """(N_k, 9) indexes of the 3×3 taps at spacing t for the elements after k steps (§3.4);
        a tap outside the image reads row N_k (the zero row appended by the convolution)."""
        key = (k, t)
        if key not in self._tables:
            e = self.elements(k)
            _, h, w = self.shape
            off = (1 << e.level) // 2
            ty, tx = _TAPS_Y.to(e.b.device) * t, _TAPS_X.to(e.b.device) * t
            py = (e.y0 + off)[:, None] + ty[None, :]
            px = (e.x0 + off)[:, None] + tx[None, :]
            inside = (py >= 0) & (py < h) & (px >= 0) & (px < w)
            flat = (e.b[:, None] * h + py.clamp(0, h - 1)) * w + px.clamp(0, w - 1)
            idx = e.lookup.view(-1)[flat]
            self._tables[key] = torch.where(inside, idx, torch.full_like(idx, e.n))
        return self._tables[key]

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
