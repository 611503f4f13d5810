"""Data loading throughput: the WebDataset shard stream vs a file-per-sample loader.

`shards-jpeg-uint8` yields uint8 batches that the consumer normalises (on a GPU this is free and
cuts transfers 4×); its timing includes that normalisation on the CPU. Both read the same
generated Cityscapes-layout tree and apply the same training transform (crop,
colour jitter, flip, normalisation; method.md §1.3). The file-per-sample loader opens the image PNG
and the labelIds PNG with PIL and maps labels through the lookup table per sample, as the reference
implementation does. Prints one JSON object; compare the ratios, not absolute numbers.

    python bench/loader.py [--height 1024 --width 2048 --images 24 --samples 48]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from cadist.data import cityscapes as cs
from cadist.data.shards import build_shards
from cadist.data.stream import ShardStream, make_loader
from cadist.data.synthetic import write_tree
from cadist.data.transforms import TrainTransform, normalize_uint8


class FilePerSample(Dataset):
    """The reference's way: PIL per file, labelIds → trainIds per sample."""

    def __init__(self, root, transform):
        self.samples, _ = cs.list_samples(root, "train")
        self.lut = cs.label_lut()
        self.transform = transform

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        s = self.samples[i]
        img = np.array(Image.open(s.image).convert("RGB"))
        lab = self.lut[np.array(Image.open(s.label))]
        x, y = self.transform(img, lab, np.random.default_rng(i))
        return x, y.long()


def _measure(batches, n_samples, warmup=2):
    it = iter(batches)
    for _ in range(warmup):
        next(it)
    seen, t0 = 0, time.perf_counter()
    while seen < n_samples:
        b = next(it)
        x = b["image"] if isinstance(b, dict) else b[0]
        if x.dtype == torch.uint8:  # the consumer's share of the work (a GPU would do this)
            x = normalize_uint8(x)
        seen += x.shape[0]
    return seen / (time.perf_counter() - t0)


def _cycle(loader_fn):
    while True:
        yield from loader_fn()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--height", type=int, default=1024)
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--crop", type=int, default=768)
    ap.add_argument("--images", type=int, default=24)
    ap.add_argument("--samples", type=int, default=48, help="samples timed per configuration")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--data", default=None, help="reuse/keep the generated data here")
    args = ap.parse_args()
    torch.set_num_threads(1)  # loader workers are processes; keep the comparison about I/O+decode
    root = Path(args.data or tempfile.mkdtemp(prefix="cadist-bench-"))
    tree = root / f"cs{args.height}x{args.width}"
    if not (tree / "leftImg8bit").exists():
        write_tree(
            tree, args.images, 0, args.height, args.width, seed=0, workers=os.cpu_count() or 1
        )
    shard_dirs = {}
    for fmt in ("jpeg", "png"):
        out = root / f"shards-{fmt}-{args.height}x{args.width}"
        if not (out / "train-manifest.json").exists():
            build_shards(tree, "train", out, samples_per_shard=4, image_format=fmt, progress=False)
        shard_dirs[fmt] = out
    tf = TrainTransform(args.crop, args.crop)
    bs = args.batch_size
    results = []
    for workers in (0, 2):
        for fmt, normalize in (("jpeg", True), ("png", True), ("jpeg", False)):
            stream = ShardStream(
                shard_dirs[fmt] / "train-manifest.json",
                train=True,
                batch_size=bs,
                num_workers=workers,
                steps_per_epoch=10_000,
                transform=tf,
                shuffle_buffer=8,
                normalize=normalize,
            )
            sps = _measure(iter(make_loader(stream)), args.samples)
            name = f"shards-{fmt}" + ("" if normalize else "-uint8")
            results.append({"loader": name, "workers": workers, "samples_per_s": round(sps, 2)})
        ds = FilePerSample(tree, tf)

        def files(ds=ds, workers=workers):
            return DataLoader(ds, batch_size=bs, shuffle=True, num_workers=workers, drop_last=True)

        sps = _measure(_cycle(files), args.samples)
        results.append(
            {"loader": "file-per-sample-png", "workers": workers, "samples_per_s": round(sps, 2)}
        )
    by = {(r["loader"], r["workers"]): r["samples_per_s"] for r in results}
    ratios = {
        f"{name}_vs_files_w{w}": round(by[(name, w)] / by[("file-per-sample-png", w)], 2)
        for name in ("shards-jpeg", "shards-png", "shards-jpeg-uint8")
        for w in (0, 2)
    }
    print(
        json.dumps(
            {
                "bench": "loader",
                "input_hw": [args.height, args.width],
                "crop": args.crop,
                "batch_size": bs,
                "images": args.images,
                "samples_timed": args.samples,
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "results": results,
                "ratios": ratios,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
