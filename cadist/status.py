"""`cadist status`: the jobs a storage path holds — how far each got, whether it can resume, its
MLflow run, and records still waiting for a tracking server; `cadist stop`: ask a running job to
checkpoint and end. Files only (no Ray, no MLflow)."""

from __future__ import annotations

import getpass
import json
import os
import socket
import time
from pathlib import Path

from cadist.config import read_yaml
from cadist.errors import ConfigError
from cadist.train.resume import META, job_file, latest_checkpoint


def jobs_in(storage: str | Path) -> list[dict]:
    """One row per job whose driver resolved it into `<storage>/.cadist/<name>.yaml`, by name."""
    storage = Path(storage)
    meta = storage / META
    rows = []
    for resolved in sorted(meta.glob("*.yaml")):
        name = resolved.stem
        job, iterations, latest = _progress(storage, name)
        step = latest[0] if latest else 0
        marker = job_file(storage, name, "mlflow")
        mlflow = json.loads(marker.read_text()) if marker.is_file() else {}
        spool = job_file(storage, name, "spool")
        pending = sum(_lines(q) for q in spool.glob("*/pending.jsonl"))
        if latest is None:
            state = "not started" if not (storage / name).is_dir() else "no checkpoint yet"
        else:
            state = "finished" if iterations and step >= iterations else "resumable"
        if state != "finished" and job_file(storage, name, "stop").is_file():
            state = "stop requested"
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


def _progress(storage: Path, name: str) -> tuple[dict, int | None, tuple[int, Path] | None]:
    """Job `name`'s resolved job tree, its train.iterations and its latest checkpoint (or None)."""
    job = read_yaml(job_file(storage, name, "job"), "resolved job", "a job mapping")
    return job, (job.get("train") or {}).get("iterations"), latest_checkpoint(storage / name)


def request_stop(storage: str | Path, name: str) -> dict:
    """Ask job `name` (trained under `storage`, its cluster.storage_path) to stop: its workers
    agree at the next progress report (every train.log_every steps), write a checkpoint there and
    end; the driver marks the MLflow run KILLED and clears the request, and rerunning the job
    resumes from that checkpoint. A request for a job that is not running is cleared by its next
    start. The file is written under a temporary name and renamed."""
    storage = Path(storage)
    if not (storage / META).is_dir():
        raise ConfigError(
            f"{storage}: no cadist jobs here (no {META}/ folder); pass the cluster.storage_path "
            f"job {name} uses (--storage)"
        )
    resolved = job_file(storage, name, "job")
    if not resolved.is_file():
        known = sorted(p.stem for p in (storage / META).glob("*.yaml"))
        raise ConfigError(
            f"{storage}: no job named {name!r} here (jobs: {', '.join(known) or 'none'}); pass a "
            f"job name that `cadist status {storage}` lists"
        )
    for state in (storage / META).glob("sweep-*.state.json"):
        sweep = state.name[len("sweep-") : -len(".state.json")]
        if name.startswith(f"{sweep}-"):
            raise ConfigError(
                f"job {name} is a trial of sweep {sweep}, whose trials do not take stop requests "
                f"(Tune would count a stopped trial as finished); stop the sweep instead (Ctrl-C, "
                f"or `ray job stop` for a submitted one): rerunning `cadist tune` resumes it, "
                f"each unfinished trial from its last checkpoint"
            )
    _, iterations, latest = _progress(storage, name)
    if latest and iterations and latest[0] >= iterations:
        raise ConfigError(
            f"job {name} already finished (step {latest[0]}/{iterations}, {latest[1]}); nothing "
            f"to stop"
        )
    request = {
        "job": name,
        "requested_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "by": _who(),
    }
    path = job_file(storage, name, "stop")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(request))
    os.replace(tmp, path)
    return {
        **request,
        "stop_file": str(path.resolve()),
        "last_checkpoint_step": latest[0] if latest else None,
    }


def wait_for_stop(storage: str | Path, name: str, timeout_s: float, poll_s: float = 0.5) -> int:
    """Wait until job `name` has ended after `request_stop` (its driver clears the request once the
    run's last checkpoint is registered); returns that checkpoint's step. A job that is not
    running never clears it: a ConfigError after `timeout_s`."""
    path = job_file(storage, name, "stop")
    deadline = time.monotonic() + timeout_s
    while path.exists():
        if time.monotonic() > deadline:
            raise ConfigError(
                f"job {name} did not stop within {timeout_s:g} s (the request {path} is still "
                f"there): is it running? `cadist status {storage}` shows how far it got; a "
                f"request for a job that is not running is cleared by its next start"
            )
        time.sleep(poll_s)
    latest = latest_checkpoint(Path(storage) / name)
    return latest[0] if latest else 0


def _who() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # a container user without a passwd entry
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}"


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
