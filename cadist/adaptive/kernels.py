"""A fused gather + matrix-multiply kernel (Triton) for the irregular 3×3 convolution at inference.

`gather_conv` in folded.py materialises the gathered taps (M, 9·Cin) and multiplies; on a GPU that
buffer costs as much memory traffic as the multiply costs time. This kernel instead loads each tile
of gathered rows straight from the index table into on-chip memory (an "implicit GEMM", as dense
convolution libraries do), adds the bias and applies ReLU before the single store.

Triton ships with PyTorch's CUDA builds; it is imported lazily and only used when present. Tests run
the same kernel on the CPU through Triton's interpreter (TRITON_INTERPRET=1).
"""

from __future__ import annotations

import functools
import os
import warnings

import torch

from cadist.adaptive.gather import gather_mm


@functools.cache
def available() -> bool:
    """True when Triton imports and `CADIST_TRITON` is not "0"."""
    if os.environ.get("CADIST_TRITON", "1") == "0":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


#: "auto": the Triton kernel on CUDA when Triton imports, else torch's gather + matmul;
#: "triton": the kernel everywhere (on the CPU through Triton's interpreter); "torch": never
_IMPL = {"impl": "auto"}


def set_impl(impl: str) -> None:
    """Choose how irregular convolutions run (benchmarks compare both in one process)."""
    if impl not in ("auto", "triton", "torch"):
        raise ValueError(f"irregular conv implementation {impl!r}: expected auto, triton or torch")
    _IMPL["impl"] = impl


def use_triton(x: torch.Tensor) -> bool:
    impl = _IMPL["impl"]
    return impl == "triton" or (impl == "auto" and x.is_cuda and available() and not _FAILED)


_FAILED: list[str] = []  # the error of a kernel that failed to compile or launch (then: torch)


#: tile configurations tried once per (Cin, Cout) on a GPU (BM, BN, BK, warps, stages)
CONFIGS = [
    (128, 128, 64, 4, 4),
    (128, 128, 64, 8, 3),
    (128, 256, 64, 8, 3),
    (256, 128, 64, 8, 3),
    (64, 128, 64, 4, 4),
    (128, 64, 64, 4, 4),
]


@functools.cache
def _kernel(autotune: bool):
    import triton
    import triton.language as tl

    @triton.jit
    def gather_gemm(
        x_ptr,  # (≥ NROWS, CIN) rows; an idx entry ≥ NROWS reads zeros (taps outside the image)
        idx_ptr,  # (M, 9) row of each tap
        w_ptr,  # (9·CIN, COUT) tap-major weights
        b_ptr,  # (COUT,) bias
        o_ptr,  # (M, COUT) output
        M,
        NROWS,
        CIN,
        COUT,
        BM: tl.constexpr,
        BN: tl.constexpr,
        BK: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        RELU: tl.constexpr,
        PRECISION: tl.constexpr,
        UPCAST: tl.constexpr,  # dot in float32 (Triton's CPU interpreter multiplies bf16 wrongly)
    ):
        rm = tl.program_id(0) * BM + tl.arange(0, BM)
        rn = tl.program_id(1) * BN + tl.arange(0, BN)
        m_ok, n_ok = rm < M, rn < COUT
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        # one flat loop over (tap, K block) so loads pipeline across tap boundaries
        kt = tl.cdiv(CIN, BK)
        for kk in range(0, 9 * kt):
            tap = kk // kt
            rk = (kk % kt) * BK + tl.arange(0, BK)
            k_ok = rk < CIN
            rows = tl.load(idx_ptr + rm * 9 + tap, mask=m_ok, other=0).to(tl.int64)
            r_ok = m_ok & (rows < NROWS)
            a = tl.load(
                x_ptr + rows[:, None] * CIN + rk[None, :],
                mask=r_ok[:, None] & k_ok[None, :],
                other=0.0,
            )
            b = tl.load(
                w_ptr + (tap * CIN + rk)[:, None] * COUT + rn[None, :],
                mask=k_ok[:, None] & n_ok[None, :],
                other=0.0,
            )
            if UPCAST:
                a, b = a.to(tl.float32), b.to(tl.float32)
            acc += tl.dot(a, b, input_precision=PRECISION)
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        if RELU:
            acc = tl.maximum(acc, 0.0)
        tl.store(
            o_ptr + rm[:, None] * COUT + rn[None, :],
            acc.to(o_ptr.dtype.element_ty),
            mask=m_ok[:, None] & n_ok[None, :],
        )

    if not autotune:
        return gather_gemm
    configs = [
        triton.Config({"BM": bm, "BN": bn, "BK": bk}, num_warps=w, num_stages=st)
        for bm, bn, bk, w, st in CONFIGS
    ]
    return triton.autotune(configs=configs, key=["CIN", "COUT"])(gather_gemm)


def _tiles(m: int, cin: int, cout: int) -> tuple[int, int, int, int]:
    """(BM, BN, BK, num_warps): 128×128 output tiles where the sizes allow, K in steps of 64."""
    bn = 128 if cout >= 128 else max(16, 1 << (cout - 1).bit_length())
    bk = 64 if cin >= 64 else max(16, 1 << (cin - 1).bit_length())
    bm = 128 if m >= 128 else 64
    return bm, bn, bk, 8 if bm * bn >= 128 * 128 else 4


def gather_gemm(
    x: torch.Tensor,
    idx: torch.Tensor,
    w9: torch.Tensor,
    bias: torch.Tensor | None = None,
    relu: bool = False,
) -> torch.Tensor:
    """[relu](Σ_taps x[idx[:, tap]] · w9[tap block] [+ bias]): x (N, Cin), idx (M, 9) with entries
    ≥ N reading zeros, w9 (9·Cin, Cout) → (M, Cout) in x's dtype, accumulated in float32."""
    m, cin, cout = idx.shape[0], x.shape[1], w9.shape[1]
    assert x.is_contiguous() and idx.is_contiguous() and w9.is_contiguous(), "contiguous inputs"
    assert w9.shape[0] == 9 * cin and idx.shape[1] == 9, "w9 is (9·Cin, Cout), idx is (M, 9)"
    out = torch.empty(m, cout, dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    # float32 follows the dense convolution it replaces: TF32 where cuDNN may use it
    tf32 = x.dtype == torch.float32 and torch.backends.cudnn.allow_tf32
    args = (x, idx, w9, out if bias is None else bias, out, m, x.shape[0], cin, cout)
    flags = dict(HAS_BIAS=bias is not None, RELU=relu, PRECISION="tf32" if tf32 else "ieee")
    if x.is_cuda:

        def grid(meta):
            return (triton_cdiv(m, meta["BM"]), triton_cdiv(cout, meta["BN"]))

        try:
            _kernel(True)[grid](*args, **flags, UPCAST=False)
        except Exception as exn:  # a Triton/driver combination that cannot build it: fall back
            if _IMPL["impl"] == "triton":
                raise
            _FAILED.append(f"{type(exn).__name__}: {exn}")
            warnings.warn(
                f"cadist: the fused irregular-conv kernel failed ({_FAILED[0][:300]}); "
                "using torch's gather + matmul from now on",
                stacklevel=2,
            )
            return _torch_gather_gemm(x, idx, w9, bias, relu)
    else:  # Triton's interpreter (tests): one fixed tiling, float32 products
        bm, bn, bk, warps = _tiles(m, cin, cout)
        grid = (triton_cdiv(m, bm), triton_cdiv(cout, bn))
        _kernel(False)[grid](*args, **flags, UPCAST=True, BM=bm, BN=bn, BK=bk, num_warps=warps)
    return out


def _torch_gather_gemm(x, idx, w9, bias, relu):
    xp = torch.cat([x, x.new_zeros(1, x.shape[1])])  # row N: the zero tap
    return gather_mm(xp, idx.clamp(max=x.shape[0]), w9, bias, relu)


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


# -- backward: weight gradient (gather-GEMM over elements) and input gradient (GEMM-scatter) ------
@functools.cache
def _backward_kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def grad_weight(
        x_ptr,  # (≥ NROWS, CIN) input rows
        idx_ptr,  # (M, 9)
        go_ptr,  # (M, COUT) output gradient
        gw_ptr,  # (9·CIN, COUT) float32, accumulated with atomics (split over M)
        M,
        NROWS,
        CIN,
        COUT,
        CHUNK,  # elements per split
        BR: tl.constexpr,  # rows of gw per program (divides CIN: one tap per program)
        BN: tl.constexpr,
        BM: tl.constexpr,
        UPCAST: tl.constexpr,
    ):
        rr = tl.program_id(0) * BR + tl.arange(0, BR)
        tap = (tl.program_id(0) * BR) // CIN
        c = rr - tap * CIN
        rn = tl.program_id(1) * BN + tl.arange(0, BN)
        n_ok = rn < COUT
        start = tl.program_id(2) * CHUNK
        acc = tl.zeros((BR, BN), dtype=tl.float32)
        for m0 in range(0, CHUNK, BM):
            rm = start + m0 + tl.arange(0, BM)
            m_ok = (rm < M) & (m0 + tl.arange(0, BM) < CHUNK)
            rows = tl.load(idx_ptr + rm * 9 + tap, mask=m_ok, other=0).to(tl.int64)
            r_ok = m_ok & (rows < NROWS)
            a = tl.load(x_ptr + rows[None, :] * CIN + c[:, None], mask=r_ok[None, :], other=0.0)
            g = tl.load(
                go_ptr + rm[:, None] * COUT + rn[None, :],
                mask=m_ok[:, None] & n_ok[None, :],
                other=0.0,
            )
            if UPCAST:
                a, g = a.to(tl.float32), g.to(tl.float32)
            acc += tl.dot(a, g)
        tl.atomic_add(gw_ptr + rr[:, None] * COUT + rn[None, :], acc, mask=n_ok[None, :])

    @triton.jit
    def grad_input(
        go_ptr,  # (M, COUT)
        idx_ptr,  # (M, 9)
        w_ptr,  # (9·CIN, COUT)
        gx_ptr,  # (NROWS, CIN) float32, accumulated with atomics (rows read by several taps)
        M,
        NROWS,
        CIN,
        COUT,
        BM: tl.constexpr,
        BC: tl.constexpr,
        BO: tl.constexpr,
        UPCAST: tl.constexpr,
    ):
        rm = tl.program_id(0) * BM + tl.arange(0, BM)
        rc = tl.program_id(1) * BC + tl.arange(0, BC)
        tap = tl.program_id(2)
        m_ok, c_ok = rm < M, rc < CIN
        acc = tl.zeros((BM, BC), dtype=tl.float32)
        for o0 in range(0, COUT, BO):
            ro = o0 + tl.arange(0, BO)
            o_ok = ro < COUT
            g = tl.load(
                go_ptr + rm[:, None] * COUT + ro[None, :],
                mask=m_ok[:, None] & o_ok[None, :],
                other=0.0,
            )
            wt = tl.load(
                w_ptr + (tap * CIN + rc)[None, :] * COUT + ro[:, None],
                mask=o_ok[:, None] & c_ok[None, :],
                other=0.0,
            )
            if UPCAST:
                g, wt = g.to(tl.float32), wt.to(tl.float32)
            acc += tl.dot(g, wt)
        rows = tl.load(idx_ptr + rm * 9 + tap, mask=m_ok, other=0).to(tl.int64)
        ok = m_ok & (rows < NROWS)
        tl.atomic_add(
            gx_ptr + rows[:, None] * CIN + rc[None, :], acc, mask=ok[:, None] & c_ok[None, :]
        )

    return grad_weight, grad_input


def backward_supported(cin: int) -> bool:
    """The weight-gradient kernel needs Cin to be a multiple of 16 (one tap per row block)."""
    return cin % 16 == 0


def conv_backward(
    x: torch.Tensor, idx: torch.Tensor, w9: torch.Tensor, grad_out: torch.Tensor,
    need_x: bool, need_w: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:  # fmt: skip
    """Gradients of `gather_gemm` (no bias/ReLU) without materialising the (M, 9·Cin) taps:
    (grad_x (N, Cin), grad_w9 (9·Cin, Cout)), both float32, accumulated with atomics."""
    m, cin, cout = idx.shape[0], x.shape[1], w9.shape[1]
    n = x.shape[0]
    upcast = x.device.type == "cpu"
    grad_weight, grad_input = _backward_kernels()
    gx = gw = None
    if need_w:
        gw = torch.zeros(9 * cin, cout, dtype=torch.float32, device=x.device)
        br = 64 if cin % 64 == 0 else 32 if cin % 32 == 0 else 16
        bn = 128 if cout >= 128 else max(16, 1 << (cout - 1).bit_length())
        chunk = 4096 if x.is_cuda else 64
        grid = (9 * cin // br, triton_cdiv(cout, bn), triton_cdiv(m, chunk))
        grad_weight[grid](
            x, idx, grad_out, gw, m, n, cin, cout, chunk, BR=br, BN=bn, BM=64, UPCAST=upcast,
            num_warps=4,
        )  # fmt: skip
    if need_x:
        gx = torch.zeros(n, cin, dtype=torch.float32, device=x.device)
        bc = 128 if cin >= 128 else max(16, 1 << (cin - 1).bit_length())
        bo = 64 if cout >= 64 else max(16, 1 << (cout - 1).bit_length())
        grid = (triton_cdiv(m, 64), triton_cdiv(cin, bc), 9)
        grad_input[grid](
            grad_out, idx, w9, gx, m, n, cin, cout, BM=64, BC=bc, BO=bo, UPCAST=upcast,
            num_warps=4,
        )  # fmt: skip
    return gx, gw
