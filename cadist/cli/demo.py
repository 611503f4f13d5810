"""`cadist demo`: the whole pipeline on generated data, on this machine."""

from __future__ import annotations

from pathlib import Path

import click

from cadist.config.jobfile import load_job
from cadist.data.shards import build_shards, manifest_path
from cadist.data.synthetic import write_tree
from cadist.errors import ConfigError
from cadist.storage.store import Storage
from cadist.storage.uri import job_key

DEMO_JOB = Path(__file__).resolve().parents[2] / "jobs" / "demo.yaml"


def run_demo(workdir: str | Path, overrides: tuple[str, ...] = (), restart: bool = False) -> dict:
    from cadist.tracking.runs import metric_history, run_metrics
    from cadist.train.driver import run_training

    if not DEMO_JOB.is_file():
        raise ConfigError(
            f"{DEMO_JOB}: the demo job is missing; run from a cadist checkout "
            f"installed with `pip install -e .`"
        )
    work = Path(workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    data, shards = work / "data" / "synth", work / "shards" / "demo"
    if not (data / "gtFine").is_dir():
        click.echo(f"[1/4] generating street scenes in {data}")
        write_tree(
            data, num_train=64, num_val=16, height=256, width=512, seed=0, workers=2, progress=True
        )
    else:
        click.echo(f"[1/4] using the scenes in {data}")
    for split, per_shard in (("train", 8), ("val", 4)):
        if not manifest_path(shards, split).exists():
            click.echo(f"[2/4] building {split} shards in {shards}")
            build_shards(data, split, shards, samples_per_shard=per_shard, workers=2)
    uri = f"sqlite:///{work / 'mlflow.db'}"
    base = [
        f"data.train_shards={manifest_path(shards, 'train')}",
        f"data.val_shards={manifest_path(shards, 'val')}",
        f"cluster.storage_path={work / 'cadist_runs'}",
        f"mlflow.tracking_uri={uri}",
    ]
    job = load_job(DEMO_JOB, base + list(overrides))
    click.echo(
        f"[3/4] training {job.model.name} for {job.train.iterations} steps on "
        f"{job.cluster.num_workers} Ray workers with DeepSpeed (ZeRO-{job.deepspeed.zero_stage})"
    )
    result = run_training(job, str(DEMO_JOB), restart=restart)
    click.echo("[4/4] evaluated on the validation shards; logged to MLflow")
    hist = metric_history(uri, result.run_id, "val/miou")  # [(step, value)]
    step, value = max(hist)
    return {
        "miou": value,
        "best_miou": max(v for _, v in hist),
        "step": step,
        "run_id": result.run_id,
        "tracking_uri": uri,
        "chance_miou": chance_miou(run_metrics(uri, result.run_id)),
        "checkpoint": str(result.checkpoint) if result.checkpoint else None,
        "job": Storage(job.cluster.storage_path).uri(job_key(job.name, "job")),
        "val_image": str(next(iter(sorted((data / "leftImg8bit" / "val").glob("*/*.png"))), "")),
    }


def chance_miou(metrics: dict) -> float:
    """mIoU of predicting every pixel as one class: the 1/C level a trained model must beat."""
    # With 19 classes and several present, a constant prediction scores ≤ 1/#present classes.
    iou = [m for m in metrics if m.startswith("val/iou/")]
    return 1.0 / max(1, len(iou))
