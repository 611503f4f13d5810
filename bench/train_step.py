"""Plain PyTorch training steps of the dense DeepLabv3 (the recipe of method.md §8, no Ray, no
DeepSpeed): images/s and the loss over steps on real generated data, CPU or GPU.

It is the smoke test of training on a GPU and the baseline that the distributed path's overhead is
measured against. `--engine deepspeed` runs the same steps through cadist's DeepSpeed engine
(`cadist.train.engine.build_engine`, one rank, bf16 per the job's "auto" on GPUs) instead of a bare
optimizer. Prints one JSON object.

    python bench/train_step.py [--model deeplabv3_resnet101 --output-stride 16 --batch 8 --crop 768
                                --steps 20 --device cuda --dtype bf16 --channels-last]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/x.py`
from bench.common import step_report  # noqa: E402
from cadist.data.cityscapes import label_lut
from cadist.data.synthetic import render_scene
from cadist.data.transforms import TrainTransform, normalize_batch
from cadist.nets.build import build_model


def make_batch(n, height, width, crop, seed=0):
    lut = label_lut()
    tf = TrainTransform(crop, crop)
    imgs, labs = [], []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        img, lab = render_scene(height, width, rng)
        a, b = tf.augment(img, lut[lab], rng)
        imgs.append(a)
        labs.append(torch.from_numpy(np.ascontiguousarray(b)).long())
    return normalize_batch(imgs), torch.stack(labs)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="deeplabv3_resnet101")
    ap.add_argument("--output-stride", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--height", type=int, default=1024)
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--crop", type=int, default=768)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--engine", default="plain", choices=["plain", "deepspeed"])
    ap.add_argument("--zero-stage", type=int, default=0)
    args = ap.parse_args()
    if args.engine == "deepspeed":
        return deepspeed_steps(args)
    dev = torch.device(args.device)
    torch.manual_seed(0)
    model = build_model(args.model, args.output_stride).to(dev).train()
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    head = [p for n, p in model.named_parameters() if n.startswith("classifier.")]
    body = [p for n, p in model.named_parameters() if n.startswith("backbone.")]
    opt = torch.optim.SGD(
        [{"params": body, "lr": 0.01}, {"params": head, "lr": 0.1}], momentum=0.9, weight_decay=1e-4
    )
    x, y = make_batch(args.batch, args.height, args.width, args.crop)
    x, y = x.to(dev).contiguous(memory_format=fmt), y.to(dev)
    losses, times = [], []
    for _ in range(args.steps):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16"):
            loss = F.cross_entropy(model(x).float(), y, ignore_index=255)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())  # syncs
        times.append(time.perf_counter() - t0)
    out = step_report(args, dev, losses, times, engine="plain", dtype=args.dtype)
    print(json.dumps(out))


def deepspeed_steps(args):
    import os

    import torch.distributed as dist

    from cadist.config.jobfile import load_job
    from cadist.train.engine import build_engine, train_step

    dev = torch.device(args.device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", 0)
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT="29561", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0"
    )
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=0, world_size=1)
    root = Path(__file__).resolve().parents[1]
    job = load_job(
        root / "jobs" / "demo.yaml",
        [
            "name=bench",
            f"model.name={args.model}",
            f"model.output_stride={args.output_stride}",
            f"train.batch_size={args.batch}",
            "cluster.num_workers=1",
            "train.lr_backbone=0.01",
            f"deepspeed.zero_stage={args.zero_stage}",
            f"deepspeed.bf16={'true' if args.dtype == 'bf16' else 'false'}",
        ],
    )
    on_gpu = dev.type == "cuda"
    if on_gpu:
        torch.cuda.set_device(dev)
    engine = build_engine(job, on_gpu, 1, dev)
    if args.channels_last:
        engine.module.to(memory_format=torch.channels_last)
    dtype = next(engine.module.parameters()).dtype
    x, y = make_batch(args.batch, args.height, args.width, args.crop)
    batch = {"image": x.to(dev), "label": y.to(dev)}
    losses, times = [], []
    for _ in range(args.steps):
        if on_gpu:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        losses.append(train_step(engine, batch, dev, dtype).item())
        times.append(time.perf_counter() - t0)
    out = step_report(
        args,
        dev,
        losses,
        times,
        engine="deepspeed",
        zero_stage=args.zero_stage,
        bf16="torch_autocast" if args.dtype == "bf16" else None,
        param_dtype=str(dtype),
    )
    print(json.dumps(out))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
