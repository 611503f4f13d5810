"""Single-image prediction: colour-coded classes, overlays and raw logits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cadist.data.cityscapes import PALETTE
from cadist.data.transforms import normalized_input
from cadist.errors import DataError


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
) -> dict[str, Path]:
    """Write `<stem>_pred.png`, `<stem>_overlay.png` (and `<stem>_logits.npy`, and for adaptive
    models `<stem>_mask.npy`: uint8 pooling mask at the finest grid, 0 = finest resolution)."""
    image, out = Path(image), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    img = load_rgb(image)
    logits = predict_logits(model, img, device)
    pred = logits.argmax(0).numpy().astype(np.uint8)
    colour = colorize(pred)
    paths = {"pred": out / f"{image.stem}_pred.png", "overlay": out / f"{image.stem}_overlay.png"}
    Image.fromarray(colour).save(paths["pred"])
    Image.fromarray(overlay(img, colour)).save(paths["overlay"])
    if save_logits:
        paths["logits"] = out / f"{image.stem}_logits.npy"
        np.save(paths["logits"], logits.numpy().astype(np.float32))
    if save_mask:
        paths["mask"] = out / f"{image.stem}_mask.npy"
        np.save(paths["mask"], model.last_mask[0].cpu().numpy().astype(np.uint8))
    return paths
