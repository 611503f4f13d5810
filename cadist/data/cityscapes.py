"""The Cityscapes layout on disk and the labelId → trainId mapping (method.md §1.1).

The mapping is read from `cityscapesscripts.helpers.labels` (the dataset's own label table, a
plain-Python module), never typed by hand here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from cityscapesscripts.helpers import labels as _cs

from cadist.errors import DataError

IGNORE_INDEX = 255
NUM_CLASSES = 19
SPLITS = ("train", "val", "test")
IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_SUFFIX = "_gtFine_labelIds.png"

#: trainId → class name, e.g. CLASS_NAMES[0] == "road".
CLASS_NAMES: tuple[str, ...] = tuple(_cs.trainId2label[t].name for t in range(NUM_CLASSES))
#: trainId → RGB colour of the Cityscapes palette, shape (19, 3) uint8.
PALETTE = np.array([_cs.trainId2label[t].color for t in range(NUM_CLASSES)], dtype=np.uint8)
#: the labelIds that can appear in a `*_gtFine_labelIds.png` (negative ids are never drawn).
VALID_LABEL_IDS: frozenset[int] = frozenset(lab.id for lab in _cs.labels if lab.id >= 0)


def label_id_to_train_id() -> dict[int, int]:
    """labelId → trainId for every labelId a PNG can hold; ignored classes map to 255."""
    out = {}
    for lab in _cs.labels:
        if lab.id < 0:
            continue
        train = lab.trainId
        out[lab.id] = train if 0 <= train < NUM_CLASSES else IGNORE_INDEX
    return out


def label_lut() -> np.ndarray:
    """A (256,) uint8 lookup table labelId → trainId; ids not in the table map to 255.

    Use `unknown_label_ids` first when unknown ids must be an error rather than ignored.
    """
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for label_id, train_id in label_id_to_train_id().items():
        lut[label_id] = train_id
    return lut


def train_id_lut() -> np.ndarray:
    """A (256,) uint8 lookup table trainId → labelId, the ids the Cityscapes benchmark scores
    (`*_labelIds.png` predictions); 255 (ignore) and unused values map to 0 ("unlabeled")."""
    lut = np.zeros(256, dtype=np.uint8)
    for t in range(NUM_CLASSES):
        lut[t] = _cs.trainId2label[t].id
    return lut


_KNOWN = np.zeros(256, dtype=bool)
_KNOWN[list(VALID_LABEL_IDS)] = True


def unknown_label_ids(label_ids: np.ndarray) -> list[int]:
    """The distinct values of a uint8 labelId map (H, W) that Cityscapes does not define."""
    present = np.bincount(label_ids.ravel(), minlength=256) > 0
    return [int(v) for v in np.flatnonzero(present & ~_KNOWN)]


@dataclass(frozen=True)
class CityscapesSample:
    """One image of the tree: `stem` is `<city>_<seq>_<frame>`."""

    city: str
    stem: str
    image: Path
    label: Path

    @property
    def seq_frame(self) -> tuple[str, str]:
        parts = self.stem.split("_")
        return parts[-2], parts[-1]


def image_path(root: Path, split: str, city: str, stem: str) -> Path:
    return Path(root) / "leftImg8bit" / split / city / f"{stem}{IMAGE_SUFFIX}"


def label_path(root: Path, split: str, city: str, stem: str) -> Path:
    return Path(root) / "gtFine" / split / city / f"{stem}{LABEL_SUFFIX}"


def list_samples(root: str | Path, split: str) -> tuple[list[CityscapesSample], list[Path]]:
    """All images of `split` in sorted order, paired with their labelIds PNG.

    Returns (samples, images_without_label). Raises `DataError` when the split folder is missing or
    empty.
    """
    root = Path(root)
    if split not in SPLITS:
        raise DataError(f"split {split!r} is not one of {', '.join(SPLITS)}")
    img_dir = root / "leftImg8bit" / split
    if not img_dir.is_dir():
        raise DataError(
            f"{img_dir}: no such folder; --cityscapes-root must hold leftImg8bit/{split}/<city>/ "
            f"and gtFine/{split}/<city>/ (the layout of the official download, or of `cadist data synth`)"
        )
    samples, missing = [], []
    for img in sorted(img_dir.glob(f"*/*{IMAGE_SUFFIX}")):
        city = img.parent.name
        stem = img.name[: -len(IMAGE_SUFFIX)]
        lab = label_path(root, split, city, stem)
        if lab.is_file():
            samples.append(CityscapesSample(city, stem, img, lab))
        else:
            missing.append(img)
    if not samples and not missing:
        raise DataError(f"{img_dir}: no *{IMAGE_SUFFIX} files under <city>/ folders")
    return samples, missing
