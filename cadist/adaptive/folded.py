"""Inference form of the adaptive bottleneck: BatchNorm folded into the convolutions (eval-mode BN
is an affine map per channel), weights stored in the layout the matrix multiplies read, bias and
ReLU applied in the same pass. About a third of the kernel launches of the training form, which is
what bounds the adaptive stages on a GPU (the lists are short, the launches many).

Built by `cadist.nets.fold.fold_batchnorm`; not trainable and not a checkpoint format.
"""

from __future__ import annotations

import torch
from torch import nn

from cadist.adaptive import kernels
from cadist.adaptive.gather import GATHER_BYTES, addmm_relu, gather_mm  # noqa: F401 (GATHER_BYTES: re-export)
from cadist.adaptive.layout import MixedLayout
from cadist.adaptive.resnet import BlockTables


def fold_affine(weight: torch.Tensor, bn: nn.modules.batchnorm._BatchNorm, bias=None):
    """Eval-mode `bn(conv(x))` as one conv: (Cout, …) weight scaled per output channel, new bias.
    Computed in float64, returned in the weight's dtype."""
    if bn.running_mean is None or bn.running_var is None or not bn.affine:
        raise ValueError("only BatchNorm with running statistics and affine parameters folds")
    scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    b = bias.double() if bias is not None else torch.zeros_like(scale)
    new_b = (b - bn.running_mean.double()) * scale + bn.bias.double()
    shape = (-1,) + (1,) * (weight.dim() - 1)
    return (weight.double() * scale.view(shape)).to(weight.dtype), new_b.to(weight.dtype)


def gather_conv(
    x: torch.Tensor, idx: torch.Tensor, w9: torch.Tensor, bias: torch.Tensor, relu: bool
) -> torch.Tensor:
    """Irregular 3×3 conv (§3.4) for inference: x (N+1, Cin) with row N zero, idx (M, 9) rows of x,
    w9 (9·Cin, Cout) tap-major → (M, Cout) = [relu](Σ_taps x[idx]·W_tap + bias)."""
    if kernels.use_triton(x):
        return kernels.gather_gemm(x, idx, w9, bias, relu)
    return gather_mm(x, idx, w9, bias, relu)


class FoldedAdaptiveBottleneck(BlockTables, nn.Module):
    """`AdaptiveBottleneck` with BN folded: x (N_{k_in}, Cin) → (N_k, 4·planes), no autograd.

    Buffers (so `.to(dtype)` casts them): w1 (Cin, P), w9 (9P, P), w3 (P, 4P), wd (Cin, 4P) or
    None, with biases b1, b2, b3 (b3 already includes the projection shortcut's bias)."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.t, self.step = block.t, block.step
        w1, b1 = fold_affine(block.conv1.weight.detach().flatten(1), block.bn1)
        w2, b2 = fold_affine(block.conv2.weight.detach(), block.bn2)
        w3, b3 = fold_affine(block.conv3.weight.detach().flatten(1), block.bn3)
        cout, cin = w2.shape[:2]
        self.register_buffer("w1", w1.t().contiguous())
        self.register_buffer("b1", b1)
        self.register_buffer("w9", w2.permute(2, 3, 1, 0).reshape(9 * cin, cout).contiguous())
        self.register_buffer("b2", b2)
        self.register_buffer("w3", w3.t().contiguous())
        if block.downsample is not None:
            conv, bn = block.downsample
            wd, bd = fold_affine(conv.weight.detach().flatten(1), bn)
            self.register_buffer("wd", wd.t().contiguous())
            self.register_buffer("b3", b3 + bd)
        else:
            self.wd = None
            self.register_buffer("b3", b3)

    def forward(self, x: torch.Tensor, layout: MixedLayout, k_in: int) -> torch.Tensor:
        idx, keep = self.tables(layout, k_in)
        n, planes = x.shape[0], self.w1.shape[1]
        h = x.new_empty(n + 1, planes)  # row n: the zero read by taps outside the image
        addmm_relu(self.b1, x, self.w1, out=h[:n])
        h[n].zero_()
        h = gather_conv(h, idx, self.w9, self.b2, relu=True)
        if self.wd is not None:
            xs = x if keep is None else x.index_select(0, keep)
            return addmm_relu(torch.addmm(self.b3, xs, self.wd), h, self.w3)
        return addmm_relu(x + self.b3, h, self.w3)
