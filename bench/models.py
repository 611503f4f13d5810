"""Forward time of the dense DeepLabv3 at OS16 and OS8, with and without channels-last.

A baseline for later work to beat. Prints one JSON object with ms per forward (median of
--repeats after --warmup), the model's GMac, and side-by-side ratios from the same run.

    python bench/models.py [--model deeplabv3_resnet101 --height 512 --width 1024 --device cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/x.py`
from bench.common import timed  # noqa: E402
from cadist.nets.build import build_model
from cadist.nets.macs import count_dense


def time_forward(model, x, warmup, repeats, dtype):
    ac = torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")

    def fwd():
        with torch.inference_mode(), ac:
            model(x)

    return timed(fwd, warmup, repeats, x.device)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="deeplabv3_resnet101")
    ap.add_argument("--height", type=int, default=512)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    results = []
    for os_ in (16, 8):
        macs = count_dense(args.model, os_, args.height, args.width)
        model = build_model(args.model, os_).eval().to(device)
        x = torch.randn(args.batch, 3, args.height, args.width, device=device)
        for cl in (False, True):
            fmt = torch.channels_last if cl else torch.contiguous_format
            m, xx = model.to(memory_format=fmt), x.contiguous(memory_format=fmt)
            ms = time_forward(m, xx, args.warmup, args.repeats, args.dtype)
            results.append(
                {
                    "output_stride": os_,
                    "channels_last": cl,
                    "ms_per_forward": round(ms, 2),
                    "images_per_s": round(1000 * args.batch / ms, 3),
                    "total_gmac": round(macs["total_gmac"], 2),
                    "effective_gmac_per_s": round(macs["total_gmac"] * args.batch / ms * 1000, 1),
                }
            )
        del model
    by = {(r["output_stride"], r["channels_last"]): r["ms_per_forward"] for r in results}
    ratios = {
        "channels_last_speedup_os16": round(by[(16, False)] / by[(16, True)], 3),
        "channels_last_speedup_os8": round(by[(8, False)] / by[(8, True)], 3),
        "os8_over_os16_time": round(by[(8, False)] / by[(16, False)], 3),
        "os8_over_os16_macs": round(results[2]["total_gmac"] / results[0]["total_gmac"], 3),
    }
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    print(
        json.dumps(
            {
                "bench": "models",
                "model": args.model,
                "input_hw": [args.height, args.width],
                "batch": args.batch,
                "device": str(device),
                "device_name": dev_name,
                "dtype": args.dtype,
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "cpus": os.cpu_count(),
                "results": results,
                "ratios": ratios,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
