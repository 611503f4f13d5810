"""Step time of the Ray Train + DeepSpeed path vs a plain PyTorch loop: same model, same batch,
one CPU worker. Prints one JSON object; the overhead is median(ray+deepspeed) / median(plain) − 1.

Both loops run the same `train_step`-equivalent work (forward, cross-entropy, backward, SGD with
the §8 parameter groups and poly schedule) on one fixed batch, so the difference is the framework:
DeepSpeed's engine (ZeRO stage as given) inside a Ray Train worker vs a bare optimizer.

    python bench/train_overhead.py [--model deeplabv3_resnet_tiny --crop 256 --batch 8 --steps 30]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def job_for(args):
    from cadist.config.jobfile import load_job

    return load_job(
        ROOT / "jobs" / "demo.yaml",
        [
            f"name=overhead-{os.getpid()}",
            f"model.name={args.model}",
            "model.output_stride=16",
            f"train.batch_size={args.batch}",
            "cluster.num_workers=1",
            f"deepspeed.zero_stage={args.zero_stage}",
            f"train.iterations={args.steps + 10}",
        ],
    )


def make_batch(args):
    g = torch.Generator().manual_seed(0)
    return {
        "image": torch.randint(
            0, 256, (args.batch, 3, args.crop, args.crop), generator=g, dtype=torch.uint8
        ),
        "label": torch.randint(0, 19, (args.batch, args.crop, args.crop), generator=g),
    }


def plain_loop(job, batch, steps, warmup):
    from cadist.data.transforms import normalize_uint8
    from cadist.nets.build import build_model
    from cadist.train.loop import make_optimizer, seed_everything, segmentation_loss

    seed_everything(job.train.seed)
    model = build_model(job.model.name, job.model.output_stride).train()
    opt, sched = make_optimizer(model, job.train)
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        loss = segmentation_loss(model(normalize_uint8(batch["image"])), batch["label"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def _ray_worker(cfg):
    import ray.train

    from cadist.config.schema import JobConfig
    from cadist.train.engine import build_engine, train_step

    job = JobConfig.model_validate(cfg["job"])
    torch.set_num_threads(cfg["threads"])
    engine = build_engine(job, False, 1, torch.device("cpu"))
    batch = cfg["batch"]
    times = []
    for i in range(cfg["warmup"] + cfg["steps"]):
        t0 = time.perf_counter()
        train_step(engine, batch, torch.device("cpu"), torch.float32)
        if i >= cfg["warmup"]:
            times.append(time.perf_counter() - t0)
    Path(cfg["out"]).write_text(json.dumps(times))
    ray.train.report({"done": 1})


def ray_deepspeed_loop(job, batch, steps, warmup, threads):
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "times.json"
        t0 = time.perf_counter()
        TorchTrainer(
            _ray_worker,
            train_loop_config={
                "job": job.model_dump(),
                "batch": batch,
                "steps": steps,
                "warmup": warmup,
                "out": str(out),
                "threads": threads,
            },
            scaling_config=ScalingConfig(
                num_workers=1, use_gpu=False, resources_per_worker={"CPU": 1}
            ),
            run_config=RunConfig(name=job.name, storage_path=tmp),
        ).fit()
        wall = time.perf_counter() - t0
        return json.loads(out.read_text()), wall


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="deeplabv3_resnet_tiny")
    ap.add_argument("--crop", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--zero-stage", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads in both loops")
    args = ap.parse_args()
    import ray

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    torch.set_num_threads(args.threads)
    job, batch = job_for(args), make_batch(args)
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu"}},
    )
    # interleave: plain, ray, plain — the machine is shared and noisy
    plain_a = plain_loop(job, batch, args.steps // 2, args.warmup)
    ds, wall = ray_deepspeed_loop(job, batch, args.steps, args.warmup, args.threads)
    plain_b = plain_loop(job, batch, args.steps - args.steps // 2, args.warmup)
    ray.shutdown()
    plain = plain_a + plain_b
    p, d = statistics.median(plain), statistics.median(ds)
    print(
        json.dumps(
            {
                "bench": "train_overhead",
                "model": args.model,
                "crop": args.crop,
                "batch": args.batch,
                "steps": args.steps,
                "zero_stage": args.zero_stage,
                "threads": args.threads,
                "plain_ms_per_step": round(p * 1000, 2),
                "ray_deepspeed_ms_per_step": round(d * 1000, 2),
                "overhead": round(d / p - 1, 4),
                "ray_fit_wall_s_incl_startup": round(wall, 1),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
