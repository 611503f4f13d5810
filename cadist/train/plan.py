"""`cadist train --dry-run`: what a job would do, checked the way `cadist train` checks it, with
nothing started and nothing written (no Ray start, no MLflow run, no files)."""

from __future__ import annotations

import os
from pathlib import Path

from cadist.cluster.paths import absolute_paths
from cadist.cluster.ray import check_resources, cluster_nodes, connect_ray, describe_nodes
from cadist.config.schema import JobConfig
from cadist.data.stream import expand_shards
from cadist.errors import ShardError
from cadist.redact import redact
from cadist.storage.store import Storage
from cadist.storage.uri import job_key
from cadist.train.checks import (
    check_data,
    check_eval,
    check_weights,
    input_multiple,
    val_image_size,
)
from cadist.train.driver import _previous_job
from cadist.train.resume import Rerun, check_rerun


def plan_training(
    job: JobConfig, source: str = "<job>", address: str | None = None, restart: bool = False
) -> dict:
    """The checks of `run_training` up to the point where it would start something (shards,
    weights, what a rerun may change, the tracking server, whether the Ray cluster holds the
    workers) and what the job would then run. A check that fails raises the error `cadist train`
    would. `address`: a Ray cluster to check (joined, nothing submitted); none: this machine.
    `restart`: as `cadist train --restart`, which sets an earlier run aside (a first start)."""
    from cadist.tracking.sources import MLFLOW_SCHEMES
    from cadist.train.engine import deepspeed_config

    check_data(job, source)
    check_weights(job, source)
    check_eval(job, source)
    job = absolute_paths(job)
    store = Storage(job.cluster.storage_path)
    store.check()
    if restart:
        rerun = Rerun()
    else:
        before = _previous_job(store, job_key(job.name, "job"))
        rerun = check_rerun(redact(job.model_dump()), before, store.uri(job.name), source)
    # as `run_training`: the marker's run continues unless changed settings start the job anew
    mlflow = _mlflow(job, not restart and not (rerun.changes and rerun.step is None))
    nodes, where = plan_nodes(job, address, source)
    warning = check_resources(job, source, nodes)
    data = {split: plan_shards(getattr(job.data, f"{split}_shards")) for split in ("train", "val")}
    images = data["train"]["samples"]
    weights = job.model.weights
    return {
        "job": job.name,
        "source": source,
        "model": redact(job.model.model_dump()),
        "start": (
            {"fresh": True, "changes": _changes(rerun)}
            if rerun.step is None
            else {"fresh": False, "resume_step": rerun.step, "changes": _changes(rerun)}
        ),
        "weights_fetched_at_start": bool(weights and weights.startswith(MLFLOW_SCHEMES)),
        "data": data,
        "batch": {
            "global": job.train.batch_size,
            "workers": job.cluster.num_workers,
            "min_workers": job.cluster.min_workers,
            "accumulation_steps": job.deepspeed.gradient_accumulation_steps,
            "micro_batch": job.micro_batch,
            "iterations": job.train.iterations,
            "epochs": plan_epochs(job, images),
        },
        "cluster": {
            "where": where,
            "holds": describe_nodes(nodes),
            "warning": warning,
            "worker": {"CPU": job.cluster.cpus_per_worker, "GPU": int(job.cluster.use_gpu)},
        },
        "storage": store.uri(job.name),
        "mlflow": mlflow,
        "macs": plan_macs(job),
        "eval": plan_evaluation(job),
        "deepspeed": deepspeed_config(job, job.cluster.use_gpu),
    }


def _changes(rerun) -> list[dict]:
    return [{"key": k, "before": a, "now": b} for k, a, b in rerun.changes]


def plan_epochs(job: JobConfig, images: int | None) -> float | None:
    """Passes over the training images the job's steps make (None: image count unknown)."""
    return round(job.train.iterations * job.train.batch_size / images, 2) if images else None


def plan_nodes(job: JobConfig, address: str | None, source: str) -> tuple[list[dict], str]:
    """The nodes the job would run on and where they are: the Ray cluster at `address` (else the
    job's `cluster.address`), joined to read its resources; without one, this machine."""
    address = address or job.cluster.address
    if address and address != "local":
        connect_ray(address, job.cluster.use_gpu, source)
        return cluster_nodes(), f"the Ray cluster at {address}"
    return [_this_machine()], "a local Ray on this machine"


def _this_machine() -> dict[str, float]:
    """What `ray.init()` here would hold: the CPUs this process may use and the visible GPUs."""
    import torch

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return {"CPU": float(cpus or 1), "GPU": float(gpus)}


def plan_shards(spec) -> dict:
    """Shard count and, from a manifest, sample count (None when the shards are a pattern)."""
    urls = expand_shards(spec)
    samples = None
    specs = [spec] if isinstance(spec, (str, Path)) else list(spec)
    if all(str(s).endswith("manifest.json") for s in specs):
        from cadist.data.manifest import read_manifest

        try:
            samples = sum(e["samples"] for s in specs for e in read_manifest(s)["shards"])
        except (ShardError, KeyError):
            samples = None
    return {"spec": spec, "shards": len(urls), "samples": samples}


def _mlflow(job: JobConfig, continues: bool) -> dict | None:
    """The tracking store (checked as `cadist train` checks it) and the run a rerun continues."""
    if not job.mlflow.enabled:
        return None
    from cadist.tracking.runs import check_reachable, resolve_uri

    uri = resolve_uri(job.mlflow.tracking_uri)
    check_reachable(uri)
    marker = Storage(job.cluster.storage_path).read_json(job_key(job.name, "mlflow")) or {}
    run_id = marker.get("run_id") if continues else None
    return {"tracking_uri": uri, "experiment": job.mlflow.experiment, "continues_run": run_id}


def plan_macs(job: JobConfig) -> dict | None:
    """GMac per validation image (method §10), at the size of the first validation sample:
    dense models one figure, adaptive ones the line in the high-res fraction p."""
    from cadist.nets.build import is_adaptive
    from cadist.nets.macs import count_dense

    hw = val_image_size(job)
    if hw is None:
        return None
    out = {"input_hw": list(hw)}
    if not is_adaptive(job.model.name):
        m = count_dense(job.model.name, job.model.output_stride, *hw)
        return out | {k: round(m[k], 2) for k in ("backbone_gmac", "head_gmac", "total_gmac")}
    from cadist.nets.stats import mac_line

    line = mac_line(job.model.name, job.model.adaptive_mode, *hw, job.model.head)
    head = {"head_gmac": round(line.head_gmac, 2)}
    if job.model.head == "adaptive":  # (the dense head's count does not depend on p)
        head = {"head_gmac_at_p0": round(line.head(0.0), 2),
                "head_gmac_per_p": round(line.head(1.0) - line.head(0.0), 2)}  # fmt: skip
    return out | {
        "backbone_gmac_at_p0": round(line.backbone(0.0), 2),
        "backbone_gmac_per_p": round(line.backbone(1.0) - line.backbone(0.0), 2),
        **head,
    }


def plan_evaluation(job: JobConfig) -> dict:
    """How the job evaluates (every `eval.interval` steps and at the end): the protocol's label
    ("" for the paper's: whole images, one scale), and with test-time augmentation or a sliding
    window the passes and the forwards (crops) each validation image then costs."""
    out = {"interval": job.eval.interval, "protocol": "", "passes": 1, "forwards_per_image": 1}
    tta = job.eval.augmentation()
    if tta is None:
        return out
    out["protocol"] = tta.label()
    hw = val_image_size(job)
    if hw is not None:
        from cadist.eval.tta import plan_passes

        passes = plan_passes(*hw, tta.scales, tta.flip, input_multiple(job), tta.window)
        out |= {"passes": len(passes), "forwards_per_image": sum(p.tiles for p in passes)}
    return out


def eval_text(ev: dict, hw: list[int] | None) -> str:
    if not ev["protocol"]:
        return f"  evaluates every {ev['interval']} steps and at the end: whole images, one scale"
    size = f" {hw[0]}×{hw[1]}" if hw else ""
    return (
        f"  evaluates every {ev['interval']} steps and at the end: {ev['protocol']} — "
        f"{plural(ev['passes'], 'pass')}, {plural(ev['forwards_per_image'], 'forward')} per{size} "
        f"validation image (the logged GMac is all of them)"
    )


def describe(plan: dict) -> str:
    """The plan as a few lines for the console."""
    b, c, d, m = plan["batch"], plan["cluster"], plan["data"], plan["model"]
    start = plan["start"]
    if start["fresh"]:
        begin = "starts at step 0"
    else:
        begin = f"resumes from its checkpoint at step {start['resume_step']}"
    if start["changes"]:
        begin += " with " + ", ".join(
            f"{x['key']} {x['before']} → {x['now']}" for x in start["changes"]
        )
    lines = [
        f"job {plan['job']} ({plan['source']}): {m['name']}"
        + (f", adaptive {m['adaptive_mode']}" if _adaptive(m) else f", OS {m['output_stride']}"),
        f"  {begin}; checkpoints in {plan['storage']}",
    ]
    for split in ("train", "val"):
        s = d[split]
        n = f"{s['samples']} images in " if s["samples"] is not None else ""
        lines.append(f"  {split}: {n}{plural(s['shards'], 'shard')} ({s['spec']})")
    epochs = f" ≈ {b['epochs']} epochs" if b["epochs"] is not None else ""
    acc = f" × {b['accumulation_steps']} accumulation steps" if b["accumulation_steps"] > 1 else ""
    lines.append(
        f"  {b['iterations']} steps of {b['global']} images = {plural(b['workers'], 'worker')} × "
        f"{b['micro_batch']}{acc}{epochs}"
    )
    per = ", ".join(f"{v:g} {k}" for k, v in c["worker"].items() if v)
    elastic = f" (elastic: down to {b['min_workers']})" if b.get("min_workers") else ""
    lines.append(
        f"  on {c['where']} ({c['holds']}): {plural(b['workers'], 'worker')} of {per}{elastic}"
    )
    if c["warning"]:
        lines.append(f"  {c['warning']}")
    if plan["mlflow"]:
        ml = plan["mlflow"]
        run = f", continues run {ml['continues_run']}" if ml["continues_run"] else ", a new run"
        lines.append(f"  MLflow: {ml['tracking_uri']}, experiment {ml['experiment']}{run}")
    else:
        lines.append("  MLflow: off")
    mac = plan["macs"]
    if mac and "total_gmac" in mac:
        lines.append(
            f"  {mac['total_gmac']:.2f} GMac per {mac['input_hw'][0]}×{mac['input_hw'][1]} "
            f"validation image (backbone {mac['backbone_gmac']:.2f})"
        )
    elif mac:
        head = (
            f"head {mac['head_gmac']:.2f}"
            if "head_gmac" in mac
            else f"adaptive head {mac['head_gmac_at_p0']:.2f} + {mac['head_gmac_per_p']:.2f}·p"
        )
        lines.append(macs_text(mac, head))
    lines.append(eval_text(plan["eval"], mac and mac["input_hw"]))
    ds = plan["deepspeed"]
    lines.append(
        f"  DeepSpeed: ZeRO {ds['zero_optimization']['stage']}, "
        + ("bf16 autocast" if "torch_autocast" in ds else "fp32")
        + f", micro-batch {ds['train_micro_batch_size_per_gpu']} per worker"
    )
    lines.append("nothing was started; `cadist train` with the same arguments runs it")
    return "\n".join(lines)


def macs_text(mac: dict, note: str) -> str:
    """An adaptive model's backbone GMac as its line in the high-res fraction p."""
    h, w = mac["input_hw"]
    return (
        f"  backbone {mac['backbone_gmac_at_p0']:.2f} + {mac['backbone_gmac_per_p']:.2f}·p GMac "
        f"per {h}×{w} validation image at high-res fraction p ({note})"
    )


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "es" if noun.endswith("s") else "s")


def _adaptive(model: dict) -> bool:
    from cadist.nets.build import is_adaptive

    return is_adaptive(model["name"])
