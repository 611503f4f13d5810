"""What a finished (or stopped) sweep leaves: one row per trial from Tune's results, the results file
and Pareto figure on the storage path, the sweep's parent MLflow run closed with them, and the table
printed."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from cadist.redact import redact
from cadist.results.pareto import pareto
from cadist.storage.store import Storage
from cadist.storage.uri import job_key, sweep_key
from cadist.sweep.files import ENDED, SweepStopped, _ended, _sweep_files
from cadist.sweep.spec import METRICS, SweepConfig


def _finish_parent(tracker, parent: str, rows, tmp: Path, out: str, plot, stopped: bool) -> None:
    """The sweep's parent run: its results and figure (local copies in `tmp`), the best mIoU, and
    its end state."""
    from cadist.tracking.runs import set_status

    tracker.log_artifact(tmp / Path(out).name, "sweep")
    if plot:
        tracker.log_artifact(tmp / Path(plot).name, "sweep")
    best = [r["metrics"].get("val/miou") for r in rows if r["metrics"].get("val/miou")]
    if best:
        tracker.log_metrics({"sweep/best_miou": max(best), "sweep/trials": len(rows)}, 0)
    set_status(tracker.uri, parent, "KILLED" if stopped else "FINISHED")


def _open_parent(sweep: SweepConfig, base, store: Storage):
    """The sweep's parent MLflow run (new, or the one its marker names): the searched space and
    the sweep file. Returns (run_id, tracker)."""
    from cadist.tracking.runs import Tracker, check_reachable, resolve_uri, start_or_resume_run

    uri = resolve_uri(base.mlflow.tracking_uri)
    check_reachable(uri)
    marker = _sweep_files(sweep)[2]
    parent = start_or_resume_run(
        uri, base.mlflow.experiment, sweep.name, store, marker, {"cadist.sweep": sweep.name}
    )
    tracker = Tracker(uri, parent)
    tracker.log_params({f"search.{k}": json.dumps(v) for k, v in sweep.search.items()})
    tracker.log_text(
        yaml.safe_dump(redact(sweep.model_dump()), sort_keys=False), "sweep/sweep.yaml"
    )
    return parent, tracker


def _trial_dirname(trial) -> str:
    """A trial's folder in the Tune experiment: its id (so a trial that never reported is still
    found: its job is `<sweep>-<trial id>`)."""
    return trial.trial_id


def _rows(grid, sweep: SweepConfig, base, store: Storage) -> list[dict]:
    """One row per trial (params, metrics, job, MLflow run, state, error, Pareto flag). States:
    finished, stopped early (by ASHA; its MLflow run is marked KILLED here), stopped (on request,
    at a checkpoint; the driver marked its run KILLED), interrupted (the sweep was, e.g. Ctrl-C; its
    run is marked KILLED here, a rerun resumes it), not started (the sweep was stopped or
    interrupted first), failed (its run is marked FAILED here)."""
    from cadist.tracking.runs import resolve_uri, set_status

    ended = _ended(store.uri(f"sweep-{sweep.name}/{ENDED}"))
    rows = []
    for res in grid:
        last = res.metrics or {}
        # (a trial that never reported has no trial_id there; its folder is named by it)
        trial_id = last.get("trial_id") or (Path(res.path).name if res.path else "?")
        job_name = last.get("job") or f"{sweep.name}-{trial_id}"
        ran = store.is_dir(job_name)
        on_request = isinstance(res.error, SweepStopped)
        # (a trial still pending when the sweep ended may carry its id and config, not a step)
        never_ran = res.error is None and not ran and "step" not in last
        if (on_request and "not started" in str(res.error)) or never_ran:
            state = "not started"
        elif on_request:
            state = "stopped"
        elif res.error is not None:
            state = "failed"
        elif "job" not in last:  # stopped before its final report: by ASHA, or the sweep ended
            by_tune = trial_id in ended if ended is not None else True  # (older sweeps: guess)
            asha = sweep.scheduler == "asha" and last and by_tune
            state = "stopped early" if asha else "interrupted"
        else:
            state = "finished"
        # a trial without a final report: its run is found by its marker, its step by checkpoint
        run_id = last.get("mlflow_run_id") or _run_of(store, job_name)
        if state in ("stopped early", "interrupted", "failed") and run_id and base.mlflow.enabled:
            status = "FAILED" if state == "failed" else "KILLED"  # a rerun resumes interrupted ones
            set_status(resolve_uri(base.mlflow.tracking_uri), run_id, status)
        step = last.get("step")
        if state in ("stopped", "interrupted", "not started"):  # where a rerun resumes it
            latest = store.latest_checkpoint(job_name) if ran else None
            step = latest[0] if latest else None
        rows.append(
            {
                "params": {k: (res.config or {}).get(k) for k in sweep.search},
                "metrics": {m: last[m] for m in METRICS if m in last},
                "job": job_name if ran or state != "not started" else None,
                "mlflow_run_id": run_id if ran or state != "not started" else None,
                "step": step,
                "state": state,
                "stopped_early": state == "stopped early",
                "error": f"{type(res.error).__name__}: {res.error}" if state == "failed" else None,
            }
        )
    # the front of the trials that ended (a stopped trial's figures are from part of its run)
    ended = [r for r in rows if r["state"] in ("finished", "stopped early")]
    front = {id(r) for r, on in zip(ended, pareto(ended, sweep.objectives), strict=True) if on}
    for row in rows:
        row["pareto"] = id(row) in front
    return rows


def _write_results(
    rows: list[dict],
    sweep: SweepConfig,
    store: Storage,
    tmp: Path,
    stopped: bool = False,
    requested: bool = False,
):
    """`.cadist/sweep-<name>.results.json` (written whole; `stopped`: the sweep ended before its
    trials did, a rerun resumes it; `requested`: by `cadist stop`, else interrupted) and, for two
    objectives, the trade-off figure beside it, both also in the local folder `tmp`. Returns
    (result, its URI, the figure's URI or None)."""
    out = sweep_key(sweep.name, "results")
    result = {
        "sweep": sweep.name,
        "objectives": sweep.objectives,
        "stopped": stopped,
        "stop_requested": stopped and requested,
        "trials": rows,
    }
    (tmp / Path(out).name).write_text(json.dumps(result, indent=1))
    out = store.upload(tmp / Path(out).name, out)
    plot = None
    if len(sweep.objectives) == 2:  # the trade-off figure: first objective against the second
        from cadist.results.plots import tradeoff_png

        (ym, yd), (xm, xd) = sweep.objectives.items()
        points = [{"label": _label(r["params"])} | r["metrics"] for r in rows]
        plot = sweep_key(sweep.name, "pareto")
        tradeoff_png(points, tmp / Path(plot).name, xm, ym, xd, yd, title=f"sweep {sweep.name}")
        plot = store.upload(tmp / Path(plot).name, plot)
    return result, out, plot


def _run_of(store: Storage, job_name: str) -> str | None:
    """The MLflow run id a trial's job recorded in its marker file, if any."""
    return (store.read_json(job_key(job_name, "mlflow")) or {}).get("run_id")


def _label(params: dict) -> str:
    """Short point label: the last part of each searched key and its value."""
    return ", ".join(
        f"{k.rsplit('.', 1)[-1]}={v:.3g}" if isinstance(v, float) else f"{k.rsplit('.', 1)[-1]}={v}"
        for k, v in params.items()
    )


def _table(rows: list[dict], sweep: SweepConfig) -> str:
    keys = list(sweep.search)
    cols = keys + list(sweep.objectives) + ["pareto"]
    lines = ["  ".join(cols)]
    for r in rows:
        vals = [r["params"].get(k) for k in keys] + [r["metrics"].get(m) for m in sweep.objectives]
        cells = [f"{v:.4g}" if isinstance(v, float) else str(v) for v in vals]
        note = {
            "stopped early": f"stopped at step {r['step']}",
            "stopped": f"stopped on request at step {r['step']}",
            "interrupted": "interrupted",
            "not started": "not started",
        }.get(r["state"], r["error"] or "")
        cells.append("*" if r["pareto"] else note[:60])
        lines.append("  ".join(cells))
    return "\n".join(lines)
