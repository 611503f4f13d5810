"""HPatches results files in the layout of method.md §12, the cached evaluation results that D2-Net
style evaluation code writes per method: a pickled 3-element object array

    [ {θ: summed illumination accuracy}, {θ: summed viewpoint accuracy},
      [split letter per pair ('i'/'v'), #features per image, #matches per pair] ]

cadist writes them (`cadist hpatches eval --save-results`) and reads them — its own and other
people's, e.g. the authors' cached results — without executing anything a file asks for: the
unpickler only builds NumPy arrays, scalars, dtypes and Python containers. `summarise` turns one into
the MMA table (§12: summed accuracies divided by the number of pairs of the split).
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cadist.errors import DataError

THRESHOLDS = tuple(range(1, 16))

#: overall MMA@3 of the authors' cached results (§13.3), by cadist's method name
PAPER_MMA3 = {
    "d2net_os8": 0.5500,
    "d2net_os4": 0.6467,
    "d2net_os2": 0.6699,
    "d2net_os1": 0.6765,
    "apd2net_s4_3": 0.5563,
    "apd2net_s4_11": 0.6084,
    "apd2net_s4_31": 0.6463,
    "apd2net_s2_21-21": 0.6469,
    "apd2net_s2_19-35": 0.6627,
    "apd2net_s2_37-37": 0.6668,
    "apd2net_s1_19-35-35": 0.6645,
    "apd2net_s1_19-51-51": 0.6755,
    "apd2net_s1_25-51-51": 0.6781,
}


@dataclass
class PairResults:
    """The raw per-pair results of one method (what §12's cached file holds)."""

    illumination: dict[int, float]  # θ → Σ over illumination pairs of the pair's accuracy at θ
    viewpoint: dict[int, float]
    splits: list[str]  # per pair, 'i' or 'v'
    features: list[int]  # per image, 6 per sequence
    matches: list[int]  # per pair


def summarise(r: PairResults) -> dict:
    """MMA at every θ per split and overall, mean features per image, matches per pair (§12)."""
    n_i, n_v = r.splits.count("i"), r.splits.count("v")
    ths = sorted(set(r.illumination) | set(r.viewpoint))
    si = np.array([r.illumination.get(t, 0.0) for t in ths], np.float64)
    sv = np.array([r.viewpoint.get(t, 0.0) for t in ths], np.float64)
    mma = (si + sv) / max(n_i + n_v, 1)
    matches = np.asarray(r.matches, np.float64)
    split = np.asarray(r.splits)
    out = {
        "sequences": {"i": n_i // 5, "v": n_v // 5},
        "thresholds": ths,
        "mma": mma.tolist(),
        "mma_illumination": (si / max(n_i, 1)).tolist(),
        "mma_viewpoint": (sv / max(n_v, 1)).tolist(),
        "features_per_image": float(np.mean(r.features)) if r.features else 0.0,
        "matches_per_pair": float(matches.sum() / max(n_i + n_v, 1)),
        "matches_per_pair_illumination": float(matches[split == "i"].sum() / max(n_i, 1)),
        "matches_per_pair_viewpoint": float(matches[split == "v"].sum() / max(n_v, 1)),
    }
    if 3 in ths:
        out["mma@3"] = float(mma[ths.index(3)])
    return out


def write_results(path: str | Path, r: PairResults) -> Path:
    """The §12 file (NumPy `.npy` holding a pickled object array), written to a temporary name and
    renamed; plain Python numbers inside, so any NumPy reads it."""
    path = Path(path)
    arr = np.empty(3, dtype=object)
    arr[0] = {int(t): float(v) for t, v in r.illumination.items()}
    arr[1] = {int(t): float(v) for t, v in r.viewpoint.items()}
    arr[2] = [[str(s) for s in r.splits], [int(n) for n in r.features], [int(n) for n in r.matches]]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, arr, allow_pickle=True)
    os.replace(tmp, path)
    return path


# -- reading without trusting the file ----------------------------------------------------------
_ALLOWED = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
}


class _NumbersOnly(pickle.Unpickler):
    def __init__(self, f, path: Path):
        super().__init__(f, encoding="latin1")  # also reads Python 2 pickles
        self._path = path

    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED:
            raise DataError(
                f"{self._path}: refusing to load: the pickle asks for {module}.{name}, and an "
                f"HPatches results file (method §12) holds only arrays, numbers, dicts and lists"
            )
        module = module.replace("numpy.core.", "numpy._core.")
        return super().find_class(module, name)


def _load(path: Path):
    with open(path, "rb") as f:
        try:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            else:
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        except ValueError as exn:
            raise DataError(f"{path}: not a NumPy .npy file ({exn})") from None
        if not dtype.hasobject:
            raise DataError(
                f"{path}: a {dtype} array of shape {shape}; an HPatches results file (method §12) "
                f"is a pickled 3-element object array"
            )
        try:
            return _NumbersOnly(f, path).load()
        except DataError:
            raise
        except Exception as exn:
            raise DataError(f"{path}: unreadable pickle ({type(exn).__name__}: {exn})") from None


def _seq(v) -> list:
    return v.tolist() if isinstance(v, np.ndarray) else list(v)


def read_results(path: str | Path) -> PairResults:
    """A §12 results file, checked for the expected structure (errors name the file and part)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such results file")
    obj = _load(path)
    parts = _seq(obj) if isinstance(obj, np.ndarray | list | tuple) else None
    if parts is None or len(parts) != 3:
        raise DataError(
            f"{path}: expected 3 parts [illumination dict, viewpoint dict, [splits, features, "
            f"matches]], got {type(obj).__name__} of length {len(parts) if parts else '?'}"
        )
    sums = []
    for name, d in zip(("illumination", "viewpoint"), parts[:2], strict=True):
        if not isinstance(d, dict) or not d:
            raise DataError(f"{path}: part {name}: expected a dict θ → summed accuracy")
        try:
            sums.append({int(k): float(v) for k, v in d.items()})
        except (TypeError, ValueError):
            raise DataError(
                f"{path}: part {name}: keys must be pixel thresholds, values numbers"
            ) from None
    try:
        splits, features, matches = (_seq(x) for x in _seq(parts[2]))
    except (TypeError, ValueError):
        raise DataError(
            f"{path}: part 3: expected [split letter per pair, features per image, matches per "
            f"pair]"
        ) from None
    splits = [s.decode() if isinstance(s, bytes) else str(s) for s in splits]
    if set(splits) - {"i", "v"}:
        raise DataError(f"{path}: split letters must be 'i' or 'v', got {sorted(set(splits))}")
    if len(matches) != len(splits) or len(features) != 6 * len(splits) // 5:
        raise DataError(
            f"{path}: {len(splits)} pairs, {len(matches)} match counts and {len(features)} "
            f"feature counts; expected one match count per pair and 6 images per 5 pairs"
        )
    for name, d, n in (("illumination", sums[0], splits.count("i")),
                       ("viewpoint", sums[1], splits.count("v"))):  # fmt: skip
        bad = [t for t, v in d.items() if not 0 <= v <= n + 1e-6]
        if bad:
            raise DataError(
                f"{path}: part {name}: summed accuracy at {bad[0]} px is {d[bad[0]]}, outside "
                f"[0, {n}] for {n} pairs"
            )
    return PairResults(
        sums[0], sums[1], splits, [int(n) for n in features], [int(n) for n in matches]
    )
