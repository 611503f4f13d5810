"""`cadist status`: the jobs a storage path holds — how far each got, whether it can resume, its
MLflow run, and records still waiting for a tracking server. Reads files only (no Ray, no MLflow)."""

from __future__ import annotations

import json
from pathlib import Path

from cadist.config import read_yaml
from cadist.train.resume import META, job_file, latest_checkpoint


def jobs_in(storage: str | Path) -> list[dict]:
    """One row per job whose driver resolved it into `<storage>/.cadist/<name>.yaml`, by name."""
    storage = Path(storage)
    meta = storage / META
    rows = []
    for resolved in sorted(meta.glob("*.yaml")):
        name = resolved.stem
        job = read_yaml(resolved, "resolved job", "a job mapping")
        iterations = (job.get("train") or {}).get("iterations")
        latest = latest_checkpoint(storage / name)
        step = latest[0] if latest else 0
        marker = job_file(storage, name, "mlflow")
        mlflow = json.loads(marker.read_text()) if marker.is_file() else {}
        spool = job_file(storage, name, "spool")
        pending = sum(_lines(q) for q in spool.glob("*/pending.jsonl"))
        if latest is None:
            state = "not started" if not (storage / name).is_dir() else "no checkpoint yet"
        else:
            state = "finished" if iterations and step >= iterations else "resumable"
        rows.append(
            {
                "job": name,
                "model": (job.get("model") or {}).get("name"),
                "step": step,
                "iterations": iterations,
                "state": state,
                "checkpoint": str(latest[1]) if latest else None,
                "mlflow_run_id": mlflow.get("run_id"),
                "tracking_uri": mlflow.get("tracking_uri"),
                "pending_mlflow_records": pending,
                "set_aside": sorted(p.name for p in storage.glob(f"{name}.before-*")),
            }
        )
    return rows


def sweeps_in(storage: str | Path) -> list[dict]:
    """One row per sweep started under `storage` (`.cadist/sweep-<name>.state.json`): trials asked
    for, and — once it ended — how many finished, failed or stopped early, and its Pareto front."""
    meta = Path(storage) / META
    rows = []
    for state in sorted(meta.glob("sweep-*.state.json")):
        name = state.name[len("sweep-") : -len(".state.json")]
        sweep = json.loads(state.read_text()).get("sweep") or {}
        results = meta / f"sweep-{name}.results.json"
        trials = json.loads(results.read_text())["trials"] if results.is_file() else None
        rows.append(
            {
                "sweep": name,
                "num_samples": sweep.get("num_samples"),
                "objectives": sweep.get("objectives"),
                "ended": trials is not None,
                "finished": sum(
                    1 for t in trials or [] if not t["error"] and not t["stopped_early"]
                ),
                "stopped_early": sum(1 for t in trials or [] if t["stopped_early"]),
                "failed": sum(1 for t in trials or [] if t["error"]),
                "pareto": [t["job"] for t in trials or [] if t.get("pareto")],
                "results": str(results) if trials is not None else None,
            }
        )
    return rows


def sweep_table(rows: list[dict]) -> str:
    head = "| sweep | trials | finished | stopped early | failed | Pareto front |\n|---|---|---|---|---|---|"
    lines = [
        f"| {r['sweep']} | {r['num_samples']} | "
        + (
            f"{r['finished']} | {r['stopped_early']} | {r['failed']} | "
            f"{', '.join(r['pareto']) or '–'} |"
            if r["ended"]
            else "running or interrupted (rerun `cadist tune` to resume) | | | |"
        )
        for r in rows
    ]
    return "\n".join([head, *lines])


def _lines(path: Path) -> int:
    return sum(1 for line in path.read_text().splitlines() if line.strip())


def table(rows: list[dict]) -> str:
    head = (
        "| job | model | step | state | MLflow run | waiting for MLflow |\n"
        "|---|---|---|---|---|---|"
    )
    lines = [
        f"| {r['job']} | {r['model']} | {r['step']}/{r['iterations']} | {r['state']} | "
        f"{r['mlflow_run_id'] or '–'} | {r['pending_mlflow_records'] or '–'} |"
        for r in rows
    ]
    return "\n".join([head, *lines])
