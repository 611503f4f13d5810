"""One irregular 3×3 convolution (§3.4) three ways, beside the dense convolution it replaces:
torch's gather + matmul, the fused Triton gather-GEMM (CUDA), and cuDNN's dense 3×3 conv over the
whole OS8 canvas. Also checks that the kernel agrees with torch. Prints one JSON object.

    python bench/irregular_conv.py --device cuda --dtype bf16 [--size 1024x2048 --batch 4 --ch 256]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/x.py`
from bench.adaptive import block_mask  # noqa: E402
from bench.common import timed  # noqa: E402
from cadist.adaptive import kernels  # noqa: E402
from cadist.adaptive.folded import gather_conv  # noqa: E402
from cadist.adaptive.layout import MixedLayout  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--size", default="512x1024", help="input image H×W (the grid is H/8 × W/8)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--ch", type=int, default=256, help="input = output channels")
    ap.add_argument("--fractions", default="0.1,0.25,0.5,1.0")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    dev = torch.device(args.device)
    dt = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    h, w = (int(v) // 8 for v in args.size.split("x"))
    c, b = args.ch, args.batch
    torch.manual_seed(0)
    weight = torch.randn(c, c, 3, 3, device=dev, dtype=dt) / (3 * c**0.5)
    w9 = weight.permute(2, 3, 1, 0).reshape(9 * c, c).contiguous()
    bias = torch.randn(c, device=dev, dtype=dt)
    dense_in = torch.randn(b, c, h, w, device=dev, dtype=dt)
    with torch.inference_mode():
        dense_ms = timed(
            lambda: F.conv2d(dense_in, weight, bias, padding=2, dilation=2), *_wr(args), dev
        )
        rows = []
        for p in (float(v) for v in args.fractions.split(",")):
            layout = MixedLayout(block_mask(b, h, w, p).to(dev), 2)
            idx = layout.table(1, 2)
            n = layout.elements(1).n
            x = torch.randn(n + 1, c, device=dev, dtype=dt)
            x[n] = 0
            row = {"p": p, "elements": n, "dense_elements": b * h * w}
            kernels.set_impl("torch")
            ref = gather_conv(x, idx, w9, bias, True)
            row["torch_ms"] = round(
                timed(lambda x=x, idx=idx: gather_conv(x, idx, w9, bias, True), *_wr(args), dev), 3
            )
            if dev.type == "cuda" and kernels.available():
                kernels.set_impl("triton")
                got = gather_conv(x, idx, w9, bias, True)
                row["triton_rel_err"] = float(
                    (got.float() - ref.float()).norm() / ref.float().norm()
                )
                row["triton_ms"] = round(
                    timed(
                        lambda x=x, idx=idx: gather_conv(x, idx, w9, bias, True), *_wr(args), dev
                    ),
                    3,
                )
            kernels.set_impl("auto")
            row["element_ratio"] = round(n / (b * h * w), 4)
            for k in ("torch_ms", "triton_ms"):
                if k in row:
                    row[k.replace("_ms", "_time_ratio_to_dense")] = round(row[k] / dense_ms, 4)
            rows.append(row)
    print(json.dumps({
        "bench": "irregular_conv", "device": str(dev), "dtype": args.dtype, "grid": [h, w],
        "batch": b, "channels": c, "torch": torch.__version__,
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "dense_conv_ms": round(dense_ms, 3), "results": rows,
    }, indent=1))  # fmt: skip


def _wr(args):
    return args.warmup, args.repeats


if __name__ == "__main__":
    main()
