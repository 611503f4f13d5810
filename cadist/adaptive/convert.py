"""Checkpoint layouts of the adaptive models (method.md §4.4).

cadist's adaptive models keep the dense names and shapes, so a dense OS8 checkpoint (or ImageNet
backbone) loads unchanged. The reference's released edge model stores layer3/layer4 differently:

  …layerK.i.conv2.weight  (C, C, 3, 3)   ↔  …layerK.i.conv2.conv.weight  (C, C, 9, 1), taps row-major
  …layerK.i.conv1/conv3.weight (Co, Ci, 1, 1) ↔ same name, (Co, Ci, 1)
  …layerK.0.downsample.0.weight           ↔  …layerK.0.downsample.conv1.weight (Co, Ci, 1)
  …layerK.0.downsample.1.*                ↔  …layerK.0.downsample.norm1.*
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

_ADAPTIVE_STAGE = re.compile(r"^(backbone\.layer[34]\.\d+\.)(.*)$")


def is_reference_adaptive_layout(sd: Mapping[str, torch.Tensor]) -> bool:
    return any(k.endswith(".conv2.conv.weight") or ".downsample.norm1." in k for k in sd)


def from_reference(
    sd: Mapping[str, torch.Tensor], stages: tuple[str, ...] = ("layer3", "layer4")
) -> dict[str, torch.Tensor]:
    """Reference edge-model state dict → cadist (dense) names and shapes."""
    out = {}
    for k, v in sd.items():
        m = _ADAPTIVE_STAGE.match(k)
        if not m or m.group(1).split(".")[1] not in stages:
            out[k] = v
            continue
        pre, rest = m.groups()
        if rest == "conv2.conv.weight":
            c_out, c_in = v.shape[:2]
            out[pre + "conv2.weight"] = v.reshape(c_out, c_in, 3, 3)
        elif rest in ("conv1.weight", "conv3.weight") and v.dim() == 3:
            out[pre + rest] = v.unsqueeze(-1)
        elif rest == "downsample.conv1.weight":
            out[pre + "downsample.0.weight"] = v.unsqueeze(-1) if v.dim() == 3 else v
        elif rest.startswith("downsample.norm1."):
            out[pre + "downsample.1." + rest[len("downsample.norm1.") :]] = v
        else:
            out[k] = v
    return out


def to_reference(
    sd: Mapping[str, torch.Tensor], stages: tuple[str, ...] = ("layer3", "layer4")
) -> dict[str, torch.Tensor]:
    """cadist adaptive (dense-named) state dict → the reference's edge-model layout."""
    out = {}
    for k, v in sd.items():
        m = _ADAPTIVE_STAGE.match(k)
        if not m or m.group(1).split(".")[1] not in stages:
            out[k] = v
            continue
        pre, rest = m.groups()
        if rest == "conv2.weight":
            out[pre + "conv2.conv.weight"] = v.reshape(v.shape[0], v.shape[1], 9, 1)
        elif rest in ("conv1.weight", "conv3.weight"):
            out[pre + rest] = v.squeeze(-1)
        elif rest == "downsample.0.weight":
            out[pre + "downsample.conv1.weight"] = v.squeeze(-1)
        elif rest.startswith("downsample.1."):
            out[pre + "downsample.norm1." + rest[len("downsample.1.") :]] = v
        else:
            out[k] = v
    return out
