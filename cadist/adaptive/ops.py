"""Operations on element lists (N, C): the irregular 3×3 convolution (§3.4), 1×1 convolutions,
BatchNorm and ReLU (§3.6). Weights keep the dense shapes and names, so dense checkpoints load as is.

The irregular convolution is a gather of the 9 taps followed by one matrix multiply per chunk of
elements. A custom autograd function recomputes the gather in the backward pass instead of storing
the 9× larger gathered tensor. On `meta` tensors every op only produces the output shape (MAC
counting without arithmetic).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cadist.adaptive import kernels
from cadist.adaptive.gather import GATHER_BYTES, addmm_relu, gather_mm  # noqa: F401 (re-export)

CHUNK_ROWS = 16384  # elements per chunk of the backward: bounds its gathered buffer


def take_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """x[rows] for an (N, C) list; shape-only on the meta device."""
    if x.is_meta:
        return x.new_empty(rows.shape[0], x.shape[1])
    return x.index_select(0, rows)


def max_pool_step(x: torch.Tensor, members: torch.Tensor) -> torch.Tensor:
    """The max-pool adaptive step (§3.5): channel-wise max over each element's 4 members.
    x (N_{k−1}, C), members (N_k, 4) from `MixedLayout.pool_members(k)` → (N_k, C)."""
    if x.is_meta:
        return x.new_empty(members.shape[0], x.shape[1])
    return x.index_select(0, members.reshape(-1)).view(members.shape[0], 4, -1).amax(1)


class ListMaxPool(nn.Module):
    """The max-pool adaptive step k on an element list (§3.5): (N_{k−1}, C) → (N_k, C).

    Counting rule (§10.2): charged like a dense 2×2 pool over the whole canvas of level k−1 (every
    cell, pooled or not); computed: the four members read per element."""

    def forward(self, x: torch.Tensor, layout, k: int) -> torch.Tensor:
        _, h, w = layout.shape
        self._canvas = (h >> (k - 1)) * (w >> (k - 1)) * x.shape[1]
        return max_pool_step(x, layout.pool_members(k))

    def count_macs(self, inp, out):
        return "pool", float(self._canvas), float(4 * out.numel())


def _weight9(weight: torch.Tensor) -> torch.Tensor:
    """(Cout, Cin, 3, 3) → (9·Cin, Cout) with tap-major rows: row 9-block t = tap 3(i+1)+(j+1)."""
    cout, cin = weight.shape[:2]
    return weight.permute(2, 3, 1, 0).reshape(9 * cin, cout)


class _IrregularConv(torch.autograd.Function):
    """Gather + GEMM. Under autocast the products run in the autocast dtype (e.g. bf16) while the
    weight gradient and the scattered input gradient accumulate in float32."""

    @staticmethod
    def forward(ctx, x, weight, idx):
        dt = _compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            w9 = _weight9(weight).to(dt)
            out = _conv_forward(x, w9, idx, dt)
        ctx.save_for_backward(x, weight, idx, w9)  # w9: laid out once per step, not again
        ctx.dt = dt
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, idx, w9 = ctx.saved_tensors
        dt = ctx.dt
        n, cin = x.shape
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        with torch.autocast(x.device.type, enabled=False):
            grad_out = grad_out.to(dt).contiguous()
            if kernels.use_triton(x) and kernels.backward_supported(cin):
                # fused: the (M, 9·Cin) taps and the (M, 9·Cin) product are never materialised
                grad_xp, grad_w9 = kernels.conv_backward(
                    x.to(dt).contiguous(), idx.contiguous(), w9, grad_out, need_x, need_w
                )
                return _finish_grads(grad_xp, grad_w9, x, weight, n, cin)
            xp = torch.cat([x.to(dt), x.new_zeros(1, cin, dtype=dt)])
            acc = dt if dt in (torch.float32, torch.float64) else torch.float32
            grad_w9 = torch.zeros(w9.shape, dtype=acc, device=x.device) if need_w else None
            grad_xp = torch.zeros(n + 1, cin, dtype=acc, device=x.device) if need_x else None
            for s in range(0, idx.shape[0], CHUNK_ROWS):
                rows = idx[s : s + CHUNK_ROWS].reshape(-1)
                go = grad_out[s : s + CHUNK_ROWS]
                if need_w:
                    g = xp.index_select(0, rows).view(-1, 9 * cin)
                    prod = torch.mm(g.t(), go)
                    grad_w9 += prod.to(acc)
                if need_x:
                    gx = torch.mm(go, w9.t()).view(-1, cin)
                    grad_xp.index_add_(0, rows, gx.to(acc))
        return _finish_grads(grad_xp, grad_w9, x, weight, n, cin)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


def _conv_forward(x: torch.Tensor, w9: torch.Tensor, idx: torch.Tensor, dt) -> torch.Tensor:
    if kernels.use_triton(x):  # fused gather + GEMM; index n reads zeros
        return kernels.gather_gemm(x.to(dt).contiguous(), idx.contiguous(), w9)
    xp = torch.cat([x.to(dt), x.new_zeros(1, x.shape[1], dtype=dt)])  # row n: the zero tap
    return gather_mm(xp, idx, w9)


def _finish_grads(grad_xp, grad_w9, x, weight, n: int, cin: int):
    """(grad_x, grad_weight, None) in the inputs' dtypes and the dense weight layout."""
    grad_x = grad_xp[:n].to(x.dtype) if grad_xp is not None else None
    grad_w = None
    if grad_w9 is not None:
        cout = weight.shape[0]
        grad_w = grad_w9.view(3, 3, cin, cout).permute(3, 2, 0, 1).contiguous().to(weight.dtype)
    return grad_x, grad_w, None


def irregular_conv(
    x: torch.Tensor, weight: torch.Tensor, idx: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """y_e = Σ_taps W[:, :, i+1, j+1] · x[idx[e, tap]] (+ bias); idx (M, 9), row N = zero tap."""
    if x.is_meta:
        return x.new_empty(idx.shape[0], weight.shape[0])
    out = _IrregularConv.apply(x, weight, idx)
    return out + bias if bias is not None else out


class IrregularConv3x3(nn.Module):
    """A 3×3 convolution over an element list (§3.4), weights (Cout, Cin, 3, 3) as the dense conv.

    `strided=True` marks the stride-carrying conv of a stage's first block: the method's counting
    rule charges it at every input element although only the kept ones are computed (§10.1).
    """

    def __init__(self, cin: int, cout: int, bias: bool = False, strided: bool = False):
        super().__init__()
        self.in_channels, self.out_channels, self.strided = cin, cout, strided
        self.weight = nn.Parameter(torch.empty(cout, cin, 3, 3))
        self.bias = nn.Parameter(torch.zeros(cout)) if bias else None
        nn.init.kaiming_normal_(self.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        if x.is_meta or (
            torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)
        ):
            return irregular_conv(x, self.weight, idx, self.bias)
        # no autograd (evaluation): the GEMM-layout weights are laid out once per weight update
        dt = _compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            out = _conv_forward(x, self._w9(dt), idx, dt)
        return out + self.bias if self.bias is not None else out

    def train(self, mode: bool = True):
        # a new evaluation lays the weights out afresh: an optimiser may have written them without
        # bumping their version (DeepSpeed ZeRO-1/2 update a flat buffer the weights are views of,
        # `param.data` set to them), which the key below cannot see
        self._w9_cache = None
        return super().train(mode)

    def _w9(self, dt: torch.dtype) -> torch.Tensor:
        w = self.weight
        key = (w.data_ptr(), w._version, dt, w.device)
        cached = getattr(self, "_w9_cache", None)
        if cached is None or cached[0] != key:
            with torch.no_grad():
                cached = (key, _weight9(w.detach()).to(dt).contiguous())
            self._w9_cache = cached
        return cached[1]

    def count_macs(self, inp, out):
        per = 9 * self.in_channels * self.out_channels
        actual = per * out.shape[0] + (
            self.out_channels * out.shape[0] if self.bias is not None else 0
        )
        reference = per * (inp.shape[0] if self.strided else out.shape[0])
        if self.bias is not None:
            reference += self.out_channels * out.shape[0]
        return "conv", float(reference), float(actual)


class PointwiseConv(nn.Module):
    """A 1×1 convolution over an element list; weight (Cout, Cin, 1, 1) (and bias) as the dense
    conv."""

    def __init__(self, cin: int, cout: int, bias: bool = False):
        super().__init__()
        self.in_channels, self.out_channels = cin, cout
        self.weight = nn.Parameter(torch.empty(cout, cin, 1, 1))
        self.bias = nn.Parameter(torch.zeros(cout)) if bias else None
        nn.init.kaiming_normal_(self.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_meta:
            return x.new_empty(x.shape[0], self.out_channels)
        return F.linear(x, self.weight.view(self.out_channels, self.in_channels), self.bias)

    def count_macs(self, inp, out):
        m = float((self.in_channels + (self.bias is not None)) * self.out_channels * out.shape[0])
        return "conv", m, m


class ListBatchNorm(nn.BatchNorm1d):
    """BatchNorm over an element list: statistics over all elements of the batch, each once, no
    padding (§3.6). Parameter and buffer names are those of `nn.BatchNorm2d`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_meta:
            return x.new_empty(x.shape)
        return super().forward(x)

    def count_macs(self, inp, out):
        m = 2.0 * inp.numel()
        return "bn", m, m


class ListReLU(nn.ReLU):
    def count_macs(self, inp, out):
        m = float(out.numel())
        return "relu", m, m
