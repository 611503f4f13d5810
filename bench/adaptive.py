"""Speed of the content-adaptive backbone (OS 8→16) vs the dense backbones at OS8 and OS16.

Forward (inference) and forward+backward time at the given sizes for high-res fractions p (random
masks of 4×4-cell blocks with exactly that share), beside the ideal MAC ratio (adaptive backbone
MACs as cadist computes them / dense OS8 MACs). Goals: CPU time ratio to OS8 ≤ 1.5 × the MAC ratio;
GPU speedup ≥ 0.75 of the ideal. Prints one JSON object.

Variants (each compared with the dense backbones in the same form): "eager" is the training form
under autocast; "folded" is the inference form of `cadist.nets.fold` (BN folded into the convs,
weights in --dtype; the fused Triton gather-GEMM on CUDA); "folded_torch" is the folded form with
torch's gather + matmul, to see what the kernel adds; "eager_torch" likewise for the training form
(whose forward and backward use the fused kernels on CUDA).

    python bench/adaptive.py [--model resnet101 --sizes 512x1024 --fractions 0.1,0.25,0.5 --device cpu]

With --head dense|adaptive the whole models (backbone, head, upsampling) are compared instead:
dense DeepLabv3 at OS8 and OS16 vs the edge model with that head, at p ∈ --fractions (default
0,0.1,0.25,0.5); goals for the adaptive head on the CPU: time ratio to OS8 ≤ 1.2 × the MAC ratio,
and at p = 0.1 within 1.5× the dense OS16 model's time.
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
from cadist.adaptive import kernels
from cadist.adaptive.resnet import AdaptiveResNet
from cadist.models.resnet import SPECS, ResNet
from cadist.nets.fold import fold_batchnorm
from cadist.nets.macs import MacCounter, count_adaptive

VARIANTS = ("eager", "eager_torch", "folded", "folded_torch")


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


def run_model(model, x, mask, dev, dtype, warmup, repeats, train=True):
    """(forward ms, forward+backward ms or None) under bf16 autocast or in float32."""
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

    f = timed(fwd, warmup, repeats, dev)
    return f, timed(fwd_bwd, warmup, repeats, dev) if train else None


def folded(model, dtype):
    """Inference form: BN folded, weights (and later inputs) in the bench dtype, no autocast."""
    return fold_batchnorm(model).to(torch.bfloat16 if dtype == "bf16" else torch.float32)


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
    ap.add_argument(
        "--variants",
        default="eager,folded",
        help="eager: the training form under autocast (forward and forward+backward); folded: "
        "BN folded, weights in --dtype, inference only (the Triton kernel on CUDA); "
        "folded_torch: folded with torch's gather + matmul instead of the kernel",
    )
    ap.add_argument(
        "--head",
        choices=["dense", "adaptive"],
        help="compare whole models (DeepLabv3 with this head on the adaptive backbone) instead of "
        "backbones",
    )
    args = ap.parse_args()
    if args.head:
        whole_models(args, ap)
        return
    fractions = [float(v) for v in args.fractions.split(",")]
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
    variants = args.variants.split(",")
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        ap.error(f"--variants {','.join(sorted(unknown))}: expected some of {','.join(VARIANTS)}")
    models = {"eager": (dense8, dense16, ada)}
    if any(v.startswith("folded") for v in variants):
        models["folded"] = tuple(folded(m, args.dtype) for m in (dense8, dense16, ada))
    rows = []
    for size in args.sizes.split(","):
        h, w = (int(v) for v in size.split("x"))
        x = torch.randn(args.batch, 3, h, w, device=dev)
        g8, g16 = dense_gmac(spec, 8, h, w), dense_gmac(spec, 16, h, w)
        masks = {p: block_mask(args.batch, h // 8, w // 8, p).to(dev) for p in fractions}
        macs = {p: count_adaptive(name, masks[p][:1].cpu(), h, w) for p in fractions}
        for variant in variants:
            d8, d16, am = models["folded" if variant.startswith("folded") else "eager"]
            kernels.set_impl("torch" if variant.endswith("_torch") else "auto")
            eager = variant.startswith("eager")
            xv = x if eager or args.dtype == "fp32" else x.bfloat16()
            dt = args.dtype if eager else "fp32"  # folded models carry their dtype
            base = {}
            for label, model, g in (("dense_os8", d8, g8), ("dense_os16", d16, g16)):
                f, fb = run_model(model, xv, None, dev, dt, args.warmup, args.repeats, eager)
                base[label] = (f, fb)
                rows.append(
                    {"input_hw": [h, w], "variant": variant, "backbone": label,
                     "p": 1.0 if label == "dense_os8" else 0.0, "gmac": round(g, 2),
                     "fwd_ms": round(f, 2), "fwd_bwd_ms": None if fb is None else round(fb, 2)}
                )  # fmt: skip
            for p in fractions:
                f, fb = run_model(am, xv, masks[p], dev, dt, args.warmup, args.repeats, eager)
                mac_ratio = macs[p]["backbone_gmac_actual"] / g8
                row = {
                    "input_hw": [h, w],
                    "variant": variant,
                    "backbone": "adaptive_os8to16",
                    "p": p,
                    "gmac": round(macs[p]["backbone_gmac_actual"], 2),
                    "gmac_method_rules": round(macs[p]["backbone_gmac"], 2),
                    "fwd_ms": round(f, 2),
                    "mac_ratio_to_os8": round(mac_ratio, 4),
                    "fwd_time_ratio_to_os8": round(f / base["dense_os8"][0], 4),
                    "fwd_time_over_mac_ratio": round(f / base["dense_os8"][0] / mac_ratio, 3),
                    "fwd_speedup_vs_ideal": round(mac_ratio * base["dense_os8"][0] / f, 3),
                }
                if fb is not None:
                    row |= {
                        "fwd_bwd_ms": round(fb, 2),
                        "fwd_bwd_time_ratio_to_os8": round(fb / base["dense_os8"][1], 4),
                        "fwd_bwd_time_over_mac_ratio": round(
                            fb / base["dense_os8"][1] / mac_ratio, 3
                        ),
                        "fwd_bwd_speedup_vs_ideal": round(mac_ratio * base["dense_os8"][1] / fb, 3),
                    }
                rows.append(row)
    kernels.set_impl("auto")
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


def whole_models(args, ap) -> None:
    """--head: dense DeepLabv3 OS8/OS16 vs the edge model with the head asked for, whole models,
    side by side in one run; forward and forward+backward (eager, fp32 or bf16 autocast)."""
    from cadist.nets.build import build_model
    from cadist.nets.macs import count_dense

    if args.model == "resnet_tiny":
        dense_name, name = "deeplabv3_resnet_tiny", "deeplabv3_batch_ap_resnet_tiny"
    else:
        dense_name, name = f"deeplabv3_{args.model}", f"deeplabv3_batch_ap_{args.model}"
    fractions = [float(v) for v in ("0,0.1,0.25,0.5" if args.fractions == "0.1,0.25,0.5"
                                    else args.fractions).split(",")]  # fmt: skip
    dev = torch.device(args.device)
    # (the head's image-pooling BN needs two images in training mode)
    args.batch = max(args.batch, 2)
    torch.manual_seed(0)
    dense8 = build_model(dense_name, 8).to(dev)
    dense16 = build_model(dense_name, 16).to(dev)
    dense16.load_state_dict(dense8.state_dict())
    ada = build_model(name, head=args.head).to(dev)
    ada.load_state_dict(dense8.state_dict())
    rows = []
    for size in args.sizes.split(","):
        h, w = (int(v) for v in size.split("x"))
        x = torch.randn(args.batch, 3, h, w, device=dev)
        g = {os_: count_dense(dense_name, os_, h, w)["total_gmac"] for os_ in (8, 16)}
        base = {}
        for os_, model in ((8, dense8), (16, dense16)):
            f, fb = run_model(model, x, None, dev, args.dtype, args.warmup, args.repeats)
            base[os_] = (f, fb)
            rows.append({"input_hw": [h, w], "model": f"dense_os{os_}", "p": float(os_ == 8),
                         "total_gmac": round(g[os_], 2), "fwd_ms": round(f, 2),
                         "fwd_bwd_ms": round(fb, 2)})  # fmt: skip
        for p in fractions:
            mask = block_mask(args.batch, h // 8, w // 8, p).to(dev)
            m = count_adaptive(name, mask[:1].cpu(), h, w, head=args.head)
            f, fb = run_model(ada, x, mask, dev, args.dtype, args.warmup, args.repeats)
            ratio = m["total_gmac_actual"] / g[8]
            rows.append({
                "input_hw": [h, w], "model": f"adaptive_{args.head}_head", "p": p,
                "total_gmac": round(m["total_gmac_actual"], 2),
                "head_gmac": round(m["head_gmac"], 2),
                "fwd_ms": round(f, 2), "fwd_bwd_ms": round(fb, 2),
                "mac_ratio_to_os8": round(ratio, 4),
                "fwd_time_over_mac_ratio": round(f / base[8][0] / ratio, 3),
                "fwd_bwd_time_over_mac_ratio": round(fb / base[8][1] / ratio, 3),
                "fwd_time_ratio_to_os16": round(f / base[16][0], 3),
                "fwd_bwd_time_ratio_to_os16": round(fb / base[16][1], 3),
            })  # fmt: skip
    print(json.dumps({"bench": "adaptive_whole_model", "head": args.head, "model": args.model,
                      "batch": args.batch, "device": str(dev), "dtype": args.dtype,
                      "torch": torch.__version__, "threads": torch.get_num_threads(),
                      "cpus": os.cpu_count(), "results": rows}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
