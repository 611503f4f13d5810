"""Single-image prediction: colour-coded classes, overlays and raw logits."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cadist.data.cityscapes import PALETTE
from cadist.data.transforms import normalized_input
from cadist.errors import DataError
from cadist.eval.passes import Augmentation
from cadist.eval.tta import plan_passes, predict_augmented, size_multiple


def load_rgb(path: str | Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB of an image file, or a `DataError` naming the file."""
    try:
        with Image.open(path) as im:
            return np.array(im.convert("RGB"))
    except Exception as exn:
        raise DataError(f"{path}: cannot read image ({type(exn).__name__}: {exn})") from None


@torch.no_grad()
def predict_logits(
    model: torch.nn.Module, img: np.ndarray, device: str | torch.device = "cpu"
) -> torch.Tensor:
    """(C, H, W) float32 logits at input resolution for one (H, W, 3) uint8 image (§1.2, §1.4);
    the input takes the dtype of the model's weights."""
    dtype = next(model.parameters()).dtype
    x = normalized_input(img).unsqueeze(0).to(device, dtype)
    return model.eval()(x)[0].float().cpu()


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
) -> dict[str, Path]:
    """Write `<stem>_pred.png`, `<stem>_overlay.png` (and `<stem>_logits.npy`, and for adaptive
    models `<stem>_mask.npy`: uint8 pooling mask at the finest grid, 0 = finest resolution).

    With test-time augmentation `tta` the prediction is the argmax of the passes' mean
    probabilities, `--save-logits` writes those as `<stem>_probs.npy` (float32 (C, H, W)) and
    `--save-mask` each unmirrored pass's mask as `<stem>_mask_<h>x<w>.npy` (with a sliding
    window: its crops' masks put together). Every file is written under a temporary name and
    renamed."""
    image, out = Path(image), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    img = load_rgb(image)
    masks: dict[str, torch.Tensor] = {}
    if tta is None or tta.plain:
        scores = predict_logits(model, img, device)
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
    colour = colorize(pred)
    paths = {"pred": out / f"{image.stem}_pred.png", "overlay": out / f"{image.stem}_overlay.png"}
    _save(paths["pred"], lambda f: Image.fromarray(colour).save(f, format="PNG"))
    _save(paths["overlay"], lambda f: Image.fromarray(overlay(img, colour)).save(f, format="PNG"))
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
