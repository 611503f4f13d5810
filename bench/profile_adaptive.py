"""Profile one forward of the adaptive backbone (torch.profiler): the top operators by device and
host time, to see where the time over the ideal goes. Prints a table, then one JSON line.

    python bench/profile_adaptive.py [--device cuda --dtype bf16 --size 512x1024 --batch 4 --p 0.25]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch.profiler import ProfilerActivity, profile

from bench.adaptive import block_mask
from cadist.adaptive.resnet import AdaptiveResNet
from cadist.models.resnet import SPECS
from cadist.nets.fold import fold_batchnorm


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--size", default="512x1024")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--p", type=float, default=0.25)
    ap.add_argument("--model", default="resnet101")
    ap.add_argument("--folded", action="store_true", help="the inference form (BN folded, --dtype)")
    args = ap.parse_args()
    dev = torch.device(args.device)
    h, w = (int(v) for v in args.size.split("x"))
    model = AdaptiveResNet(SPECS[args.model]).to(dev).eval()
    x = torch.randn(args.batch, 3, h, w, device=dev)
    if args.folded:
        dt = torch.bfloat16 if args.dtype == "bf16" else torch.float32
        model, x = fold_batchnorm(model).to(dt), x.to(dt)
    mask = block_mask(args.batch, h // 8, w // 8, args.p).to(dev)
    bf16_autocast = args.dtype == "bf16" and not args.folded
    ac = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16_autocast)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    with torch.inference_mode(), ac:
        for _ in range(3):
            model(x, mask)
        sync()
        t0 = time.perf_counter()
        model.layout(mask, dev)
        sync()
        layout_ms = (time.perf_counter() - t0) * 1000
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
        with profile(activities=acts) as prof:
            model(x, mask)
            sync()
    key = "cuda_time_total" if dev.type == "cuda" else "cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=18))
    ev = prof.key_averages()
    print(
        json.dumps(
            {
                "bench": "profile_adaptive",
                "device": str(dev),
                "dtype": args.dtype,
                "size": [h, w],
                "batch": args.batch,
                "p": args.p,
                "folded": args.folded,
                "layout_build_ms": round(layout_ms, 2),
                "top": [
                    {
                        "op": e.key,
                        "calls": e.count,
                        "device_ms": round(getattr(e, "device_time_total", 0) / 1000, 3),
                        "cpu_ms": round(e.cpu_time_total / 1000, 3),
                    }
                    for e in sorted(ev, key=lambda e: -getattr(e, "device_time_total", 0))[:12]
                ],
            }
        )
    )


if __name__ == "__main__":
    main()
