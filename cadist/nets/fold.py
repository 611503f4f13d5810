"""BatchNorm folding for inference: every eval-mode BN that directly follows a convolution becomes
part of that convolution. The folded model computes the same function (to float round-off) with
fewer passes over memory and fewer kernel launches; it has no BN left to train.

    fast = fold_batchnorm(model)            # a copy; `model` is untouched
    fast = fold_batchnorm(model).to(torch.bfloat16)   # half-precision inference, no autocast
"""

from __future__ import annotations

import copy

from torch import nn

from cadist.adaptive.folded import FoldedAdaptiveBottleneck, fold_affine
from cadist.adaptive.ops import IrregularConv3x3, ListBatchNorm, PointwiseConv
from cadist.adaptive.resnet import AdaptiveBottleneck

#: (convolution, the BatchNorm after it) pairs that fold: dense, and on element lists (the
#: adaptive head's)
_CONVS = (nn.Conv2d, PointwiseConv, IrregularConv3x3)
_BNS = (nn.BatchNorm2d, nn.SyncBatchNorm, ListBatchNorm)


def _fold_pair(conv: nn.Module, bn: nn.Module) -> nn.Module:
    w, b = fold_affine(
        conv.weight.detach(), bn, conv.bias.detach() if conv.bias is not None else None
    )
    out = copy.deepcopy(conv)
    out.weight = nn.Parameter(w, requires_grad=False)
    out.bias = nn.Parameter(b, requires_grad=False)
    return out


def _fold(module: nn.Module) -> int:
    folded = 0
    for name, child in list(module.named_children()):
        if isinstance(child, AdaptiveBottleneck):
            setattr(module, name, FoldedAdaptiveBottleneck(child))
            folded += 1
        else:
            folded += _fold(child)
    # cadist's modules register each BN right after the conv it normalises (conv1, bn1, …;
    # Sequential(conv, bn, relu)), and their forward applies it right after that conv
    names = list(module._modules)
    for a, b in zip(names, names[1:], strict=False):
        conv, bn = module._modules[a], module._modules[b]
        if isinstance(conv, _CONVS) and isinstance(bn, _BNS):
            module._modules[a] = _fold_pair(conv, bn)
            module._modules[b] = nn.Identity()
            folded += 1
    return folded


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """An eval-mode copy of a cadist model (dense or adaptive ResNet / DeepLabv3) with BN folded.
    Raises ValueError when nothing folds (not a cadist model)."""
    out = copy.deepcopy(model).eval()
    if _fold(out) == 0:
        raise ValueError(f"{type(model).__name__}: no convolution + BatchNorm pair to fold")
    for p in out.parameters():
        p.requires_grad_(False)
    return out
