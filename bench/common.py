"""Helpers shared by the benchmarks: device sync, median timing, the train-step report."""

from __future__ import annotations

import statistics
import time

import torch


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, warmup: int, repeats: int, dev: torch.device) -> float:
    """Median milliseconds of `fn()` over `repeats` calls after `warmup` calls."""
    ts = []
    for i in range(warmup + repeats):
        sync(dev)
        t0 = time.perf_counter()
        fn()
        sync(dev)
        if i >= warmup:
            ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1000


def step_report(args, dev: torch.device, losses: list[float], times: list[float], **extra) -> dict:
    """The JSON record of bench/train_step.py (steady state = all steps after the first two)."""
    steady = statistics.median(times[2:] or times)
    out = {
        "bench": "train_step",
        **extra,
        "model": args.model,
        "output_stride": args.output_stride,
        "batch": args.batch,
        "crop": args.crop,
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "channels_last": args.channels_last,
        "torch": torch.__version__,
        "ms_per_step": round(steady * 1000, 2),
        "images_per_s": round(args.batch / steady, 2),
        "loss_first": round(losses[0], 4),
        "loss_last": round(losses[-1], 4),
        "losses": [round(v, 4) for v in losses],
    }
    if dev.type == "cuda":
        out["max_memory_gib"] = round(torch.cuda.max_memory_allocated(dev) / 2**30, 2)
    return out
