"""`cadist status`: the jobs a storage path holds — how far each got, whether it can resume, its
MLflow run, and records still waiting for a tracking server, then the sweeps; `cadist stop`: ask a
running job or sweep to checkpoint and end. Files on the storage path only (a folder or s3://… /
gs://…, through `cadist.storage.store`; no Ray, no MLflow)."""

from __future__ import annotations

import getpass
import os
import socket
import time
from pathlib import Path

from cadist.config.jobfile import read_yaml
from cadist.errors import ConfigError
from cadist.progress import ALIVE_S
from cadist.storage.store import Storage
from cadist.storage.uri import META, job_key, sweep_key


def _store(storage: str | Path | Storage) -> Storage:
    return storage if isinstance(storage, Storage) else Storage(storage)


def jobs_in(storage: str | Path | Storage) -> list[dict]:
    """One row per job whose driver resolved it into `<storage>/.cadist/<name>.yaml`, by name."""
    store = _store(storage)
    return [_job_row(store, name) for name in store.jobs()]


def _job_row(store: Storage, name: str) -> dict:
    """`jobs_in`'s row of job `name`."""
    job, iterations, latest = _progress(store, name)
    step = latest[0] if latest else 0
    mlflow = store.read_json(job_key(name, "mlflow")) or {}
    spool = job_key(name, "spool")
    pending = sum(len(store.list(f"{spool}/{run}/q", "*.json")) for run in store.list(spool))
    beat = store.read_json(job_key(name, "progress")) or {}
    age = time.time() - beat["time"] if isinstance(beat.get("time"), (int, float)) else None
    running = (
        beat.get("phase") in ("train", "eval", "export") and age is not None and (age < ALIVE_S)
    )
    if latest is None:
        state = "not started" if not store.is_dir(name) else "no checkpoint yet"
    else:
        state = "finished" if iterations and step >= iterations else "resumable"
    if running and state != "finished":
        state = "running"
        step = max(step, int(beat.get("step") or 0))
    elif state == "no checkpoint yet" and beat.get("phase") == "failed":
        state = "failed"
    if state != "finished" and store.is_file(job_key(name, "stop")):
        state = "stop requested"
    return {
        "job": name,
        "model": (job.get("model") or {}).get("name"),
        "step": step,
        "iterations": iterations,
        "state": state,
        "checkpoint": latest[1] if latest else None,
        "mlflow_run_id": mlflow.get("run_id"),
        "tracking_uri": mlflow.get("tracking_uri"),
        "pending_mlflow_records": pending,
        "set_aside": store.list("", f"{name}.before-*"),
        # rank 0's last progress record: where it runs and how long ago it wrote
        "heartbeat": {
            "host": beat.get("host"),
            "pid": beat.get("pid"),
            "phase": beat.get("phase"),
            "age_s": None if age is None else round(age, 1),
        }
        if beat
        else None,
    }


def job_log(store: Storage, name: str, follow: bool, echo, poll_s: float = 1.0) -> str:
    """Echo the log the driver of job `name` keeps on the storage path; with `follow`, new lines
    as they come until the job is no longer running. Returns its state (as `cadist status`)."""
    key = job_key(name, "log")
    if not store.is_file(key) and not follow:
        raise ConfigError(
            f"{store.uri()}: no log of a job named {name!r} (jobs: "
            f"{', '.join(store.jobs()) or 'none'}); pass the job's cluster.storage_path (--storage)"
        )
    shown = 0
    while True:
        text = store.read_text(key) if store.is_file(key) else ""
        if len(text) > shown:
            echo(text[shown:].rstrip("\n"))
            shown = len(text)
        state = _state_of(store, name)
        if not follow or state != "running":
            # (the driver writes its last lines once the workers are done: one more read)
            if follow and shown < len(store.read_text(key) if store.is_file(key) else ""):
                continue
            return state
        time.sleep(poll_s)


def _state_of(store: Storage, name: str) -> str:
    return _job_row(store, name)["state"] if store.is_file(job_key(name, "job")) else "not started"


def _progress(store: Storage, name: str) -> tuple[dict, int | None, tuple[int, str] | None]:
    """Job `name`'s resolved job tree, its train.iterations and its latest checkpoint (or None)."""
    job = read_yaml(job_key(name, "job"), "resolved job", "a job mapping", store)
    return job, (job.get("train") or {}).get("iterations"), store.latest_checkpoint(name)


def request_stop(storage: str | Path | Storage, name: str, kind: str | None = None) -> dict:
    """Ask job or sweep `name` (run under `storage`, its cluster.storage_path) to stop; `kind`
    "job" or "sweep" where the caller knows (None: whichever has that name).

    A job's workers agree at the next progress report (every train.log_every steps), write a
    checkpoint there and end; the driver marks the MLflow run KILLED and clears the request, and
    rerunning the job resumes from that checkpoint. A sweep's running trials do the same, no
    further trial starts, and once none runs the sweep saves its state, writes its results
    (`"stopped": true`) and clears the request; rerunning `cadist tune` resumes every trial that
    had not finished. A request for a job or sweep that is not running is cleared by its next
    start. The file is written whole (a temporary name and a rename; one PUT on object storage)."""
    store = _store(storage)
    storage = store.uri()
    if not store.is_dir(META):
        raise ConfigError(
            f"{storage}: no cadist jobs here (no {META}/ folder); pass the cluster.storage_path "
            f"{name} uses (--storage)"
        )
    is_job = store.is_file(job_key(name, "job"))
    is_sweep = store.is_file(sweep_key(name, "state"))
    if kind is None and is_job and is_sweep:
        raise ConfigError(
            f"{storage}: both a job and a sweep are named {name!r}; pass the job's or the sweep's "
            f"YAML file instead of the name"
        )
    if kind == "sweep" or (kind is None and is_sweep):
        return _request_sweep_stop(store, name)
    if not is_job:
        raise ConfigError(
            f"{storage}: no job or sweep named {name!r} here (jobs: "
            f"{', '.join(store.jobs()) or 'none'}; sweeps: "
            f"{', '.join(store.sweeps()) or 'none'}); pass a name that `cadist status "
            f"{storage}` lists"
        )
    for sweep in store.sweeps():
        if name.startswith(f"{sweep}-"):
            raise ConfigError(
                f"job {name} is a trial of sweep {sweep}, whose trials stop with their sweep (Tune "
                f"would count one trial stopped alone as finished): `cadist stop {sweep}` "
                f"checkpoints and ends its running trials, and rerunning `cadist tune` resumes them"
            )
    _, iterations, latest = _progress(store, name)
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
    path = store.write_json(job_key(name, "stop"), request, indent=None)
    return {
        **request,
        "stop_file": path,
        "last_checkpoint_step": latest[0] if latest else None,
    }


def _request_sweep_stop(store: Storage, name: str) -> dict:
    storage, results = store.uri(), store.read_json(sweep_key(name, "results"))
    if not store.is_file(sweep_key(name, "state")):
        raise ConfigError(
            f"{storage}: no sweep named {name!r} here (sweeps: "
            f"{', '.join(store.sweeps()) or 'none'}); pass a sweep name that "
            f"`cadist status {storage}` lists"
        )
    if results is not None and not results.get("stopped"):
        where = store.uri(sweep_key(name, "results"))
        raise ConfigError(f"sweep {name} already ended (results: {where}); nothing to stop")
    request = {"sweep": name, "requested_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "by": _who()}
    path = store.write_json(sweep_key(name, "stop"), request, indent=None)
    return {**request, "stop_file": path}


def wait_for_stop(
    storage: str | Path | Storage, name: str, timeout_s: float, poll_s: float = 0.5
) -> int:
    """Wait until job `name` has ended after `request_stop` (its driver clears the request once the
    run's last checkpoint is registered); returns that checkpoint's step. A job that is not
    running never clears it: a ConfigError after `timeout_s`."""
    store = _store(storage)
    _wait_until_cleared(
        store,
        job_key(name, "stop"),
        f"job {name}",
        f"`cadist status {store.uri()}` shows how far it got",
        timeout_s,
        poll_s,
    )
    latest = store.latest_checkpoint(name)
    return latest[0] if latest else 0


def wait_for_sweep_stop(
    storage: str | Path | Storage, name: str, timeout_s: float, poll_s: float = 0.5
):
    """Wait until sweep `name` has ended after `request_stop` (its driver clears the request once
    no trial runs and its results are written); returns {"stopped": whether it stopped before its
    trials ended (else they all ended before the request was read), "trials": how many trials are
    in each state}."""
    store = _store(storage)
    _wait_until_cleared(
        store,
        sweep_key(name, "stop"),
        f"sweep {name}",
        "its running trials end at their next progress report",
        timeout_s,
        poll_s,
    )
    results = store.read_json(sweep_key(name, "results"))
    stopped = bool(results and results.get("stopped", False))
    return {"stopped": stopped, "trials": _trial_states(results)}


def _wait_until_cleared(
    store: Storage, key: str, what: str, hint: str, timeout_s: float, poll_s: float
) -> None:
    """Wait until the stop request `key` is gone (its driver clears it once `what` has ended); a
    ConfigError after `timeout_s` (one that is not running never clears it)."""
    deadline = time.monotonic() + timeout_s
    while store.exists(key):
        if time.monotonic() > deadline:
            raise ConfigError(
                f"{what} did not stop within {timeout_s:g} s (the request {store.uri(key)} is "
                f"still there): "
                f"is it running? {hint}; a request for a {what.split()[0]} that is not running is "
                f"cleared by its next start"
            )
        time.sleep(poll_s)


def _trial_states(results: dict | None) -> dict[str, int]:
    """How many of a sweep's trials ended in each state (finished, stopped early, stopped,
    interrupted, not started, failed), from its results (older files carry no state: it is
    derived)."""
    counts: dict[str, int] = {}
    for t in (results or {}).get("trials", []):
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
    store = _store(storage)
    rows = []
    for name in store.sweeps():
        sweep = (store.read_json(sweep_key(name, "state")) or {}).get("sweep") or {}
        blob = store.read_json(sweep_key(name, "results"))
        if store.is_file(sweep_key(name, "stop")):
            state = "stop requested"
        elif blob is None:
            state = "running or interrupted"
        else:
            state = "ended"
            if blob.get("stopped"):  # (older files, from before stop requests: interrupted)
                state = "stopped" if blob.get("stop_requested", False) else "interrupted"
        counts = _trial_states(blob)
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
                "results": store.uri(sweep_key(name, "results")) if blob is not None else None,
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


def table(rows: list[dict]) -> str:
    head = (
        "| job | model | step | state | MLflow run | waiting for MLflow |\n"
        "|---|---|---|---|---|---|"
    )
    lines = [
        f"| {r['job']} | {r['model']} | {r['step']}/{r['iterations']} | {_state(r)} | "
        f"{r['mlflow_run_id'] or '–'} | {r['pending_mlflow_records'] or '–'} |"
        for r in rows
    ]
    return "\n".join([head, *lines])


def _state(row: dict) -> str:
    beat = row.get("heartbeat") or {}
    if row["state"] == "running" and beat.get("host"):
        return f"running on {beat['host']} ({beat['age_s']:.0f} s ago)"
    return row["state"]
