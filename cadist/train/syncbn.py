"""BatchNorm synchronised across data-parallel ranks on any device (CPU/gloo included).

`torch.nn.SyncBatchNorm` refuses CPU tensors; this one computes batch statistics over the union
of all ranks' batches with one `all_reduce` per forward and one per backward, so N workers on B/N
images each train exactly like one process on B images. Parameter and buffer names are those of
`nn.BatchNorm2d`, so checkpoints are interchangeable.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(t)
    return t


class _SyncBNFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        dims = [0] + list(range(2, x.dim()))
        c = x.shape[1]
        # one all_reduce: [count, Σx, Σx²] in float64 (E[x²] − mean² is exact enough in float64)
        local = torch.cat(
            [
                torch.tensor([x.numel() / c], dtype=torch.float64, device=x.device),
                x.sum(dims, dtype=torch.float64),
                (x.double() ** 2).sum(dims),
            ]
        )
        n, s1, s2 = _all_reduce(local).split([1, c, c])
        n = float(n.item())
        mean = s1 / n
        var = (s2 / n - mean * mean).clamp_min(0)
        shape = (1, -1, *([1] * (x.dim() - 2)))
        invstd = torch.rsqrt(var + eps).to(x.dtype)
        xhat = (x - mean.to(x.dtype).view(shape)) * invstd.view(shape)
        ctx.save_for_backward(xhat, weight, invstd)
        ctx.n, ctx.dims = n, dims
        y = xhat * weight.view(shape) + bias.view(shape)
        return y, mean.to(x.dtype), (var * n / max(n - 1, 1)).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_y, _gm, _gv):
        xhat, weight, invstd = ctx.saved_tensors
        dims, n = ctx.dims, ctx.n
        shape = (1, -1, *([1] * (xhat.dim() - 2)))
        grad_bias = grad_y.sum(dims)
        grad_weight = (grad_y * xhat).sum(dims)
        both = _all_reduce(torch.cat([grad_bias, grad_weight]).to(torch.float64))
        sum_dy, sum_dy_xhat = both.split(grad_bias.numel())
        grad_x = (weight * invstd).view(shape) * (
            grad_y
            - (sum_dy / n).to(grad_y.dtype).view(shape)
            - xhat * (sum_dy_xhat / n).to(grad_y.dtype).view(shape)
        )
        return grad_x, grad_weight, grad_bias, None


class DistributedBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Drop-in BatchNorm for (N, C, H, W) maps and (N, C) element lists whose training statistics
    span all ranks of the default group."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected (N, C, …) input, got {tuple(x.shape)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (
            self.training
            and dist.is_available()
            and dist.is_initialized()
            and dist.get_world_size() > 1
        ):
            return super().forward(x)
        y, mean, var = _SyncBNFunction.apply(x, self.weight, self.bias, self.eps)
        with torch.no_grad():
            self.num_batches_tracked += 1
            m = (
                self.momentum
                if self.momentum is not None
                else 1.0 / float(self.num_batches_tracked)
            )
            self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
            self.running_var.mul_(1 - m).add_(var.detach(), alpha=m)
        return y


def convert_to_distributed_bn(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm (2-D maps and element-list BNs; in place, keeping parameters,
    buffers and momentum)."""
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(
            child, DistributedBatchNorm
        ):
            new = DistributedBatchNorm(
                child.num_features,
                child.eps,
                child.momentum,
                child.affine,
                child.track_running_stats,
            )
            new.load_state_dict(child.state_dict())
            new.to(child.weight.device)
            if child.affine:  # the same Parameter objects: ties (learned-mask branches) survive
                new.weight, new.bias = child.weight, child.bias
            setattr(module, name, new)
        else:
            convert_to_distributed_bn(child)
    return module
