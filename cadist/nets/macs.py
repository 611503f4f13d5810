"""MAC counting under the method's rules (method.md §10.1), per image.

Forward hooks on the modules that actually run:
* convolutions: kernel size × Cin/groups × Cout × output positions (+ Cout × positions with a bias);
* BatchNorm: 2 × input values; ReLU modules: output values; pooling modules: input values;
* not counted: interpolation, functional activations, residual additions, dropout, index work.

Dense models are counted on the `meta` device: shapes only, no arithmetic, so ResNet-101 at
1024×2048 takes well under a second. Unit: GMac = 1e9 of the above.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

_POOLS = (
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
)
_BNS = (nn.BatchNorm1d, nn.BatchNorm2d)


@dataclass
class MacCount:
    """Counts per category (conv, bn, relu, pool) in MACs for one image: `by_kind` under the
    method's rules, `actual_by_kind` what cadist computes (they differ only for adaptive models,
    whose strided convolution is evaluated at the kept elements only)."""

    by_kind: dict[str, float] = field(default_factory=lambda: dict.fromkeys(_KINDS, 0.0))
    actual_by_kind: dict[str, float] = field(default_factory=lambda: dict.fromkeys(_KINDS, 0.0))

    @property
    def total(self) -> float:
        return sum(self.by_kind.values())

    def gmac(self, kind: str | None = None, actual: bool = False) -> float:
        d = self.actual_by_kind if actual else self.by_kind
        return (sum(d.values()) if kind is None else d[kind]) / 1e9


_KINDS = ("conv", "bn", "relu", "pool")


def conv_macs(module: nn.Module, out: torch.Tensor) -> float:
    """MACs of one convolution call per image; `out` is (B, Cout, *spatial)."""
    k = math.prod(module.kernel_size)
    positions = math.prod(out.shape[2:])
    macs = k * (module.in_channels // module.groups) * module.out_channels * positions
    if module.bias is not None:
        macs += module.out_channels * positions
    return float(macs)


def module_macs(
    module: nn.Module, inp: torch.Tensor, out: torch.Tensor
) -> tuple[str, float, float] | None:
    """(kind, MACs under the rules, MACs computed) of one module call per image, or None.

    Dense modules count per image (divided by the batch size). Modules with a
    `count_macs(inp, out) -> (kind, rule_macs, actual_macs)` method (the element-list operations
    of the adaptive networks) count the whole call: count those with batch size 1.
    """
    if hasattr(module, "count_macs"):
        return module.count_macs(inp, out)
    b = out.shape[0] if out.dim() > 0 else 1
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        m = conv_macs(module, out)
        return "conv", m, m
    if isinstance(module, _BNS):
        m = 2.0 * inp.numel() / b
        return "bn", m, m
    if isinstance(module, nn.ReLU):
        m = float(out.numel()) / b
        return "relu", m, m
    if isinstance(module, _POOLS):
        m = float(inp.numel()) / b
        return "pool", m, m
    return None


class MacCounter:
    """Context manager: counts MACs of every call of the given root modules' leaf modules.

    with MacCounter(backbone=model.backbone, head=model.classifier) as c:
        model(x)
    c.counts["backbone"].gmac()
    """

    def __init__(self, **roots: nn.Module):
        self.roots = roots
        self.counts = {name: MacCount() for name in roots}
        self._handles: list = []

    def __enter__(self) -> MacCounter:
        for name, root in self.roots.items():
            for m in root.modules():
                if hasattr(m, "count_macs") or not list(m.children()):
                    self._handles.append(m.register_forward_hook(self._hook(name)))
        return self

    def _hook(self, name: str):
        def hook(module, inputs, output):
            got = module_macs(module, inputs[0], output)
            if got is not None:
                kind, rule, actual = got
                self.counts[name].by_kind[kind] += rule
                self.counts[name].actual_by_kind[kind] += actual

        return hook

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def count_dense(
    name: str, output_stride: int, height: int, width: int, num_classes: int = 19
) -> dict:
    """Backbone, head and total GMac of a dense model for one H×W image (shapes only)."""
    from cadist.nets.build import build_model

    with torch.device("meta"):
        model = build_model(name, output_stride, num_classes).eval()
        x = torch.empty(1, 3, height, width)
    with torch.no_grad(), MacCounter(backbone=model.backbone, head=model.classifier) as c:
        model(x)
    bb, hd = c.counts["backbone"], c.counts["head"]
    return {
        "model": name,
        "output_stride": output_stride,
        "input_hw": [height, width],
        "backbone_gmac": bb.gmac(),
        "head_gmac": hd.gmac(),
        "total_gmac": bb.gmac() + hd.gmac(),
        "backbone_conv_gmac": bb.gmac("conv"),
        "head_conv_gmac": hd.gmac("conv"),
    }


def count_adaptive(
    name: str,
    mask: torch.Tensor,
    height: int,
    width: int,
    adaptive_mode: str = "os8to16",
    num_classes: int = 19,
    head: str = "dense",
) -> dict:
    """GMac of an adaptive model for one image with pooling mask `mask` (1, H0, W0), shapes only.
    `head` "adaptive": the head on the element list, counted by the same rules (content-dependent).

    `backbone_gmac` follows the method's rules (§10.1, including the strided conv charged at every
    input element); `backbone_gmac_actual` is what cadist computes. `edge_gmac` is the two gradient
    convolutions of the edge mask, reported separately (§10.2); learned-mask models report
    `mask_estimator_gmac` instead, which is part of their backbone count."""
    from cadist.adaptive.masks import high_res_fraction
    from cadist.nets.build import build_model

    if mask.dim() != 3 or mask.shape[0] != 1:
        raise ValueError(f"count one image at a time: mask (1, H0, W0), got {tuple(mask.shape)}")
    with torch.device("meta"):
        model = build_model(name, adaptive_mode=adaptive_mode, num_classes=num_classes,
                            network="inference", head=head).eval()  # fmt: skip
        x = torch.empty(1, 3, height, width)
    estimator = model.backbone.mask_estimator  # learned mode: part of the backbone (§10.2)
    with torch.no_grad(), MacCounter(backbone=model.backbone, head=model.classifier) as c:
        model(x, mask=mask.cpu())
        est_gmac = 0.0
        if estimator is not None:
            before = c.counts["backbone"].gmac()
            estimator(torch.empty(1, model.backbone.spec.layer2_channels, *mask.shape[1:]))
            est_gmac = c.counts["backbone"].gmac() - before
    bb, hd = c.counts["backbone"], c.counts["head"]
    extra = (
        {"mask_estimator_gmac": est_gmac}
        if estimator is not None
        else {"edge_gmac": 2 * 9 * height * width / 1e9}
    )
    return {
        "model": name,
        "adaptive_mode": adaptive_mode,
        "head": head,
        "input_hw": [height, width],
        "high_res_fraction": float(high_res_fraction(mask)[0]),
        "backbone_gmac": bb.gmac(),
        "backbone_gmac_actual": bb.gmac(actual=True),
        "head_gmac": hd.gmac(),
        "total_gmac": bb.gmac() + hd.gmac(),
        "total_gmac_actual": bb.gmac(actual=True) + hd.gmac(actual=True),
        **extra,
    }
