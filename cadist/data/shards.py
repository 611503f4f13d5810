"""Cityscapes tree → WebDataset shards, with a manifest.

Per sample a shard holds `<key>.jpg` or `<key>.png` (the RGB image), `<key>.label.png` (trainIds,
19 classes + 255, 8-bit grey) and `<key>.json` (city, frame, size, source files). The manifest
`<split>-manifest.json` beside the shards lists samples and sha256 per shard, the label mapping, the
formats and the cadist version. Shards are written under temporary names in a staging folder and
renamed only when the whole split is complete, so an interrupted build leaves nothing half-written.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

from cadist import __version__
from cadist.data import cityscapes as cs
from cadist.errors import DataError, ShardError

IMAGE_FORMATS = ("jpeg", "png")
#: The format a split gets when none is asked for: JPEG q95 decodes ~3× faster than PNG at
#: 1024×2048 (bench/loader.py); evaluation data stays lossless so that metrics are exact.
DEFAULT_FORMAT = {"train": "jpeg", "val": "png", "test": "png"}
MANIFEST_VERSION = 1


def manifest_path(out: str | Path, split: str) -> Path:
    return Path(out) / f"{split}-manifest.json"


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


@dataclass(frozen=True)
class _ShardTask:
    index: int
    root: str
    split: str
    samples: tuple[cs.CityscapesSample, ...]
    image_format: str
    jpeg_quality: int
    skip_bad: bool
    staging: str


def _open_image(path: Path, what: str) -> Image.Image:
    try:
        im = Image.open(path)
        im.load()
        return im
    except Exception as exn:  # PIL raises many types for broken files
        raise DataError(
            f"{path}: cannot read {what} ({type(exn).__name__}: {exn}); "
            f"replace or remove the file (or pass --skip-bad)"
        ) from None


def encode_sample(
    s: cs.CityscapesSample,
    root: Path,
    split: str,
    image_format: str,
    jpeg_quality: int,
    lut: np.ndarray,
) -> dict[str, bytes]:
    """Read one image/label pair, check it, and encode it as a WebDataset sample dict."""
    img = _open_image(s.image, "image")
    lab = _open_image(s.label, "label")
    if img.size != lab.size:
        raise DataError(
            f"{s.label}: label is {lab.size[0]}×{lab.size[1]} but its image {s.image} "
            f"is {img.size[0]}×{img.size[1]}; image and label must have the same size"
        )
    if lab.mode not in ("L", "P", "I", "I;16"):
        raise DataError(
            f"{s.label}: label has image mode {lab.mode!r}, expected a single-channel "
            f"*_gtFine_labelIds.png (not the _color.png)"
        )
    ids = np.asarray(lab)
    if ids.dtype != np.uint8:
        if ids.max(initial=0) > 255 or ids.min(initial=0) < 0:
            bad = sorted(int(v) for v in np.unique(ids) if v > 255 or v < 0)[:10]
            raise DataError(
                f"{s.label}: unknown labelIds {bad}; Cityscapes labelIds are "
                f"{sorted(cs.VALID_LABEL_IDS)[0]}..{max(cs.VALID_LABEL_IDS)}"
            )
        ids = ids.astype(np.uint8)
    unknown = cs.unknown_label_ids(ids)
    if unknown:
        raise DataError(
            f"{s.label}: unknown labelIds {unknown[:10]}; Cityscapes labelIds are "
            f"0..{max(cs.VALID_LABEL_IDS)}; is this a *_gtFine_labelIds.png "
            f"(not _instanceIds or _labelTrainIds)?"
        )
    if img.mode != "RGB":
        img = img.convert("RGB")
    buf = io.BytesIO()
    if image_format == "jpeg":
        img.save(buf, format="JPEG", quality=jpeg_quality, subsampling=0)  # 4:4:4
        ext = "jpg"
    else:
        img.save(buf, format="PNG", compress_level=1)
        ext = "png"
    lbuf = io.BytesIO()
    Image.fromarray(lut[ids]).save(
        lbuf, format="PNG", compress_level=1
    )  # decodes 40 % faster than 6
    seq, frame = s.seq_frame
    meta = {
        "city": s.city,
        "seq": seq,
        "frame": frame,
        "split": split,
        "height": img.size[1],
        "width": img.size[0],
        "image_format": image_format,
        "image_file": str(s.image.relative_to(root)),
        "label_file": str(s.label.relative_to(root)),
    }
    return {
        "__key__": s.stem,
        ext: buf.getvalue(),
        "label.png": lbuf.getvalue(),
        "json": json.dumps(meta).encode(),
    }


def sha256_file(path: Path) -> str:
    """The sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_shard(task: _ShardTask) -> dict:
    """Encode and write one shard to the staging folder. Returns its manifest entry."""
    lut = cs.label_lut()
    final = Path(task.staging) / f"part-{task.index:06d}.tar"
    tmp = final.with_suffix(".tar.tmp")
    skipped, count = [], 0
    with wds.TarWriter(str(tmp)) as sink:
        for s in task.samples:
            try:
                sample = encode_sample(
                    s, Path(task.root), task.split, task.image_format, task.jpeg_quality, lut
                )
            except DataError as exn:
                if not task.skip_bad:
                    raise
                skipped.append(str(exn))
                continue
            sink.write(sample)
            count += 1
    os.replace(tmp, final)
    return {
        "part": final.name,
        "sha256": sha256_file(final),
        "bytes": final.stat().st_size,
        "samples": count,
        "keys": [s.stem for s in task.samples],
        "skipped": skipped,
    }


def existing_outputs(out: Path, split: str) -> list[Path]:
    found = sorted(out.glob(f"{split}-[0-9]*.tar"))
    if manifest_path(out, split).exists():
        found.append(manifest_path(out, split))
    return found


def build_shards(
    root: str | Path,
    split: str,
    out: str | Path,
    samples_per_shard: int = 32,
    image_format: str | None = None,
    jpeg_quality: int = 95,
    workers: int = 0,
    overwrite: bool = False,
    skip_bad: bool = False,
    progress: bool = True,
) -> dict:
    """Write `split` of the Cityscapes tree at `root` as shards into `out`; return the manifest.

    `workers=0` uses every CPU. Raises `DataError` for bad input (naming the file) unless
    `skip_bad`, in which case bad samples are skipped and listed in the manifest. `out` may be on
    object storage (`s3://…`, `gs://…`): each shard is uploaded as soon as it is written.
    """
    from cadist.storage.uri import is_remote

    if is_remote(out):
        return _build_remote(root, split, str(out), samples_per_shard, image_format,
                             jpeg_quality, workers, overwrite, skip_bad, progress)  # fmt: skip
    root, out = Path(root), Path(out)
    image_format, samples, skipped = _inputs(root, split, samples_per_shard, image_format, skip_bad)
    out.mkdir(parents=True, exist_ok=True)
    old = existing_outputs(out, split)
    if old and not overwrite:
        raise ShardError(
            f"{out}: already holds {split} shards ({old[0].name}, … {len(old)} files); "
            f"pass --overwrite to replace them or choose another --out"
        )
    staging = Path(tempfile.mkdtemp(prefix=f".staging-{split}-", dir=out))
    try:
        tasks = _tasks(root, split, samples, samples_per_shard, image_format, jpeg_quality,
                       skip_bad, staging)  # fmt: skip
        parts = _run_tasks(tasks, workers or os.cpu_count() or 1, progress, len(samples), split)
        parts.sort(key=lambda p: p["part"])
        for p in parts:
            skipped.extend(p["skipped"])
        kept = [p for p in parts if p["samples"] > 0]
        for old_file in existing_outputs(out, split):
            old_file.unlink()
        entries = []
        for i, p in enumerate(kept):
            dst = out / shard_name(split, i)
            os.replace(staging / p["part"], dst)
            entries.append(_entry(dst.name, p))
        manifest = _manifest(root, split, image_format, jpeg_quality, entries, skipped)
        write_json_atomic(manifest_path(out, split), manifest)
        return manifest
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _inputs(root: Path, split: str, samples_per_shard: int, image_format, skip_bad: bool):
    """(image format, the split's samples, messages of those skipped) — checked options."""
    image_format = image_format or DEFAULT_FORMAT[split]
    if image_format not in IMAGE_FORMATS:
        raise ShardError(
            f"--image-format {image_format!r}: expected one of {', '.join(IMAGE_FORMATS)}"
        )
    if samples_per_shard < 1:
        raise ShardError(f"--samples-per-shard {samples_per_shard}: expected a positive number")
    samples, unlabeled = cs.list_samples(root, split)
    skipped = []
    for img in unlabeled:
        stem = img.name[: -len(cs.IMAGE_SUFFIX)]
        msg = (
            f"{img}: image has no label (expected "
            f"{cs.label_path(root, split, img.parent.name, stem)}); "
            f"add the gtFine file or remove the image (or pass --skip-bad)"
        )
        if not skip_bad:
            raise DataError(msg)
        skipped.append(msg)
    return image_format, samples, skipped


def _tasks(root, split, samples, per_shard, image_format, quality, skip_bad, staging):
    return [
        _ShardTask(
            i,
            str(root),
            split,
            tuple(samples[o : o + per_shard]),
            image_format,
            quality,
            skip_bad,
            str(staging),
        )  # fmt: skip
        for i, o in enumerate(range(0, len(samples), per_shard))
    ]


def _entry(name: str, part: dict) -> dict:
    return {"name": name, "samples": part["samples"], "sha256": part["sha256"],
            "bytes": part["bytes"]}  # fmt: skip


def _manifest(root: Path, split, image_format, jpeg_quality, entries, skipped) -> dict:
    return {
        "manifest_version": MANIFEST_VERSION,
        "cadist_version": __version__,
        "split": split,
        "source_root": str(Path(root).resolve()),
        "image_format": image_format,
        "jpeg_quality": jpeg_quality if image_format == "jpeg" else None,
        "label_format": "png-trainid",
        "num_classes": cs.NUM_CLASSES,
        "ignore_index": cs.IGNORE_INDEX,
        "class_names": list(cs.CLASS_NAMES),
        "label_mapping": {str(k): v for k, v in sorted(cs.label_id_to_train_id().items())},
        "num_samples": sum(e["samples"] for e in entries),
        "num_skipped": len(skipped),
        "skipped": skipped,
        "shards": entries,
    }


def _build_remote(root, split, out, per_shard, image_format, quality, workers, overwrite,
                  skip_bad, progress) -> dict:  # fmt: skip
    """`build_shards` into object storage: every shard is uploaded to a staging prefix as soon as
    it is written (the local copy then goes), renamed into place once the split is complete, and
    the manifest — what readers look for — is written last."""
    import uuid

    from cadist.storage.store import Storage

    root, store = Path(root), Storage(out)
    store.check()
    image_format, samples, skipped = _inputs(root, split, per_shard, image_format, skip_bad)
    old = store.list("", f"{split}-[0-9]*.tar") + store.list("", f"{split}-manifest.json")
    if old and not overwrite:
        raise ShardError(
            f"{out}: already holds {split} shards ({old[0]}, … {len(old)} files); "
            f"pass --overwrite to replace them or choose another --out"
        )
    staged = f".staging-{split}-{uuid.uuid4().hex[:8]}"
    local = Path(tempfile.mkdtemp(prefix=f"cadist-staging-{split}-"))

    def upload(part: dict) -> None:
        store.upload(local / part["part"], f"{staged}/{part['part']}")
        (local / part["part"]).unlink()

    try:
        tasks = _tasks(root, split, samples, per_shard, image_format, quality, skip_bad, local)
        parts = _run_tasks(tasks, workers or os.cpu_count() or 1, progress, len(samples), split,
                           on_done=upload)  # fmt: skip
        parts.sort(key=lambda p: p["part"])
        for p in parts:
            skipped.extend(p["skipped"])
        kept = [p for p in parts if p["samples"] > 0]
        store.delete(manifest_path("", split).name)  # readers see no half-replaced split
        for name in old:
            store.delete(name)
        entries = []
        for i, p in enumerate(kept):
            store.move(f"{staged}/{p['part']}", shard_name(split, i))
            entries.append(_entry(shard_name(split, i), p))
        manifest = _manifest(root, split, image_format, quality, entries, skipped)
        store.write_json(manifest_path("", split).name, manifest)
        return manifest
    finally:
        shutil.rmtree(local, ignore_errors=True)
        store.delete(staged)


def _run_tasks(tasks, workers, progress, total, split, on_done=None) -> list[dict]:
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="img", desc=f"shards {split}")
    results = []
    try:
        if workers > 1 and len(tasks) > 1:
            with ProcessPoolExecutor(min(workers, len(tasks))) as pool:
                for r in pool.map(_write_shard, tasks):
                    results.append(r)
                    on_done and on_done(r)
                    bar and bar.update(len(r["keys"]))
        else:
            for t in tasks:
                results.append(_write_shard(t))
                on_done and on_done(results[-1])
                bar and bar.update(len(t.samples))
    finally:
        if bar:
            bar.close()
    return results


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)
