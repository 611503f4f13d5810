"""Inference speed-ups of the adaptive network: BatchNorm folding (dense and adaptive), the
sync-free single-pass layout, and the fused gather + GEMM kernel (Triton, run here through its CPU
interpreter) — each must compute what the plain model computes."""

import collections
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from cadist.adaptive.folded import FoldedAdaptiveBottleneck, gather_conv
from cadist.adaptive.layout import MixedLayout
from cadist.nets.build import build_model
from cadist.nets.fold import fold_batchnorm

from .test_adaptive import _oracle_elements, _random_mask, _randomise_bn


class KernelOps(TorchDispatchMode):
    """Counts dispatched ops that compute (views and aliases excluded): a proxy for launches."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        ret = func._schema.returns
        if not (ret and ret[0].alias_info is not None and not ret[0].alias_info.is_write):
            self.counts[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def _model(name, os_=8):
    torch.manual_seed(1)
    m = build_model(name, os_).eval()
    _randomise_bn(m)
    return m


@pytest.mark.parametrize(
    "name,with_mask",
    [
        ("deeplabv3_resnet_tiny", False),
        ("deeplabv3_batch_ap_resnet_tiny", False),  # edge mask from the image
        ("deeplabv3_batch_ap_resnet_tiny", True),  # a random multi-level mask per image
    ],
)
def test_folded_model_computes_the_same_logits(name, with_mask):
    model = _model(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fast = fold_batchnorm(model)
    x = torch.randn(2, 3, 64, 128)
    kw = {}
    if with_mask:
        g = torch.Generator().manual_seed(5)
        kw["mask"] = torch.stack([_random_mask(g, 8, 16).clamp(max=1) for _ in range(2)])
    with torch.no_grad():
        ref, got = model(x, **kw), fast(x, **kw)
    assert (got - ref).abs().max() <= 1e-4 * ref.abs().max()
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in fast.modules())
    # the original is untouched and still has its BatchNorms
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    if "batch_ap" in name:
        assert sum(isinstance(m, FoldedAdaptiveBottleneck) for m in fast.modules()) == 2
        assert torch.equal(fast.last_mask, model.last_mask)


def test_folded_learned_inference_network_computes_the_same_logits():
    torch.manual_seed(4)
    net = build_model("deeplabv3_ad_resnet_tiny", network="inference", mask_sampling="argmax")
    _randomise_bn(net.eval())
    fast = fold_batchnorm(net)
    x = torch.randn(2, 3, 64, 128)
    with torch.no_grad():
        ref, got = net(x), fast(x)
    assert torch.equal(fast.last_mask, net.last_mask)  # the estimator has no BN: same mask
    assert (got - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_folded_bf16_model_is_close_to_fp32():
    model = _model("deeplabv3_batch_ap_resnet_tiny")
    fast = fold_batchnorm(model).to(torch.bfloat16)
    x = torch.randn(2, 3, 64, 128)
    mask = torch.zeros(2, 8, 16, dtype=torch.long)
    mask[:, :4, 8:] = 1
    with torch.no_grad():
        ref, got = model(x, mask=mask), fast(x.bfloat16(), mask=mask).float()
    assert got.dtype == torch.float32 and (got - ref).norm() / ref.norm() < 3e-2


def test_folded_adaptive_stages_dispatch_fewer_ops():
    """Per adaptive block the folded form runs ~1/3 of the ops (no BN, fused bias/ReLU, no padded
    copy, no weight re-layout); the layout is built with a bounded number of ops."""
    model = _model("deeplabv3_batch_ap_resnet_tiny")
    fast = fold_batchnorm(model)
    x = torch.randn(1, 3, 64, 128)
    mask = torch.zeros(1, 8, 16, dtype=torch.long)
    mask[:, 4:, :8] = 1
    with torch.inference_mode():
        feats = model.backbone.dense_part(x)
        f = MixedLayout.from_dense(feats)
        counts = []
        for m in (model, fast):
            layout = m.backbone.layout(mask, x.device)
            h = f
            with KernelOps() as ops:
                for name in m.backbone.adaptive:
                    h = getattr(m.backbone, name)(h, layout)
            counts.append(ops.total)
        with KernelOps() as ops:
            model.backbone.layout(mask, x.device, check=False)
    assert counts[1] * 2 <= counts[0], counts
    assert ops.counts["nonzero"] <= 2 and ops.total < 200, ops.counts


def test_single_pass_layout_matches_the_oracle_lists():
    g = torch.Generator().manual_seed(11)
    mask = torch.stack([_random_mask(g, 16, 24) for _ in range(3)])
    layout = MixedLayout(mask, 2)
    for k in range(3):
        e = layout.elements(k)
        offset = 0
        for i in range(3):
            ref, look = _oracle_elements(mask[i], k)  # [(level, y0, x0)] in §3.2 order
            n = len(ref)
            for (y, x), j in look.items():
                assert int(e.lookup[i, y, x]) == offset + j
            got = list(
                zip(
                    e.level[offset : offset + n].tolist(),
                    e.y0[offset : offset + n].tolist(),
                    e.x0[offset : offset + n].tolist(),
                    strict=True,
                )
            )
            assert got == [tuple(r) for r in ref]
            assert (e.b[offset : offset + n] == i).all() and int(e.counts[i]) == n
            offset += n
        assert offset == e.n


def test_gather_conv_chunks_agree():
    torch.manual_seed(0)
    x = torch.randn(41, 8)
    x[40] = 0
    idx = torch.randint(0, 41, (33, 9))
    w9, b = torch.randn(72, 5), torch.randn(5)
    whole = gather_conv(x, idx, w9, b, relu=True)
    ref = torch.relu(x[idx].reshape(33, 72) @ w9 + b)
    assert torch.allclose(whole, ref, atol=1e-5)
    from cadist.adaptive import folded

    saved = dict(folded.GATHER_BYTES)
    folded.GATHER_BYTES["cpu"] = 9 * 8 * 4 * 5  # 5 rows per chunk
    try:
        assert torch.allclose(gather_conv(x, idx, w9, b, relu=True), whole, atol=1e-6)
    finally:
        folded.GATHER_BYTES.update(saved)


def test_fold_rejects_a_model_without_conv_bn_pairs():
    with pytest.raises(ValueError, match="no convolution"):
        fold_batchnorm(nn.Sequential(nn.Linear(3, 4)))


# -- the Triton kernel, through Triton's CPU interpreter ---------------------------------------
KERNEL_CHECK = textwrap.dedent(
    """
    import torch
    from cadist.adaptive import kernels
    from cadist.adaptive.folded import gather_conv
    from cadist.adaptive.ops import irregular_conv
    from cadist.nets.build import build_model
    from cadist.nets.fold import fold_batchnorm

    torch.manual_seed(0)
    # sizes off the tile grid; idx == n reads zeros (taps outside the image)
    for n, m, cin, cout in ((40, 37, 24, 40), (300, 260, 64, 128), (5, 3, 16, 16)):
        x = torch.randn(n, cin)
        idx = torch.randint(0, n + 1, (m, 9))
        w9, b = torch.randn(9 * cin, cout), torch.randn(cout)
        xp = torch.cat([x, torch.zeros(1, cin)])
        ref = gather_conv(xp, idx, w9, b, relu=True)
        got = kernels.gather_gemm(x, idx, w9, b, relu=True)
        assert (got - ref).abs().max() < 1e-4 * ref.abs().max(), (n, m)
        ref = torch.cat([x, torch.zeros(1, cin)])[idx].reshape(m, -1) @ w9
        got = kernels.gather_gemm(x.bfloat16(), idx, w9.bfloat16()).float()
        assert got.dtype == torch.float32 and (got - ref).norm() / ref.norm() < 1e-2

    # the training form: forward through the kernel, gradients as before
    x = torch.randn(50, 16, requires_grad=True)
    w = torch.randn(24, 16, 3, 3, requires_grad=True)
    idx = torch.randint(0, 51, (44, 9))
    outs = []
    for impl in ("torch", "triton"):
        kernels.set_impl(impl)
        y = irregular_conv(x, w, idx)
        gx, gw = torch.autograd.grad((y * y).sum(), (x, w))
        outs.append((y.detach(), gx, gw))
    for a, b in zip(*outs):
        assert (a - b).abs().max() < 1e-4 * b.abs().max()

    # the fused backward directly: odd sizes, taps outside the image, Cin = 48 (16-row blocks)
    for n, m, cin, cout in ((130, 200, 32, 40), (20, 9, 48, 16)):
        x, go = torch.randn(n, cin), torch.randn(m, cout)
        idx, w9 = torch.randint(0, n + 1, (m, 9)), torch.randn(9 * cin, cout)
        gx, gw = kernels.conv_backward(x, idx, w9, go, True, True)
        g = torch.cat([x, torch.zeros(1, cin)])[idx].reshape(m, -1)
        ref_x = torch.zeros(n + 1, cin).index_add_(0, idx.reshape(-1), (go @ w9.T).reshape(-1, cin))
        assert (gw - g.T @ go).abs().max() < 1e-4 * gw.abs().max()
        assert (gx - ref_x[:n]).abs().max() < 1e-4 * gx.abs().max()

    # a training step of a whole adaptive model: every gradient as with torch's path
    torch.manual_seed(2)
    net = build_model("deeplabv3_batch_ap_resnet_tiny").train()
    x = torch.randn(2, 3, 64, 128)
    grads = []
    for impl in ("torch", "triton"):
        kernels.set_impl(impl)
        net.zero_grad()
        torch.manual_seed(3)
        net(x).square().mean().backward()
        grads.append({k: p.grad.clone() for k, p in net.named_parameters()})
    for k, g in grads[0].items():
        assert (grads[1][k] - g).abs().max() <= 1e-3 * g.abs().max() + 1e-7, k

    # a whole folded adaptive model
    torch.manual_seed(1)
    model = fold_batchnorm(build_model("deeplabv3_batch_ap_resnet_tiny"))
    x = torch.randn(2, 3, 64, 128)
    with torch.no_grad():
        kernels.set_impl("torch")
        ref = model(x)
        kernels.set_impl("triton")
        got = model(x)
    assert (got - ref).abs().max() < 1e-4 * ref.abs().max()
    print("kernel ok")
    """
)


def test_fused_gather_gemm_kernel_in_the_triton_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run(
        [sys.executable, "-c", KERNEL_CHECK], env=env, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "kernel ok" in out.stdout


@pytest.mark.parametrize("dtype,precision", [("bf16", "ieee"), ("fp32", "tf32")])
def test_fused_kernel_compiles_for_hopper_with_a_pipelined_tensor_core_loop(
    dtype, precision, monkeypatch
):
    """Compiled ahead of time for sm_90 (H100/H200) with the alignment the JIT sees for torch
    tensors: the K loop must use warp-group MMAs fed by asynchronous copies (software pipelining),
    i.e. the gathered loads overlap the multiplies instead of stalling them."""
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when it is unset
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from cadist.adaptive import kernels

    names = ["x_ptr", "idx_ptr", "w_ptr", "b_ptr", "o_ptr", "M", "NROWS", "CIN", "COUT"]
    ptr = f"*{dtype}"
    sig = dict(zip(names, [ptr, "*i64", ptr, ptr, ptr, "i32", "i32", "i32", "i32"], strict=True))
    const = {"BM": 128, "BN": 128, "BK": 64, "HAS_BIAS": True, "RELU": True}
    const |= {"PRECISION": precision, "UPCAST": False}
    sig |= {k: "constexpr" for k in const}
    aligned = {(i,): [["tt.divisibility", 16]] for i in (0, 1, 2, 3, 4, 7, 8)}
    compiled = triton.compile(
        ASTSource(kernels._kernel(False), sig, const, aligned),
        target=GPUTarget("cuda", 90, 32),
        options={"num_warps": 8, "num_stages": 3},
    )
    ttgir = compiled.asm["ttgir"]
    assert "ttng.warp_group_dot" in ttgir  # Hopper tensor-core MMA
    assert ttgir.count("ttg.async_copy_global_to_local") >= 2  # gathered A and weight tiles
    assert "cp.async" in compiled.asm["ptx"]
    # the backward kernels (gradient of the weights over elements, of the inputs by scatter)
    grad_weight, grad_input = kernels._backward_kernels()
    common = {"M": "i32", "NROWS": "i32", "CIN": "i32", "COUT": "i32"}
    for fn, sig, const in (
        (grad_weight, {"x_ptr": ptr, "idx_ptr": "*i64", "go_ptr": ptr, "gw_ptr": "*fp32"}
         | common | {"CHUNK": "i32"}, {"BR": 64, "BN": 128, "BM": 64, "UPCAST": False}),
        (grad_input, {"go_ptr": ptr, "idx_ptr": "*i64", "w_ptr": ptr, "gx_ptr": "*fp32"} | common,
         {"BM": 64, "BC": 128, "BO": 64, "UPCAST": False}),
    ):  # fmt: skip
        sig = sig | {k: "constexpr" for k in const}
        aligned = {(i,): [["tt.divisibility", 16]] for i in range(4)}
        out = triton.compile(
            ASTSource(fn, sig, const, aligned),
            target=GPUTarget("cuda", 90, 32),
            options={"num_warps": 4, "num_stages": 3},
        )
        assert "red.global" in out.asm["ptx"] or "atom.global" in out.asm["ptx"]  # the atomics
        assert "ttng.warp_group_dot" in out.asm["ttgir"] or "mma" in out.asm["ptx"]
