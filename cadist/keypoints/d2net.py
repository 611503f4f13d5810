"""D2-Net's feature network (VGG-16 to conv4_3, method.md §11.1) at output stride 1, 2, 4 or 8, and
APD2Net (§11.4): dense until the start stride s, then every remaining 2×2 max-pool becomes the
max-pool adaptive step of §3.5 and every later 3×3 conv an irregular conv with t = 2^k on the s-grid.

Parameter names are the released model's: `dense_feature_extraction.model.{0,2,5,7,10,12,14,17,19,21}`
(conv1_1 … conv4_3), in both networks (the adaptive convs keep the dense shapes).
"""

from __future__ import annotations

import torch
from torch import nn

from cadist.adaptive.layout import MixedLayout
from cadist.adaptive.ops import IrregularConv3x3, ListMaxPool, ListReLU

#: (index in `model`, kind, channels out); kinds: conv, relu, pool
LAYERS = [
    (0, "conv", 64), (1, "relu", 0), (2, "conv", 64), (3, "relu", 0), (4, "pool", 0),
    (5, "conv", 128), (6, "relu", 0), (7, "conv", 128), (8, "relu", 0), (9, "pool", 0),
    (10, "conv", 256), (11, "relu", 0), (12, "conv", 256), (13, "relu", 0),
    (14, "conv", 256), (15, "relu", 0), (16, "pool", 0),
    (17, "conv", 512), (18, "relu", 0), (19, "conv", 512), (20, "relu", 0),
    (21, "conv", 512), (22, "relu", 0),
]  # fmt: skip
POOLS = (4, 9, 16)
OUTPUT_STRIDES = (1, 2, 4, 8)


def _convs():
    cin = 3
    for idx, kind, cout in LAYERS:
        if kind == "conv":
            yield idx, cin, cout
            cin = cout


def kept_pools(stride: int) -> int:
    """How many of the three pools a network at this output stride keeps (OS8: 3, OS1: 0)."""
    if stride not in OUTPUT_STRIDES:
        raise ValueError(f"output stride {stride}: expected one of {OUTPUT_STRIDES}")
    return stride.bit_length() - 1


class _Features(nn.Module):
    """Holds `model` so that parameter names read `dense_feature_extraction.model.N.*`."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model


class D2NetDense(nn.Module):
    """(B, 3, H, W) caffe-normalised BGR → (B, 512, H/os, W/os) non-negative features (§11.1):
    pools beyond the first log2(os) are removed and later convs dilated instead."""

    def __init__(self, output_stride: int = 4):
        super().__init__()
        keep = kept_pools(output_stride)
        self.output_stride = output_stride
        layers: list[nn.Module] = []
        dilation, pools_seen = 1, 0
        convs = dict((i, (ci, co)) for i, ci, co in _convs())
        for idx, kind, _ in LAYERS:
            if kind == "conv":
                ci, co = convs[idx]
                layers.append(nn.Conv2d(ci, co, 3, padding=dilation, dilation=dilation))
            elif kind == "relu":
                layers.append(nn.ReLU(inplace=True))
            else:
                pools_seen += 1
                if pools_seen <= keep:
                    layers.append(nn.MaxPool2d(2, 2))
                else:  # removed: later convs see a doubled dilation instead
                    layers.append(nn.Identity())
                    dilation *= 2
        self.dense_feature_extraction = _Features(nn.Sequential(*layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_feature_extraction.model(x)


class APD2Net(nn.Module):
    """Adaptive D2-Net at start stride s ∈ {1, 2, 4}: (B, 3, H, W) + pooling mask (B, H/s, W/s)
    with values 0..L (L = log2(8/s)) → (B, 512, H/s, W/s) features on the s-grid (§3.7)."""

    def __init__(self, start_stride: int = 4):
        super().__init__()
        if start_stride not in (1, 2, 4):
            raise ValueError(f"start stride {start_stride}: expected 1, 2 or 4")
        self.start_stride = start_stride
        self.num_steps = 3 - kept_pools(start_stride)  # L
        self.first_adaptive = POOLS[kept_pools(start_stride)]  # index of the first adaptive pool
        convs = dict((i, (ci, co)) for i, ci, co in _convs())
        layers: list[nn.Module] = []
        for idx, kind, _ in LAYERS:
            adaptive = idx > self.first_adaptive
            if kind == "conv":
                ci, co = convs[idx]
                layers.append(
                    IrregularConv3x3(ci, co, bias=True)
                    if adaptive
                    else nn.Conv2d(ci, co, 3, padding=1)
                )
            elif kind == "relu":
                layers.append(ListReLU(inplace=True) if adaptive else nn.ReLU(inplace=True))
            else:
                layers.append(nn.MaxPool2d(2, 2) if idx < self.first_adaptive else ListMaxPool())
        self.dense_feature_extraction = _Features(nn.Sequential(*layers))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        model = self.dense_feature_extraction.model
        for idx in range(self.first_adaptive):  # dense until the start stride
            x = model[idx](x)
        layout = MixedLayout(mask.to("cpu" if x.is_meta else x.device), self.num_steps)
        feats = MixedLayout.from_dense(x)
        k = 0
        for idx, kind, _ in LAYERS[self.first_adaptive :]:
            if kind == "pool":
                k += 1
                feats = model[idx](feats, layout, k)
            elif kind == "conv":
                feats = model[idx](feats, layout.table(k, 1 << k))
            else:
                feats = model[idx](feats)
        self.last_layout = layout
        return layout.to_dense(feats, k)


def count_gmac(network: str, stride: int, height: int, width: int, mask=None) -> float:
    """GMac of one H×W image under the method's rules (§10.1–10.2, shapes only): dense D2-Net at
    output stride `stride`, or APD2Net at start stride `stride` with pooling mask (1, H/s, W/s)."""
    from cadist.nets.macs import MacCounter

    with torch.device("meta"):
        net = D2NetDense(stride) if network == "d2net" else APD2Net(stride)
        x = torch.empty(1, 3, height, width)
    with torch.no_grad(), MacCounter(net=net) as c:
        net(x) if network == "d2net" else net(x, mask.cpu())
    return c.counts["net"].gmac()


def load_d2net_weights(model: nn.Module, path) -> None:
    """The released D2-Net weights (`d2_tf.pth`: {"model": state dict} or a plain state dict),
    read with weights_only=True; errors list missing/unexpected names and shapes."""
    from pathlib import Path

    from cadist.nets.weights import check_and_load, read_file

    obj = read_file(path)
    sd = obj.get("model", obj) if isinstance(obj, dict) else obj
    sd = {k: v for k, v in sd.items() if k.startswith("dense_feature_extraction.")}
    check_and_load(model, sd, Path(path), f"{type(model).__name__} (D2-Net names)")


def caffe_normalise(rgb: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) RGB in 0..255 → BGR minus the ImageNet caffe means, no scaling (§11.2)."""
    mean = torch.tensor([103.939, 116.779, 123.68], device=rgb.device).view(1, 3, 1, 1)
    return rgb.flip(1).float() - mean
