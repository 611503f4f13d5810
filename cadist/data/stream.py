"""Streaming WebDataset shards into training and validation batches, one part per (rank, worker).

Training: every (rank, loader worker) reader owns a disjoint subset of the shards, re-reads it in a
fresh random order on every pass (resampling, endless), shuffles samples through a buffer and yields
a fixed number of batches per epoch, so all ranks run the same number of steps. Validation: every
sample is read exactly once across all ranks and workers, at full resolution, no padding.

Ranks, world size and worker counts arrive as plain arguments; nothing here asks Ray who it is.
Sources: local paths, `file://`, `http(s)://`, `s3://` and `gs://` (streamed through
`cadist.storage.store`'s filesystem layer, pyarrow.fs: credentials and endpoint from the environment, no
CLI needed), given as lists, brace patterns (`train-{000000..000099}.tar`) or a `*-manifest.json`
(local or on object storage). `pipe:` commands (e.g. `pipe:aws s3 cp … -`) run only with
`allow_pipe=True`. No shell command is built from a URL.
"""

from __future__ import annotations

import hashlib
import importlib
import io
import json
import logging
import random
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from urllib.parse import urlparse

import braceexpand
import numpy as np
import simplejpeg
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from cadist.data.manifest import read_manifest
from cadist.data.transforms import TrainTransform, normalize_batch, stack_images
from cadist.errors import ShardError
from cadist.storage.store import Storage
from cadist.storage.uri import StorageError

log = logging.getLogger(__name__)
wds_gopen = importlib.import_module(
    "webdataset.gopen"
)  # the package re-exports a function of that name

ALLOWED_SCHEMES = ("", "file", "http", "https", "s3", "gs")
IMAGE_KEYS = ("jpg", "png")


def expand_shards(spec: str | Path | Sequence[str | Path]) -> list[str]:
    """Shard URLs from a list, a brace pattern, or a manifest file (its shards, in order)."""
    items = [spec] if isinstance(spec, (str, Path)) else list(spec)
    urls: list[str] = []
    for item in items:
        item = str(item)
        if item.endswith("manifest.json"):
            m = read_manifest(item)
            urls += [_beside(item, e["name"]) for e in m["shards"]]
        else:
            urls += list(braceexpand.braceexpand(item))
    if not urls:
        raise ShardError(f"shard list {spec!r} is empty; give paths, a brace pattern or a manifest")
    return urls


def _beside(manifest: str, name: str) -> str:
    """The URL of shard `name` listed in `manifest` (in the same folder or prefix)."""
    if "://" in manifest:  # s3://, gs://, http(s)://, file://: a URL, not a local path
        return f"{manifest.rpartition('/')[0]}/{name}"
    return str(Path(manifest).parent / name)


def shard_set(spec: str | Path | Sequence[str | Path]) -> dict:
    """What a run records of a shard set (MLflow's dataset input): {"name", "digest", "source",
    "shards", "samples"}. From manifests: name `<folder>/<split>`, the digest of the shards' names
    and sha256 (the same files, the same digest — wherever they are), samples counted; from
    paths or URLs: the digest of the URL list, samples unknown (None). Reads no shard."""
    items = [str(i) for i in ([spec] if isinstance(spec, (str, Path)) else spec)]
    urls = expand_shards(spec)
    manifests = [i for i in items if i.endswith("manifest.json")]
    if manifests and len(manifests) == len(items):
        found = [(i if "://" in i else str(Path(i).resolve()), read_manifest(i))
                 for i in manifests]  # fmt: skip
        content = [[e["name"], e["sha256"]] for _, m in found for e in m["shards"]]
        name = "+".join(f"{p.rsplit('/', 2)[-2]}/{m['split']}" for p, m in found)
        source, samples = found[0][0], sum(m["num_samples"] for _, m in found)
    else:
        content = urls
        folders = {u.rsplit("/", 2)[-2] if u.count("/") >= 1 else "." for u in urls}
        name = folders.pop() if len(folders) == 1 else f"{len(urls)} shards"
        first = urls[0]
        source = first if "://" in first else str(Path(first).resolve().parent)
        samples = None
    digest = hashlib.sha256(json.dumps(content).encode()).hexdigest()[:12]
    return {"name": name, "digest": digest, "source": source, "shards": len(urls),
            "samples": samples}  # fmt: skip


def check_url(url: str, allow_pipe: bool = False) -> None:
    scheme = urlparse(url).scheme
    if scheme == "pipe":
        if not allow_pipe:
            raise ShardError(
                f"{url}: pipe: commands are disabled; set data.allow_pipe: true in the "
                f"job if you trust this command"
            )
    elif scheme not in ALLOWED_SCHEMES:
        raise ShardError(
            f"{url}: scheme {scheme!r} is not allowed; use a local path, file://, "
            f"http(s)://, s3:// or gs://"
        )


def open_url(url: str, allow_pipe: bool = False):
    """A readable binary stream for one shard URL (argument lists only, never a shell)."""
    check_url(url, allow_pipe)
    pr = urlparse(url)
    try:
        if pr.scheme in ("", "file"):
            return open(pr.path if pr.scheme == "file" else url, "rb")
        if pr.scheme in ("http", "https"):
            return urllib.request.urlopen(url, timeout=60)
        if pr.scheme in ("s3", "gs"):  # streamed: read as the tar iterator asks for it
            return Storage(url).open_input("")
        return wds_gopen.gopen(url, "rb")  # pipe:, explicitly allowed by the user
    except FileNotFoundError:
        raise ShardError(
            f"{url}: no such shard; build shards with `cadist shards build --out "
            f"{url.rpartition('/')[0]}` or fix the shard list"
        ) from None
    except StorageError as exn:
        raise ShardError(f"cannot open shard: {exn}") from None
    except OSError as exn:
        raise ShardError(f"{url}: cannot open shard ({exn})") from None


def iter_raw_samples(url: str, allow_pipe: bool = False) -> Iterator[dict]:
    """Undecoded samples of one shard: dicts with __key__, __url__, an image key, label.png, json.

    A damaged tar or a sample that misses a part raises `ShardError` naming the URL and key.
    """
    stream = open_url(url, allow_pipe)
    current: dict | None = None
    try:
        files = wds.tariterators.tar_file_iterator(stream)
        while True:
            try:
                f = next(files)
            except StopIteration:
                break
            except Exception as exn:  # tarfile.ReadError, truncated data, I/O errors
                after = f" after sample {current['__key__']!r}" if current else ""
                raise ShardError(
                    f"{url}: corrupt shard{after} ({type(exn).__name__}: "
                    f"{str(exn).split(' @ ')[0]}); rebuild it with "
                    f"`cadist shards build ... --overwrite`"
                ) from None
            key, ext = wds.tariterators.base_plus_ext(f["fname"])
            if current is not None and key != current["__key__"]:
                yield _checked(current)
                current = None
            if current is None:
                current = {"__key__": key, "__url__": url}
            current[ext.lower()] = f["data"]
        if current is not None:
            yield _checked(current)
    finally:
        stream.close()


def _checked(sample: dict) -> dict:
    missing = [k for k in ("label.png", "json") if k not in sample]
    if not any(k in sample for k in IMAGE_KEYS):
        missing.insert(0, "jpg|png")
    if missing:
        raise ShardError(
            f"{sample['__url__']}: sample {sample['__key__']!r} misses "
            f"{', '.join(missing)} (truncated or foreign shard); rebuild it with "
            f"`cadist shards build ... --overwrite`"
        )
    return sample


def decode(sample: dict) -> tuple[np.ndarray, np.ndarray]:
    """(image (H, W, 3) uint8 RGB, label (H, W) uint8 trainIds) of a raw sample."""
    where = f"{sample['__url__']}: sample {sample['__key__']!r}"
    try:
        if "jpg" in sample:  # libjpeg-turbo straight into numpy: ~25 % faster than PIL
            img = simplejpeg.decode_jpeg(sample["jpg"], colorspace="RGB")
        else:
            im = Image.open(io.BytesIO(sample["png"]))
            img = np.array(im if im.mode == "RGB" else im.convert("RGB"))
    except Exception as exn:
        raise ShardError(f"{where}: cannot decode image ({exn})") from None
    try:
        lab = np.array(Image.open(io.BytesIO(sample["label.png"])))
    except Exception as exn:
        raise ShardError(f"{where}: cannot decode label ({exn})") from None
    if lab.ndim != 2 or lab.shape != img.shape[:2]:
        raise ShardError(f"{where}: label shape {lab.shape} does not match image {img.shape[:2]}")
    return img, lab


def _collate(items: list[tuple[np.ndarray, np.ndarray, str, str]], normalize: bool) -> dict:
    """uint8 images/labels (any strides) → image batch (normalised float or uint8) + int64 labels."""
    labels = torch.empty(len(items), *items[0][1].shape, dtype=torch.int64)
    for i, item in enumerate(items):
        labels[i].copy_(torch.from_numpy(np.ascontiguousarray(item[1])))
    images = [i[0] for i in items]
    return {
        "image": normalize_batch(images) if normalize else stack_images(images),
        "label": labels,
        "key": [i[2] for i in items],
        "shard": [i[3] for i in items],
    }


class ShardStream(IterableDataset):
    """Batches of {"image": (B, 3, H, W) float32, "label": (B, H, W) int64, "key": [str],
    "shard": [str]} (sample keys and the shard URL each sample came from).

    Args:
        shards: URLs, a brace pattern or a manifest.
        train: training stream (augmented, endless within `steps_per_epoch`) or validation.
        rank, world_size: this process's data-parallel rank and the number of ranks.
        num_workers: DataLoader workers per rank (0 = read in the main process).
        steps_per_epoch: batches each rank yields per epoch (training only).
        start_batch: batches of the current epoch already consumed (resume); they are skipped
            without decoding, so a resumed stream continues exactly where it stopped.
        skip_bad: skip (and count, and log) corrupt shards and samples instead of raising.
        normalize: yield §1.2-normalised float32 images (default), or False for (B, 3, H, W) uint8
            that the consumer normalises with `transforms.normalize_uint8` — on the GPU that is
            free, and worker→trainer and host→device transfers shrink 4×.
    """

    def __init__(
        self,
        shards,
        *,
        train: bool,
        batch_size: int = 1,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        steps_per_epoch: int | None = None,
        transform: TrainTransform | None = None,
        seed: int = 0,
        shuffle_buffer: int = 64,
        skip_bad: bool = False,
        allow_pipe: bool = False,
        epoch: int = 0,
        start_batch: int = 0,
        normalize: bool = True,
    ):
        super().__init__()
        self.urls = expand_shards(shards)
        for u in self.urls:
            check_url(u, allow_pipe)
        if not 0 <= rank < world_size:
            raise ShardError(f"rank {rank} is outside world size {world_size}")
        if train and not steps_per_epoch:
            raise ShardError("a training stream needs steps_per_epoch > 0")
        readers = world_size * max(1, num_workers)
        if train and len(self.urls) < readers:
            raise ShardError(
                f"{len(self.urls)} training shards for {world_size} ranks × {max(1, num_workers)} "
                f"loader workers = {readers} readers; every reader needs its own shard: rebuild with "
                f"a smaller --samples-per-shard or lower data.num_workers"
            )
        self.train, self.batch_size, self.rank, self.world_size = (
            train,
            batch_size,
            rank,
            world_size,
        )
        self.num_workers, self.steps_per_epoch = num_workers, steps_per_epoch
        self.transform = transform or TrainTransform()
        self.seed, self.shuffle_buffer, self.skip_bad = seed, shuffle_buffer, skip_bad
        self.allow_pipe, self.normalize = allow_pipe, normalize
        self.epoch, self.start_batch = epoch, start_batch
        self.skipped = {"samples": 0, "shards": 0}

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch (and the batches of it already consumed) the next iterator yields."""
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        if not self.train:
            raise TypeError("a validation stream has no fixed length per rank")
        return self.steps_per_epoch

    def _slot(self) -> tuple[int, int, int, int]:
        info = get_worker_info()
        w, nw = (info.id, info.num_workers) if info else (0, 1)
        if nw != max(1, self.num_workers):
            raise ShardError(
                f"rank {self.rank}: stream built for {self.num_workers} loader workers "
                f"but the DataLoader runs {nw}; pass the same number to both"
            )
        return self.rank * nw + w, self.world_size * nw, w, nw

    def __iter__(self):
        slot, nslots, w, nw = self._slot()
        return (
            self._train_batches(slot, nslots, w, nw)
            if self.train
            else self._val_batches(slot, nslots)
        )

    # -- reading with optional skipping of bad data --------------------------------------------
    def _skip(self, exn: ShardError, what: str) -> None:
        if not self.skip_bad:
            raise exn
        self.skipped[what] += 1
        log.warning(
            "skipping bad %s (%d skipped so far on rank %d): %s",
            what[:-1],
            self.skipped[what],
            self.rank,
            exn,
        )

    def _read_shard(self, url: str) -> Iterator[dict]:
        try:
            yield from iter_raw_samples(url, self.allow_pipe)
        except ShardError as exn:
            self._skip(exn, "shards")

    def _decode(self, raw: dict):
        try:
            return decode(raw)
        except ShardError as exn:
            self._skip(exn, "samples")
            return None

    # -- training ------------------------------------------------------------------------------
    def _endless(self, urls: list[str], slot: int) -> Iterator[dict]:
        rounds = 0
        while True:
            order = np.random.default_rng([self.seed, self.epoch, slot, rounds]).permutation(
                len(urls)
            )
            n = 0
            for i in order:
                for raw in self._read_shard(urls[i]):
                    n += 1
                    yield raw
            if n == 0:
                raise ShardError(f"rank {self.rank}: no readable samples in shards {urls[:3]}…")
            rounds += 1

    def _train_batches(self, slot: int, nslots: int, w: int, nw: int) -> Iterator[dict]:
        steps = self.steps_per_epoch
        mine = steps // nw + (1 if w < steps % nw else 0)
        # DataLoader hands out worker batches round robin: global batch j*nw + w is ours.
        done = max(0, (self.start_batch - w + nw - 1) // nw)
        raw = self._endless(self.urls[slot::nslots], slot)
        shuffle_rng = random.Random(f"{self.seed}/{self.epoch}/{slot}")
        raw = wds.filters._shuffle(raw, self.shuffle_buffer, self.shuffle_buffer, rng=shuffle_rng)
        index = 0
        for _ in range(done * self.batch_size):
            next(raw)
            index += 1
        for _ in range(mine - done):
            items = []
            while len(items) < self.batch_size:
                sample = next(raw)
                index += 1
                decoded = self._decode(sample)
                if decoded is None:
                    continue
                rng = np.random.default_rng([self.seed, self.epoch, slot, index])
                img, lab = self.transform.augment(*decoded, rng)
                items.append((img, lab, sample["__key__"], sample["__url__"]))
            yield _collate(items, self.normalize)

    # -- validation ----------------------------------------------------------------------------
    def _val_batches(self, slot: int, nslots: int) -> Iterator[dict]:
        # Enough shards: each reader takes whole shards. Otherwise every reader walks all shards
        # and keeps every nslots-th sample. Either way each sample is read exactly once.
        by_shard = len(self.urls) >= nslots
        urls = self.urls[slot::nslots] if by_shard else self.urls
        items, index = [], -1
        for url in urls:
            for raw in self._read_shard(url):
                index += 1
                if not by_shard and index % nslots != slot:
                    continue
                decoded = self._decode(raw)
                if decoded is None:
                    continue
                items.append((*decoded, raw["__key__"], url))
                if len(items) == self.batch_size:
                    yield _collate(items, self.normalize)
                    items = []
        if items:
            yield _collate(items, self.normalize)


def make_loader(stream: ShardStream, pin_memory: bool = False) -> DataLoader:
    """A DataLoader over a stream (batching happens in the stream's workers)."""
    nw = stream.num_workers
    return DataLoader(
        stream,
        batch_size=None,
        num_workers=nw,
        pin_memory=pin_memory,
        prefetch_factor=2 if nw else None,
        persistent_workers=False,
    )
