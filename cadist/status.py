"""`cadist status`: the jobs a storage path holds — how far each got, whether it can resume, its
MLflow run, and records still waiting for a tracking server, then the sweeps; `cadist stop`: ask a
running job or sweep to checkpoint and end. Files only (no Ray, no MLflow)."""

from __future__ import annotations

import getpass
import json
import os
import socket
import time
from pathlib import Path

from cadist.config import read_yaml
from cadist.errors import ConfigError
from cadist.train.resume import META, job_file, latest_checkpoint, sweep_file


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


def request_stop(storage: str | Path, name: str, kind: str | None = None) -> dict:
    """Ask job or sweep `name` (run under `storage`, its cluster.storage_path) to stop; `kind`
    "job" or "sweep" where the caller knows (None: whichever has that name).

    A job's workers agree at the next progress report (every train.log_every steps), write a
    checkpoint there and end; the driver marks the MLflow run KILLED and clears the request, and
    rerunning the job resumes from that checkpoint. A sweep's running trials do the same, no
    further trial starts, and once none runs the sweep saves its state, writes its results
    (`"stopped": true`) and clears the request; rerunning `cadist tune` resumes every trial that
    had not finished. A request for a job or sweep that is not running is cleared by its next
    start. The file is written under a temporary name and renamed."""
    storage = Path(storage)
    if not (storage / META).is_dir():
        raise ConfigError(
            f"{storage}: no cadist jobs here (no {META}/ folder); pass the cluster.storage_path "
            f"{name} uses (--storage)"
        )
    is_job = job_file(storage, name, "job").is_file()
    is_sweep = sweep_file(storage, name, "state").is_file()
    if kind is None and is_job and is_sweep:
        raise ConfigError(
            f"{storage}: both a job and a sweep are named {name!r}; pass the job's or the sweep's "
            f"YAML file instead of the name"
        )
    if kind == "sweep" or (kind is None and is_sweep):
        return _request_sweep_stop(storage, name)
    if not is_job:
        raise ConfigError(
            f"{storage}: no job or sweep named {name!r} here (jobs: "
            f"{', '.join(_names(storage, 'jobs')) or 'none'}; sweeps: "
            f"{', '.join(_names(storage, 'sweeps')) or 'none'}); pass a name that `cadist status "
            f"{storage}` lists"
        )
    for sweep in _names(storage, "sweeps"):
        if name.startswith(f"{sweep}-"):
            raise ConfigError(
                f"job {name} is a trial of sweep {sweep}, whose trials stop with their sweep (Tune "
                f"would count one trial stopped alone as finished): `cadist stop {sweep}` "
                f"checkpoints and ends its running trials, and rerunning `cadist tune` resumes them"
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
    path = _write_request(job_file(storage, name, "stop"), request)
    return {
        **request,
        "stop_file": str(path.resolve()),
        "last_checkpoint_step": latest[0] if latest else None,
    }


def _request_sweep_stop(storage: Path, name: str) -> dict:
    results = sweep_file(storage, name, "results")
    if not sweep_file(storage, name, "state").is_file():
        raise ConfigError(
            f"{storage}: no sweep named {name!r} here (sweeps: "
            f"{', '.join(_names(storage, 'sweeps')) or 'none'}); pass a sweep name that "
            f"`cadist status {storage}` lists"
        )
    if results.is_file() and not json.loads(results.read_text()).get("stopped"):
        raise ConfigError(f"sweep {name} already ended (results: {results}); nothing to stop")
    request = {"sweep": name, "requested_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "by": _who()}
    path = _write_request(sweep_file(storage, name, "stop"), request)
    return {**request, "stop_file": str(path.resolve())}


def _write_request(path: Path, request: dict) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(request))
    os.replace(tmp, path)
    return path


def _names(storage: Path, what: str) -> list[str]:
    """The jobs (resolved job files) or sweeps (state files) under `storage`, by name."""
    if what == "jobs":
        return sorted(p.stem for p in (storage / META).glob("*.yaml"))
    return sorted(
        p.name[len("sweep-") : -len(".state.json")]
        for p in (storage / META).glob("sweep-*.state.json")
    )


def wait_for_stop(storage: str | Path, name: str, timeout_s: float, poll_s: float = 0.5) -> int:
    """Wait until job `name` has ended after `request_stop` (its driver clears the request once the
    run's last checkpoint is registered); returns that checkpoint's step. A job that is not
    running never clears it: a ConfigError after `timeout_s`."""
    _wait_until_cleared(
        job_file(storage, name, "stop"),
        f"job {name}",
        f"`cadist status {storage}` shows how far it got",
        timeout_s,
        poll_s,
    )
    latest = latest_checkpoint(Path(storage) / name)
    return latest[0] if latest else 0


def wait_for_sweep_stop(storage: str | Path, name: str, timeout_s: float, poll_s: float = 0.5):
    """Wait until sweep `name` has ended after `request_stop` (its driver clears the request once
    no trial runs and its results are written); returns {"stopped": whether it stopped before its
    trials ended (else they all ended before the request was read), "trials": how many trials are
    in each state}."""
    _wait_until_cleared(
        sweep_file(storage, name, "stop"),
        f"sweep {name}",
        "its running trials end at their next progress report",
        timeout_s,
        poll_s,
    )
    results = sweep_file(storage, name, "results")
    stopped = results.is_file() and json.loads(results.read_text()).get("stopped", False)
    return {"stopped": stopped, "trials": _trial_states(results)}


def _wait_until_cleared(path: Path, what: str, hint: str, timeout_s: float, poll_s: float) -> None:
    """Wait until the stop request `path` is gone (its driver clears it once `what` has ended); a
    ConfigError after `timeout_s` (one that is not running never clears it)."""
    deadline = time.monotonic() + timeout_s
    while path.exists():
        if time.monotonic() > deadline:
            raise ConfigError(
                f"{what} did not stop within {timeout_s:g} s (the request {path} is still there): "
                f"is it running? {hint}; a request for a {what.split()[0]} that is not running is "
                f"cleared by its next start"
            )
        time.sleep(poll_s)


def _trial_states(results: Path) -> dict[str, int]:
    """How many of a sweep's trials ended in each state (finished, stopped early, stopped,
    interrupted, not started, failed), from its results file (older files carry no state: it is derived)."""
    counts: dict[str, int] = {}
    for t in json.loads(results.read_text())["trials"] if results.is_file() else []:
        state = t.get("state") or (
            "failed"
            if t.get("error")
            else "stopped early"
            if t.get("stopped_early")
            else "finished"
        )
        counts[state] = counts.get(state, 0) + 1
    return counts


def _who() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # a container user without a passwd entry
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}"


def sweeps_in(storage: str | Path) -> list[dict]:
    """One row per sweep started under `storage` (`.cadist/sweep-<name>.state.json`): trials asked
    for, its state (running or interrupted, stop requested, stopped, interrupted, ended) and —
    once it ended or stopped — how many trials are in each state, and its Pareto front."""
    storage = Path(storage)
    rows = []
    for name in _names(storage, "sweeps"):
        sweep = json.loads(sweep_file(storage, name, "state").read_text()).get("sweep") or {}
        results = sweep_file(storage, name, "results")
        blob = json.loads(results.read_text()) if results.is_file() else None
        if sweep_file(storage, name, "stop").is_file():
            state = "stop requested"
        elif blob is None:
            state = "running or interrupted"
        else:
            state = "ended"
            if blob.get("stopped"):  # (older files, from before stop requests: interrupted)
                state = "stopped" if blob.get("stop_requested", False) else "interrupted"
        counts = _trial_states(results)
        rows.append(
            {
                "sweep": name,
                "num_samples": sweep.get("num_samples"),
                "objectives": sweep.get("objectives"),
                "state": state,
                "ended": state == "ended",
                "finished": counts.get("finished", 0),
                "stopped_early": counts.get("stopped early", 0),
                "stopped": counts.get("stopped", 0),
                "not_started": counts.get("not started", 0),
                "interrupted": counts.get("interrupted", 0),
                "failed": counts.get("failed", 0),
                "pareto": [t["job"] for t in (blob or {}).get("trials", []) if t.get("pareto")],
                "results": str(results) if blob is not None else None,
            }
        )
    return rows


def sweep_table(rows: list[dict]) -> str:
    head = (
        "| sweep | trials | state | finished | stopped early | unfinished | failed "
        "| Pareto front |\n|---|---|---|---|---|---|---|---|"
    )
    resume = {
        "running or interrupted": "running or interrupted (rerun `cadist tune` to resume)",
        "stopped": "stopped on request (rerun `cadist tune` to resume)",
        "interrupted": "interrupted (rerun `cadist tune` to resume)",
    }
    lines = [
        f"| {r['sweep']} | {r['num_samples']} | {resume.get(r['state'], r['state'])} | "
        + (
            f"{r['finished']} | {r['stopped_early']} | "
            f"{r['stopped'] + r['not_started'] + r['interrupted']} | "
            f"{r['failed']} | {', '.join(r['pareto']) or '–'} |"
            if r["results"]
            else "| | | | |"
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
