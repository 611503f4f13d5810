"""Training augmentation (method.md §1.3) and input normalisation (§1.2), image and label alike.

Inputs are numpy arrays as decoded: image (H, W, 3) uint8 RGB, label (H, W) uint8 trainIds.
Outputs are torch tensors: image (3, h, w) float32 normalised, label (h, w) uint8.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageEnhance

# device="cpu" explicitly: an import inside a `torch.device("meta")` block must not make them meta
MEAN = torch.tensor([0.485, 0.456, 0.406], device="cpu").view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225], device="cpu").view(3, 1, 1)


def denormalize(x: torch.Tensor) -> torch.Tensor:
    """Inverse of the §1.2 normalisation (new tensor), clamped to [0, 1]."""
    return (x * STD.to(x.device) + MEAN.to(x.device)).clamp_(0, 1)


def normalized_input(img: np.ndarray) -> torch.Tensor:
    """§1.2 preprocessing for evaluation and prediction: (H, W, 3) uint8 → (3, H, W) float32."""
    return normalize_batch([img])[0]


_SCALE = (1.0 / (255.0 * STD)).view(3, 1, 1)
_SHIFT = (-MEAN / STD).view(3, 1, 1)


def stack_images(images: list[np.ndarray]) -> torch.Tensor:
    """Equally sized (H, W, 3) uint8 arrays (any strides) → one (B, 3, H, W) uint8 tensor."""
    h, w = images[0].shape[:2]
    out = torch.empty(len(images), 3, h, w, dtype=torch.uint8)
    for i, img in enumerate(images):
        if img.shape != (h, w, 3):
            raise ValueError(f"image {i} has shape {img.shape}, expected {(h, w, 3)}")
        if not img.flags.writeable:
            img = np.array(img)
        out[i].copy_(torch.from_numpy(img).permute(2, 0, 1))
    return out


def normalize_uint8(x: torch.Tensor) -> torch.Tensor:
    """§1.2 for a (B, 3, H, W) uint8 tensor on any device → float32, one fused multiply-add."""
    dev = x.device
    return torch.addcmul(_SHIFT.to(dev), x.float(), _SCALE.to(dev))


def normalize_batch(images: list[np.ndarray]) -> torch.Tensor:
    """§1.2 for a list of equally sized (H, W, 3) uint8 arrays (any strides) → (B, 3, H, W) float32."""
    return normalize_uint8(stack_images(images))


def adjust_brightness(im: Image.Image, f: float) -> Image.Image:
    """Blend with black: clip(f·x), rounded to uint8."""
    return ImageEnhance.Brightness(im).enhance(f)


def adjust_contrast(im: Image.Image, f: float) -> Image.Image:
    """Blend with the image's mean grey level (ITU-R 601-2 luma, rounded to an integer)."""
    return ImageEnhance.Contrast(im).enhance(f)


def adjust_saturation(im: Image.Image, f: float) -> Image.Image:
    """Blend with the grey-scale image."""
    return ImageEnhance.Color(im).enhance(f)


_ADJUST = (adjust_brightness, adjust_contrast, adjust_saturation)


@dataclass(frozen=True)
class TrainTransform:
    """§1.3: random crop (no padding, no rescale) → colour jitter in random order → h-flip → §1.2.

    `jitter` is the half-width of the factor range: factors are drawn from [1 − jitter, 1 + jitter].
    Jitter and flip run on the uint8 crop with PIL (as torchvision's PIL transforms of the reference
    do, rounding to uint8 after each step); that is ~4× faster than the same blends in float.
    """

    crop_h: int = 768
    crop_w: int = 768
    jitter: float = 0.5
    flip_p: float = 0.5

    def __call__(
        self, img: np.ndarray, lab: np.ndarray, rng: np.random.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(3, h, w) float32 normalised image and (h, w) uint8 label."""
        img, lab = self.augment(img, lab, rng)
        return normalize_batch([img])[0], torch.from_numpy(np.ascontiguousarray(lab))

    def augment(
        self, img: np.ndarray, lab: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        """Crop, jitter and flip in uint8: (h, w, 3) image and (h, w) label, possibly views."""
        h, w = lab.shape
        if h < self.crop_h or w < self.crop_w:
            raise ValueError(
                f"image {h}×{w} is smaller than the {self.crop_h}×{self.crop_w} crop; "
                f"lower data.crop_size (crops are never padded)"
            )
        y = int(rng.integers(0, h - self.crop_h + 1))
        x = int(rng.integers(0, w - self.crop_w + 1))
        img = img[y : y + self.crop_h, x : x + self.crop_w]
        lab = lab[y : y + self.crop_h, x : x + self.crop_w]
        im = Image.fromarray(np.ascontiguousarray(img))
        if self.jitter > 0:
            factors = rng.uniform(1 - self.jitter, 1 + self.jitter, 3)
            for i in rng.permutation(3):
                im = _ADJUST[i](im, float(factors[i]))
        if rng.random() < self.flip_p:
            im, lab = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT), lab[:, ::-1]
        return np.asarray(im), lab
