"""Training augmentation (method.md §1.3) and input normalisation (§1.2), image and label alike.

Inputs are numpy arrays as decoded: image (H, W, 3) uint8 RGB, label (H, W) uint8 trainIds.
Outputs are torch tensors: image (3, h, w) float32 normalised, label (h, w) uint8.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
GREY = torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)


def to_unit_tensor(img: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 → (3, H, W) float32 in [0, 1]."""
    return torch.from_numpy(np.array(img, copy=not img.flags.writeable or not img.flags.c_contiguous)).permute(2, 0, 1).float().div_(255.0)


def normalize_(x: torch.Tensor) -> torch.Tensor:
    """In place: (x − mean) / std per channel, x of shape (3, H, W) or (B, 3, H, W) in [0, 1]."""
    return x.sub_(MEAN.to(x.device)).div_(STD.to(x.device))


def denormalize(x: torch.Tensor) -> torch.Tensor:
    """Inverse of `normalize_` (new tensor), clamped to [0, 1]."""
    return (x * STD.to(x.device) + MEAN.to(x.device)).clamp_(0, 1)


def normalized_input(img: np.ndarray) -> torch.Tensor:
    """§1.2 preprocessing for evaluation and prediction: (H, W, 3) uint8 → (3, H, W) float32."""
    return normalize_(to_unit_tensor(img))


def _grey(x: torch.Tensor) -> torch.Tensor:
    return (x * GREY).sum(0, keepdim=True)


def adjust_brightness_(x: torch.Tensor, f: float) -> torch.Tensor:
    """Blend with black: clamp(f·x)."""
    return x.mul_(f).clamp_(0, 1)


def adjust_contrast_(x: torch.Tensor, f: float) -> torch.Tensor:
    """Blend with the mean grey level of the image."""
    m = _grey(x).mean()
    return x.mul_(f).add_((1 - f) * m).clamp_(0, 1)


def adjust_saturation_(x: torch.Tensor, f: float) -> torch.Tensor:
    """Blend with the grey-scale image."""
    g = _grey(x)
    return x.mul_(f).add_(g * (1 - f)).clamp_(0, 1)


_ADJUST = (adjust_brightness_, adjust_contrast_, adjust_saturation_)


@dataclass(frozen=True)
class TrainTransform:
    """§1.3: random crop (no padding, no rescale) → colour jitter in random order → h-flip → §1.2.

    `jitter` is the half-width of the factor range: factors are drawn from [1 − jitter, 1 + jitter].
    """

    crop_h: int = 768
    crop_w: int = 768
    jitter: float = 0.5
    flip_p: float = 0.5

    def __call__(self, img: np.ndarray, lab: np.ndarray, rng: np.random.Generator
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        h, w = lab.shape
        if h < self.crop_h or w < self.crop_w:
            raise ValueError(f"image {h}×{w} is smaller than the {self.crop_h}×{self.crop_w} crop; "
                             f"lower data.crop_size (crops are never padded)")
        y = int(rng.integers(0, h - self.crop_h + 1))
        x = int(rng.integers(0, w - self.crop_w + 1))
        img = img[y:y + self.crop_h, x:x + self.crop_w]
        lab = lab[y:y + self.crop_h, x:x + self.crop_w]
        t = to_unit_tensor(img)
        if self.jitter > 0:
            factors = rng.uniform(1 - self.jitter, 1 + self.jitter, 3)
            for i in rng.permutation(3):
                _ADJUST[i](t, float(factors[i]))
        lab_t = torch.from_numpy(np.ascontiguousarray(lab))
        if rng.random() < self.flip_p:
            t = t.flip(-1)
            lab_t = lab_t.flip(-1)
        return normalize_(t), lab_t
