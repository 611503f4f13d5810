"""The torch path of the irregular 3×3 convolution: gather the 9 taps of each element and multiply,
in chunks (used by `ops` and as the fallback of the Triton `kernels`; imports torch only)."""

from __future__ import annotations

import torch

#: bytes of gathered taps materialised at once per irregular conv (rows × 9 × Cin × itemsize)
GATHER_BYTES = {"cuda": 1 << 30, "cpu": 1 << 27}


def addmm_relu(c: torch.Tensor, a: torch.Tensor, b: torch.Tensor, out=None) -> torch.Tensor:
    """relu(c + a @ b) in one call: cuBLASLt applies bias and ReLU in the GEMM epilogue on CUDA
    when c is a 1-D bias (torch's private `_addmm_activation`, as `nn.Linear` fusions use)."""
    fused = getattr(torch, "_addmm_activation", None)
    if fused is None:  # pragma: no cover - every supported torch has it
        return torch.addmm(c, a, b, out=out).relu_()
    return fused(c, a, b) if out is None else fused(c, a, b, out=out)


def gather_mm(
    xp: torch.Tensor,
    idx: torch.Tensor,
    w9: torch.Tensor,
    bias: torch.Tensor | None = None,
    relu: bool = False,
) -> torch.Tensor:
    """torch's irregular 3×3 conv: gather the 9 taps (rows of xp, whose last row is the zero tap)
    and multiply, in chunks of `GATHER_BYTES`; [relu](Σ_taps xp[idx]·W_tap [+ bias]) → (M, Cout)."""
    m, cin = idx.shape[0], xp.shape[1]
    rows = max(
        1, GATHER_BYTES.get(xp.device.type, GATHER_BYTES["cpu"]) // (9 * cin * xp.element_size())
    )

    def mm(g, out=None):
        if bias is None:
            r = torch.mm(g, w9, out=out)
            return r.relu_() if relu else r
        return (addmm_relu if relu else torch.addmm)(bias, g, w9, out=out)

    if rows >= m:
        return mm(xp.index_select(0, idx.reshape(-1)).view(m, 9 * cin))
    out = xp.new_empty(m, w9.shape[1])
    for s in range(0, m, rows):
        mm(xp.index_select(0, idx[s : s + rows].reshape(-1)).view(-1, 9 * cin), out[s : s + rows])
    return out
