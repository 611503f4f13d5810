"""Image files: reading one as RGB, with an error that names it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from cadist.errors import DataError


def load_rgb(path: str | Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB of an image file, or a `DataError` naming the file."""
    try:
        with Image.open(path) as im:
            return np.array(im.convert("RGB"))
    except Exception as exn:
        raise DataError(f"{path}: cannot read image ({type(exn).__name__}: {exn})") from None
