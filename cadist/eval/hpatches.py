"""HPatches-sequences evaluation (method.md §12): mutual-nearest-neighbour matching on raw dot
products, reprojection errors through the ground-truth homographies, mean matching accuracy (MMA)
at 1…15 px per split; and a generator of sequences in the same layout for tests and demos.

Layout of a dataset root: one folder per sequence (`i_*` illumination, `v_*` viewpoint) holding
`1.ppm … 6.ppm` and `H_1_2 … H_1_6` (3×3 homographies, text, image 1 → image k).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from cadist.errors import DataError
from cadist.eval.hpatches_results import THRESHOLDS, PairResults, summarise, write_results

#: high-resolution sequences the method leaves out (§12): 116 − 8 = 108 sequences
EXCLUDED = frozenset(
    {
        "i_contruction", "i_crownnight", "i_dc", "i_pencils", "i_whitebuilding",
        "v_artisans", "v_astronautis", "v_talent",
    }
)  # fmt: skip


def sequences(root: str | Path) -> list[Path]:
    """The evaluated sequence folders in sorted name order; checks every file they need."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: no such HPatches folder (expected i_*/ and v_*/ sequences)")
    seqs = sorted(
        p
        for p in root.iterdir()
        if p.is_dir() and p.name[:2] in ("i_", "v_") and p.name not in EXCLUDED
    )
    if not seqs:
        raise DataError(
            f"{root}: no i_*/v_* sequence folders; point --root at hpatches-sequences-release"
        )
    for s in seqs:
        need = [s / f"{k}.ppm" for k in range(1, 7)] + [s / f"H_1_{k}" for k in range(2, 7)]
        missing = [p.name for p in need if not p.is_file()]
        if missing:
            raise DataError(
                f"{s}: missing {', '.join(missing)} (a sequence has 1.ppm…6.ppm, H_1_2…H_1_6)"
            )
        for k in range(2, 7):  # all of them before any image is scored
            read_homography(s / f"H_1_{k}")
    return seqs


def read_rgb(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as im:
            return np.array(im.convert("RGB"))  # grey images replicated to 3 channels (§11.2)
    except Exception as exn:
        raise DataError(f"{path}: cannot read image ({type(exn).__name__}: {exn})") from None


def read_homography(path: Path) -> np.ndarray:
    try:
        h = np.loadtxt(path, dtype=np.float64)
    except ValueError as exn:
        raise DataError(f"{path}: not a 3×3 homography of numbers ({exn})") from None
    if h.shape != (3, 3):
        raise DataError(f"{path}: expected a 3×3 homography, got shape {h.shape}")
    if not np.isfinite(h).all():
        raise DataError(f"{path}: the homography holds inf or nan; restore the file from HPatches")
    scale = np.abs(h).max()
    if scale == 0 or abs(np.linalg.det(h / scale)) < 1e-12:
        raise DataError(
            f"{path}: the homography is singular (determinant ~0: all zeros, or a row repeated), "
            f"so it maps image 1 onto no image; restore the file from HPatches"
        )
    return h


def mutual_nn(d1: np.ndarray, d2: np.ndarray) -> np.ndarray:
    """(M, 2) index pairs (i, j): j is i's best match by raw dot product and i is j's (§12)."""
    if len(d1) == 0 or len(d2) == 0:
        return np.zeros((0, 2), np.int64)
    sim = d1 @ d2.T
    nn12, nn21 = sim.argmax(1), sim.argmax(0)
    i = np.arange(len(d1))
    keep = nn21[nn12] == i
    return np.stack([i[keep], nn12[keep]], 1)


def reprojection_errors(kp1: np.ndarray, kp2: np.ndarray, matches: np.ndarray, h: np.ndarray):
    """Distances between H·(matched keypoints of image 1) and their matches in image k."""
    p = np.concatenate([kp1[matches[:, 0], :2], np.ones((len(matches), 1))], 1) @ h.T
    p = p[:, :2] / p[:, 2:]
    return np.linalg.norm(p - kp2[matches[:, 1], :2], axis=1)


def save_features(path: Path, out: dict) -> None:
    """One image's features as D2-Net writes them (§11.5): keypoints (K, 3), scores (K,),
    descriptors (K, 512), float32, in an .npz written to a temporary name, then renamed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(
        tmp, **{k: np.asarray(out[k], np.float32) for k in ("keypoints", "scores", "descriptors")}
    )
    os.replace(tmp, path)


def evaluate(
    root: str | Path,
    describe: Callable[[np.ndarray], dict],
    progress=None,
    save_to: str | Path | None = None,
    suffix: str = "d2net",
    save_results: str | Path | None = None,
) -> dict:
    """MMA of a descriptor function (RGB image → {keypoints, descriptors}) over a dataset root;
    `save_to`: also write `<save_to>/<sequence>/<k>.ppm.<suffix>.npz` per image; `save_results`:
    the per-pair results as §12's cached results file (`hpatches_results.write_results`)."""
    sums = {"i": np.zeros(len(THRESHOLDS)), "v": np.zeros(len(THRESHOLDS))}
    splits, features, matches, extra, gmac = [], [], [], [], []
    seqs = sequences(root)
    for n, seq in enumerate(seqs):
        split = seq.name[0]
        out = [describe(read_rgb(seq / f"{k}.ppm")) for k in range(1, 7)]
        if save_to is not None:
            for k, o in enumerate(out, 1):
                save_features(Path(save_to) / seq.name / f"{k}.ppm.{suffix}.npz", o)
        features += [len(o["keypoints"]) for o in out]
        extra += [o["high_res_fraction"] for o in out if "high_res_fraction" in o]
        gmac += [o["gmac"] for o in out if "gmac" in o]
        for k in range(2, 7):
            m = mutual_nn(out[0]["descriptors"], out[k - 1]["descriptors"])
            err = reprojection_errors(
                out[0]["keypoints"], out[k - 1]["keypoints"], m, read_homography(seq / f"H_1_{k}")
            )
            splits.append(split)
            matches.append(len(m))
            if len(m):  # a pair without matches scores 0
                sums[split] += np.array([(err <= t).mean() for t in THRESHOLDS])
        if progress:
            progress(n + 1, len(seqs), seq.name)
    raw = PairResults(
        dict(zip(THRESHOLDS, sums["i"].tolist(), strict=True)),
        dict(zip(THRESHOLDS, sums["v"].tolist(), strict=True)),
        splits,
        features,
        matches,
    )
    if save_results is not None:
        write_results(save_results, raw)
    res = summarise(raw)
    if extra:
        res["high_res_fraction"] = float(np.mean(extra))
    if gmac:  # mean over the images, each reference image once per sequence (§10.2)
        res["gmac_per_image"] = float(np.mean(gmac))
    return res


# -- generated sequences ------------------------------------------------------------------------
def _random_homography(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A mild perspective change: corners moved by up to 8 % of the size, image → image."""
    src = np.float32([[0, 0], [w - 1, 0], [w - 1, h - 1], [0, h - 1]])
    jitter = rng.uniform(-0.08, 0.08, (4, 2)) * np.float32([w, h])
    import cv2

    return cv2.getPerspectiveTransform(src, (src + jitter).astype(np.float32)).astype(np.float64)


def write_sequences(
    root: str | Path, illumination: int = 2, viewpoint: int = 2, height: int = 240,
    width: int = 320, seed: int = 0,
) -> list[Path]:  # fmt: skip
    """Generated sequences in HPatches layout: illumination ones keep the geometry (identity
    homographies) and change brightness/contrast; viewpoint ones warp a street scene."""
    import cv2

    from cadist.data.synthetic import render_scene

    rng = np.random.default_rng(seed)
    root = Path(root)
    out = []
    for kind, count in (("i", illumination), ("v", viewpoint)):
        for n in range(count):
            seq = root / f"{kind}_generated{n:03d}"
            seq.mkdir(parents=True, exist_ok=True)
            base, _ = render_scene(height, width, rng)
            for k in range(1, 7):
                if k == 1:
                    img, hom = base, np.eye(3)
                elif kind == "i":
                    gain, bias = rng.uniform(0.6, 1.3), rng.uniform(-25, 25)
                    img = np.clip(base.astype(np.float32) * gain + bias, 0, 255).astype(np.uint8)
                    hom = np.eye(3)
                else:
                    hom = _random_homography(rng, height, width)
                    img = cv2.warpPerspective(base, hom, (width, height), flags=cv2.INTER_LINEAR)
                tmp = seq / f".{k}.ppm.tmp"
                Image.fromarray(img).save(tmp, format="PPM")
                os.replace(tmp, seq / f"{k}.ppm")
                if k > 1:
                    np.savetxt(seq / f"H_1_{k}", hom)
            out.append(seq)
    return out
