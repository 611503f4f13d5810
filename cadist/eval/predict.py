"""Prediction of image files: colour-coded classes and overlays, or Cityscapes labelIds for the
benchmark; raw logits and pooling masks."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cadist.config.passes import Augmentation
from cadist.data.cityscapes import PALETTE, train_id_lut
from cadist.data.images import load_rgb
from cadist.data.transforms import normalized_input
from cadist.errors import DataError
from cadist.eval.tta import plan_passes, predict_augmented, size_multiple

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
FORMATS = ("colour", "labelids")


def image_list(
    specs: list[str | Path] | tuple[str | Path, ...], outputs: str | Path | None = None
) -> list[tuple[Path, Path]]:
    """(image, its output folder relative to --out) for each `--image`: a file → (file, "."); a
    folder → every .png/.jpg/.jpeg under it but not under `outputs` (earlier predictions), sorted,
    with its subfolder (Cityscapes' `leftImg8bit/test` → `<city>/…`). A `DataError` for a path
    that is neither, or a folder with no image, or two images that would write the same outputs."""
    skip = Path(outputs).resolve() if outputs is not None else None
    out: list[tuple[Path, Path]] = []
    for spec in specs:
        p = Path(spec)
        if p.is_dir():
            found = sorted(
                f
                for f in p.rglob("*")
                if f.suffix.lower() in IMAGE_SUFFIXES
                and not (skip and f.resolve().is_relative_to(skip))
            )
            if not found:
                raise DataError(f"--image {p}: a folder with no .png/.jpg/.jpeg image under it")
            out += [(f, f.parent.relative_to(p)) for f in found]
        elif p.is_file():
            out.append((p, Path(".")))
        else:
            raise DataError(f"--image {p}: no such file or folder")
    seen: dict[Path, Path] = {}
    for image, sub in out:
        key = sub / image.stem
        if key in seen and seen[key] != image:
            raise DataError(
                f"--image: {seen[key]} and {image} would write the same outputs ({key}_…); "
                f"predict them into different --out folders"
            )
        seen[key] = image
    return out


@torch.no_grad()
def predict_logits(
    model: torch.nn.Module,
    img: np.ndarray,
    device: str | torch.device = "cpu",
    mask_file: str | Path | None = None,
) -> torch.Tensor:
    """(C, H, W) float32 logits at input resolution for one (H, W, 3) uint8 image (§1.2, §1.4);
    the input takes the dtype of the model's weights. `mask_file` (adaptive models): use this
    pooling mask (`.npy`, as `--save-mask` writes) instead of computing one."""
    dtype = next(model.parameters()).dtype
    x = normalized_input(img).unsqueeze(0).to(device, dtype)
    if mask_file is None:
        return model.eval()(x)[0].float().cpu()
    from cadist.adaptive.model import mask_from_file

    mask = mask_from_file(model, mask_file, *x.shape[-2:]).to(device)
    return model.eval()(x, mask=mask)[0].float().cpu()


def colorize(pred: np.ndarray) -> np.ndarray:
    """(H, W) trainIds → (H, W, 3) uint8 Cityscapes colours; 255 (ignore) is black."""
    pal = np.zeros((256, 3), np.uint8)
    pal[: len(PALETTE)] = PALETTE
    return pal[pred]


def overlay(img: np.ndarray, colour: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    return (
        (img.astype(np.float32) * (1 - alpha) + colour.astype(np.float32) * alpha)
        .round()
        .astype(np.uint8)
    )


def write_prediction(
    model: torch.nn.Module,
    image: str | Path,
    out: str | Path,
    device: str = "cpu",
    save_logits: bool = False,
    save_mask: bool = False,
    tta: Augmentation | None = None,
    fmt: str = "colour",
    mask_file: str | Path | None = None,
) -> dict[str, Path]:
    """Write `<stem>_pred.png`, `<stem>_overlay.png` — or with `fmt` "labelids" only
    `<stem>_labelIds.png`, uint8 Cityscapes labelIds as the benchmark's evaluation and server take
    them — (and `<stem>_logits.npy`, and for adaptive models `<stem>_mask.npy`: uint8 pooling
    mask at the finest grid, 0 = finest resolution).

    With test-time augmentation `tta` the prediction is the argmax of the passes' mean
    probabilities, `--save-logits` writes those as `<stem>_probs.npy` (float32 (C, H, W)) and
    `--save-mask` each unmirrored pass's mask as `<stem>_mask_<h>x<w>.npy` (with a sliding
    window: its crops' masks put together). Every file is written under a temporary name and
    renamed. `mask_file`: see `predict_logits` (one plain pass only)."""
    image, out = Path(image), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    img = load_rgb(image)
    masks: dict[str, torch.Tensor] = {}
    if mask_file is not None and not (tta is None or tta.plain):
        raise ValueError("a pooling mask from a file fits one plain pass, not --scales/--flip")
    if tta is None or tta.plain:
        scores = predict_logits(model, img, device, mask_file)
        if save_mask:
            masks["mask"] = model.last_mask[0]
    else:
        x = normalized_input(img).unsqueeze(0).to(device, next(model.parameters()).dtype)
        plan = plan_passes(*x.shape[-2:], tta.scales, tta.flip, size_multiple(model), tta.window)
        probs, pass_masks, _ = predict_augmented(model.eval(), x, plan, tta.window)
        scores = probs[0].cpu()
        if save_mask:
            masks = {f"mask_{p.height}x{p.width}": m[0]
                     for p, m in zip(plan, pass_masks, strict=True) if not p.flip}  # fmt: skip
    pred = scores.argmax(0).numpy().astype(np.uint8)
    if fmt == "labelids":
        paths = {"label_ids": out / f"{image.stem}_labelIds.png"}
        ids = train_id_lut()[pred]
        _save(paths["label_ids"], lambda f: Image.fromarray(ids).save(f, format="PNG"))
    else:
        colour = colorize(pred)
        paths = {"pred": out / f"{image.stem}_pred.png",
                 "overlay": out / f"{image.stem}_overlay.png"}  # fmt: skip
        _save(paths["pred"], lambda f: Image.fromarray(colour).save(f, format="PNG"))
        _save(
            paths["overlay"], lambda f: Image.fromarray(overlay(img, colour)).save(f, format="PNG")
        )
    if save_logits:
        key = "logits" if tta is None or tta.plain else "probs"
        paths[key] = out / f"{image.stem}_{key}.npy"
        _save(paths[key], lambda f: np.save(f, scores.numpy().astype(np.float32)))
    for key, m in masks.items():
        paths[key] = out / f"{image.stem}_{key}.npy"
        _save(paths[key], lambda f, m=m: np.save(f, m.cpu().numpy().astype(np.uint8)))
    return paths


def _save(path: Path, write) -> None:
    """`write(file)` into a temporary file beside `path`, renamed over it when complete."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
