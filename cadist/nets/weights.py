"""Loading and saving weights: torchvision ImageNet backbones, the reference's released checkpoints,
torchvision DeepLabv3 state dicts, and cadist's own weights-only export (method.md §2.3).

Everything a user hands in is read with `torch.load(..., weights_only=True)`. A mismatch is one
`CheckpointError` that lists the missing and unexpected names and the shapes that disagree.
"""

from __future__ import annotations

import os
import pickle
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from cadist.errors import CheckpointError

EXPORT_FORMAT = 1  # version of cadist's weights-only export


def read_file(path: str | Path) -> object:
    """`torch.load(path, weights_only=True)` with errors a user can act on."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    with open(path, "rb") as f:
        head = f.read(4)
    # torch.save writes a zip archive (PK\x03\x04); older PyTorch a pickle (protocol byte \x80)
    if not head:
        raise CheckpointError(
            f"{path}: is empty (0 bytes), not a PyTorch checkpoint; the download or copy did not "
            f"finish — fetch it again"
        )
    if not (head == b"PK\x03\x04" or head[:1] == b"\x80"):
        raise CheckpointError(
            f"{path}: not a PyTorch checkpoint (it starts with {head!r}; torch.save writes a zip "
            f"archive); pass a .pth/.pt file written by torch.save — e.g. a cadist export, a "
            f"checkpoint folder's model.pt or torchvision's weights"
        )
    try:
        with warnings.catch_warnings():  # (a pickle's protocol notice: the error below says it)
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exn:
        if "Unsupported global" in str(exn):  # (not an unknown opcode: a damaged pickle)
            raise CheckpointError(
                f"{path}: holds Python objects other than tensors and plain containers; cadist only "
                f"loads weights (weights_only=True). Re-save it with "
                f"torch.save(model.state_dict(), ...)"
            ) from None
        why = [ln for ln in str(exn).splitlines() if ln.strip()][-2:][0][:200]
        raise CheckpointError(
            f"{path}: not a PyTorch checkpoint cadist can read tensor-only ({why}); pass a file "
            f"written by torch.save (a plain pickle is refused: it can run code)"
        ) from None
    except Exception as exn:  # a damaged file surfaces as zip, pickle, key or runtime errors
        raise CheckpointError(
            f"{path}: cannot be read as a PyTorch checkpoint "
            f"({type(exn).__name__}: {str(exn).splitlines()[0][:200]}); the file is "
            f"truncated or not a .pth file — download or copy it again"
        ) from None


def _strip(sd: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    if sd and all(k.startswith(prefix) for k in sd):
        return {k[len(prefix) :]: v for k, v in sd.items()}
    return dict(sd)


def _is_state_dict(obj) -> bool:
    return (
        isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values())
    )


def model_state_from(obj, path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(whole-model state dict in cadist/reference names, metadata) from any supported file layout."""
    meta = {}
    if isinstance(obj, Mapping) and obj.get("cadist_format") is not None:
        meta = {k: v for k, v in obj.items() if k != "state_dict"}
        sd = obj["state_dict"]
    elif isinstance(obj, Mapping) and "model_state" in obj:  # reference release
        meta = {k: obj[k] for k in ("cur_itrs", "best_score") if k in obj}
        sd = obj["model_state"]
    elif isinstance(obj, Mapping) and "state_dict" in obj and _is_state_dict(obj["state_dict"]):
        sd = obj["state_dict"]
    elif _is_state_dict(obj):
        sd = obj
    else:
        kind = type(obj).__name__
        keys = list(obj)[:8] if isinstance(obj, Mapping) else []
        raise CheckpointError(
            f"{path}: a {kind} with keys {keys} is not a model checkpoint; expected "
            f"a state dict, a reference checkpoint with 'model_state', or a cadist "
            f"export"
        )
    sd = _strip(sd, "module.")
    from cadist.adaptive.convert import from_reference, is_reference_adaptive_layout

    if is_reference_adaptive_layout(sd):  # the reference's released edge model (§4.4)
        sd = from_reference(sd)
    if any(k.startswith("classifier.0.convs") for k in sd):  # torchvision DeepLabv3 layout
        sd = {
            ("classifier." + k if k.startswith("classifier.") else k): v
            for k, v in sd.items()
            if not k.startswith("aux_classifier.")
        }
    return sd, meta


def check_and_load(
    module: nn.Module, sd: Mapping[str, torch.Tensor], path: Path, what: str
) -> None:
    """Load `sd` strictly into `module`; on any mismatch raise one error listing all of it."""
    own = module.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [
        f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in sd and sd[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:

        def lst(items):
            return ", ".join(items[:6]) + (f", … ({len(items)} in all)" if len(items) > 6 else "")

        parts = [f"{path}: does not fit {what}"]
        if missing:
            parts.append(f"missing {lst(missing)}")
        if unexpected:
            parts.append(f"unexpected {lst(unexpected)}")
        if shapes:
            parts.append(f"shapes differ: {lst(shapes)}")
        parts.append("check --model/--output-stride against the file (or the file against the job)")
        raise CheckpointError("; ".join(parts))
    module.load_state_dict(sd, strict=True)


def load_backbone(model: nn.Module, path: str | Path) -> None:
    """Initialise `model.backbone` from a torchvision ImageNet ResNet state dict (fc is dropped)."""
    path = Path(path)
    obj = read_file(path)
    if not _is_state_dict(obj):
        raise CheckpointError(
            f"{path}: expected a torchvision ResNet state dict (name → tensor), "
            f"e.g. resnet101-63fe2227.pth"
        )
    sd = {
        k: v
        for k, v in _strip(_strip(obj, "module."), "backbone.").items()
        if not k.startswith("fc.")
    }
    if hasattr(model.backbone, "layer3_high_res"):  # learned-mask training network (§7.3)
        from cadist.adaptive.learned import expand_imagenet

        sd = expand_imagenet(sd)  # both branches start from the same weights
        own = model.backbone.state_dict()  # the mask estimator keeps its initialisation
        sd.update({k: v for k, v in own.items() if k.startswith("mask_estimator.")})
    check_and_load(model.backbone, sd, path, "the backbone (torchvision ResNet names)")


def dense_start(meta: Mapping, name: str) -> bool:
    """Whether weights recorded as `meta` are the dense OS8 model an edge model `name` may start
    from: its layers keep the dense names and shapes (method §4.4), so e.g.
    `deeplabv3_resnet_tiny` at output stride 8 starts `deeplabv3_batch_ap_resnet_tiny`."""
    return (
        name.startswith("deeplabv3_batch_ap_")
        and meta.get("model") == name.replace("batch_ap_", "", 1)
        and str(meta.get("output_stride")) == "8"
    )


def load_weights(model: nn.Module, path: str | Path, expect_name: str | None = None) -> dict:
    """Load a whole-model checkpoint (reference release, torchvision, plain or cadist export).

    Returns the file's metadata (e.g. `best_score`, `model`, `output_stride`).
    """
    path = Path(path)
    sd, meta = model_state_from(read_file(path), path)
    if (
        expect_name
        and meta.get("model")
        and meta["model"] != expect_name
        and not dense_start(meta, expect_name)
    ):
        raise CheckpointError(
            f"{path}: holds weights of {meta['model']} (output stride "
            f"{meta.get('output_stride')}), not {expect_name}; pass --model "
            f"{meta['model']}"
        )
    from cadist.adaptive import learned

    if learned.is_training_layout(sd):  # a learned-mask training checkpoint (§7.6)
        sd = learned.without_leftovers(sd)
        if not hasattr(getattr(model, "backbone", None), "layer3_high_res"):
            sd = learned.inference_state(sd)  # → the irregular inference network (§7.5)
    check_and_load(model, sd, path, f"model {expect_name or type(model).__name__}")
    return meta


def save_weights(net: nn.Module, path: str | Path, **meta) -> Path:
    """cadist's weights-only export, written atomically: {cadist_format, state_dict, **meta}.

    `meta` holds plain values, e.g. model="deeplabv3_resnet101", output_stride=8, step=..."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    sd = {
        k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu()
        for k, v in net.state_dict().items()
    }  # bf16 training exports fp32 weights
    torch.save({"cadist_format": EXPORT_FORMAT, **meta, "state_dict": sd}, tmp)
    os.replace(tmp, path)
    return path
