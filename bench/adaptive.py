"""Speed of the content-adaptive backbone (OS 8→16) vs the dense backbones at OS8 and OS16.

Forward (inference) and forward+backward time at the given sizes for high-res fractions p (random
masks of 4×4-cell blocks with exactly that share), beside the ideal MAC ratio (adaptive backbone
MACs as cadist computes them / dense OS8 MACs). Goals: CPU time ratio to OS8 ≤ 1.5 × the MAC ratio;
GPU speedup ≥ 0.75 of the ideal. Prints one JSON object.

    python bench/adaptive.py [--model resnet101 --sizes 512x1024 --fractions 0.1,0.25,0.5 --device cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/x.py`
from bench.common import timed  # noqa: E402
from cadist.adaptive.resnet import AdaptiveResNet
from cadist.macs import MacCounter, count_adaptive
from cadist.models.resnet import SPECS, ResNet


def block_mask(b: int, h0: int, w0: int, p: float, seed: int = 0) -> torch.Tensor:
    """(b, h0, w0) mask: exactly round(p·blocks) random 4×4-cell blocks stay high-res (0)."""
    g = torch.Generator().manual_seed(seed)
    nb = (h0 // 4) * (w0 // 4)
    out = []
    for _ in range(b):
        keep = torch.zeros(nb, dtype=torch.bool)
        keep[torch.randperm(nb, generator=g)[: round(p * nb)]] = True
        m = (~keep).long().view(h0 // 4, w0 // 4)
        out.append(m.repeat_interleave(4, 0).repeat_interleave(4, 1))
    return torch.stack(out)


def run_model(model, x, mask, dev, dtype, warmup, repeats):
    args = (x,) if mask is None else (x, mask)
    ac = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dtype == "bf16")

    def fwd():
        with torch.inference_mode(), ac:
            model.eval()(*args)

    def fwd_bwd():
        model.train()
        with ac:
            out = model(*args)
        out.float().mean().backward()
        model.zero_grad(set_to_none=True)

    return timed(fwd, warmup, repeats, dev), timed(fwd_bwd, warmup, repeats, dev)


def dense_gmac(spec, os_, h, w):
    with torch.device("meta"):
        m = ResNet(spec, os_).eval()
        x = torch.empty(1, 3, h, w)
    with torch.no_grad(), MacCounter(b=m) as c:
        m(x)
    return c.counts["b"].gmac()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet101", choices=sorted(SPECS))
    ap.add_argument("--sizes", default="512x1024")
    ap.add_argument("--fractions", default="0.1,0.25,0.5")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    dev = torch.device(args.device)
    spec = SPECS[args.model]
    torch.manual_seed(0)
    dense8, dense16 = ResNet(spec, 8).to(dev), ResNet(spec, 16).to(dev)
    ada = AdaptiveResNet(spec, "os8to16").to(dev)
    ada.load_state_dict(dense8.state_dict())
    name = {
        "resnet101": "deeplabv3_batch_ap_resnet101",
        "resnet50": "deeplabv3_batch_ap_resnet50",
        "resnet_tiny": "deeplabv3_batch_ap_resnet_tiny",
    }[args.model]
    rows = []
    for size in args.sizes.split(","):
        h, w = (int(v) for v in size.split("x"))
        x = torch.randn(args.batch, 3, h, w, device=dev)
        g8 = dense_gmac(spec, 8, h, w)
        base = {}
        for label, model in (("dense_os8", dense8), ("dense_os16", dense16)):
            f, fb = run_model(model, x, None, dev, args.dtype, args.warmup, args.repeats)
            base[label] = (f, fb)
            g = g8 if label == "dense_os8" else dense_gmac(spec, 16, h, w)
            rows.append(
                {
                    "input_hw": [h, w],
                    "backbone": label,
                    "p": 1.0 if label == "dense_os8" else 0.0,
                    "gmac": round(g, 2),
                    "fwd_ms": round(f, 2),
                    "fwd_bwd_ms": round(fb, 2),
                }
            )
        for p in (float(v) for v in args.fractions.split(",")):
            mask = block_mask(args.batch, h // 8, w // 8, p).to(dev)
            mac = count_adaptive(name, mask[:1].cpu(), h, w)
            f, fb = run_model(ada, x, mask, dev, args.dtype, args.warmup, args.repeats)
            mac_ratio = mac["backbone_gmac_actual"] / g8
            rows.append(
                {
                    "input_hw": [h, w],
                    "backbone": "adaptive_os8to16",
                    "p": p,
                    "gmac": round(mac["backbone_gmac_actual"], 2),
                    "gmac_method_rules": round(mac["backbone_gmac"], 2),
                    "fwd_ms": round(f, 2),
                    "fwd_bwd_ms": round(fb, 2),
                    "mac_ratio_to_os8": round(mac_ratio, 4),
                    "fwd_time_ratio_to_os8": round(f / base["dense_os8"][0], 4),
                    "fwd_bwd_time_ratio_to_os8": round(fb / base["dense_os8"][1], 4),
                    "fwd_time_over_mac_ratio": round(f / base["dense_os8"][0] / mac_ratio, 3),
                    "fwd_bwd_time_over_mac_ratio": round(fb / base["dense_os8"][1] / mac_ratio, 3),
                    "fwd_speedup_vs_ideal": round((base["dense_os8"][0] / f) / (1 / mac_ratio), 3),
                }
            )
    print(
        json.dumps(
            {
                "bench": "adaptive",
                "model": args.model,
                "batch": args.batch,
                "device": str(dev),
                "dtype": args.dtype,
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "cpus": os.cpu_count(),
                "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                "results": rows,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
