"""Sweeps: search spaces over job keys → Ray Tune; every trial is an ordinary cadist job run by the
same driver (`run_training`: Ray Train + DeepSpeed + MLflow), reported to Tune once it finishes.

A sweep file names a base job, fixed overrides, the searched keys and the objectives, e.g.

    name: edge_sweep
    job: demo.yaml                       # relative to this file
    set: {model.name: deeplabv3_batch_ap_resnet_tiny}
    search:
      model.edge_threshold: {loguniform: [0.05, 0.5]}
      model.trimap_width: {choice: [3, 7, 11, 15]}
    objectives: {val/miou: max, macs/backbone_gmac: min}
    num_samples: 8

With two objectives the searcher is Optuna's multi-objective sampler and the result is a Pareto
front (mIoU against multiply-adds); every trial is an MLflow run nested under the sweep's run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import tempfile
import time
from pathlib import Path

from ray.tune import Callback

from cadist.config.jobfile import validate_job
from cadist.errors import ConfigError
from cadist.progress import verbose
from cadist.redact import redact
from cadist.storage.store import Storage
from cadist.storage.uri import adopt_location_env, job_key, location_env, sweep_key
from cadist.sweep.files import ENDED, SweepStopped, _ended, _sweep_files
from cadist.sweep.outcome import (
    _finish_parent,
    _open_parent,
    _rows,
    _table,
    _trial_dirname,
    _write_results,
)
from cadist.sweep.spec import METRICS, SweepConfig, load_sweep, trial_job
from cadist.train.resume import changed_keys


def _space(sweep: SweepConfig) -> dict:
    from ray import tune

    space = {}
    for key, dom in sweep.search.items():
        kind, args = next(iter(dom.items()))
        space[key] = {
            "uniform": lambda a: tune.uniform(*a),
            "loguniform": lambda a: tune.loguniform(*a),
            "choice": tune.grid_search if sweep.searcher == "grid" else tune.choice,
            "randint": lambda a: tune.randint(a[0], a[1] + 1),
            "quniform": lambda a: tune.quniform(*a),
        }[kind](args)
    return space


def _run_trial(config: dict, ctx: dict) -> None:
    """One Tune trial: the base job with this trial's values, trained by the ordinary driver."""
    from ray import tune

    from cadist.train.driver import run_training

    adopt_location_env(ctx.get("storage_env"))
    trial_id = tune.get_context().get_trial_id()
    job = trial_job(ctx["fixed"], config, f"{ctx['name']}-{trial_id}", ctx["source"])
    stop_file = ctx.get("stop_file")
    if stop_file and Storage(stop_file).exists():  # asked to stop while this trial waited to start
        raise SweepStopped(f"job {job.name}: not started, the sweep was asked to stop")
    tags = {"mlflow.parentRunId": ctx["parent_run_id"]} if ctx["parent_run_id"] else {}
    callbacks = None
    if ctx.get("asha"):  # every evaluation goes to Tune, whose scheduler may stop this trial
        from ray.tune.integration.ray_train import TuneReportCallback

        callbacks = [TuneReportCallback()]
    r = run_training(
        job,
        ctx["source"],
        extra_tags=tags | {"cadist.sweep": ctx["name"]},
        callbacks=callbacks,
        report_evals=bool(callbacks),
        in_sweep=True,
        stop_file=stop_file,
    )
    if r.stopped:  # checkpointed on request: errored for Tune, so a rerun resumes it
        raise SweepStopped(f"job {job.name}: stopped at step {r.metrics.get('step')} on request")
    report = {m: float(v) for m, v in r.metrics.items() if m in METRICS}
    report |= {"mlflow_run_id": r.run_id or "", "job": job.name, "step": r.metrics.get("step")}
    tune.report(report)


def _fingerprint(sweep: SweepConfig, fixed: dict) -> str:
    blob = json.dumps({"sweep": redact(sweep.model_dump()), "job": redact(fixed)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _resume_or_start(
    store: Storage, sweep: SweepConfig, fixed: dict, source: str, restart: bool, echo
) -> bool:
    """Whether the sweep's Tune experiment is resumed (True) or started (False). A rerun of the
    same sweep resumes it; a sweep file changed since the first run is refused unless `restart`,
    which sets the earlier run's folder, MLflow marker and state aside and starts afresh."""
    exp_dir, state, marker = _sweep_files(sweep)
    if restart:
        ended = [sweep_key(sweep.name, kind) for kind in ("results", "pareto")]
        moved = store.set_aside([exp_dir, state, marker, *ended])
        if moved:
            echo(f"restarting sweep {sweep.name}: the earlier run is kept as {moved[0]}")
    elif would_resume(store, sweep, fixed, source):
        return True
    current = {
        "fingerprint": _fingerprint(sweep, fixed),
        "sweep": redact(sweep.model_dump()),
        "job": redact(fixed),  # credentials as ***: what the sweep trains is in memory only
    }
    store.write_json(state, current)
    return False


class _StopWhenIdle(Callback):
    """Tune callback of a sweep asked to stop: once none of its trials runs any more (each ended at a
    checkpoint, or before it started), end the run as Ctrl-C would (SIGUSR1, which Tune catches:
    it saves the experiment, trials not started yet stay pending for the rerun)."""

    def __init__(self, stop_file: str):
        self.stop_file = stop_file
        self.sent, self.looked = False, 0.0

    def on_step_begin(self, iteration, trials, **info):
        if self.sent or time.monotonic() - self.looked < 1.0:  # Tune steps many times a second
            return
        self.looked = time.monotonic()
        if not Storage(self.stop_file).exists():
            return
        if any(t.status == "RUNNING" for t in trials):
            return
        self.sent = True
        # Tune catches SIGUSR1 only when it runs in the main thread; elsewhere the signal would end
        # the process, and the remaining trials instead end one by one before they start
        if callable(signal.getsignal(signal.SIGUSR1)):
            os.kill(os.getpid(), signal.SIGUSR1)


class _RecordEnded(Callback):
    """Tune callback: the ids of trials Tune ended — finished, or stopped by the scheduler (ASHA) —
    in `<experiment>/cadist_trials_ended.json` (`uri`, on the storage path), so that the sweep's
    results tell a trial ASHA stopped from one an interruption cut short (neither made its final
    report)."""

    def __init__(self, uri: str):
        self.uri = uri

    def setup(self, **info):
        if not Storage(self.uri).exists():
            self._write([])

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._write(sorted(set(_ended(self.uri) or ()) | {trial.trial_id}))

    def _write(self, ids: list[str]) -> None:
        Storage(self.uri).write_json("", ids, indent=None)


def would_resume(store: Storage, sweep: SweepConfig, fixed: dict, source: str) -> bool:
    """Whether a rerun resumes the sweep's earlier Tune experiment (read-only). One started with
    other settings is a ConfigError naming the changed keys."""
    from ray import tune

    exp_dir, state, _ = _sweep_files(sweep)
    path, fs = store.ray_storage()
    if not tune.Tuner.can_restore(f"{path}/{exp_dir}", storage_filesystem=fs):
        return False
    exp_dir = store.uri(exp_dir)
    before = store.read_json(state) or {}
    if before.get("fingerprint") != _fingerprint(sweep, fixed):
        changed = changed_keys(
            {"sweep": before.get("sweep", {}), "job": before.get("job", {})},
            {"sweep": redact(sweep.model_dump()), "job": redact(fixed)},
        )
        raise ConfigError(
            f"{source}: sweep {sweep.name} has a run in {exp_dir} that was started with "
            f"different settings (changed: {', '.join(changed[:6]) or 'unknown'}); undo the "
            f"change to resume it, or pass --restart to start a new run under this name "
            f"(the earlier one is kept aside)"
        )
    return True


def run_sweep(
    path: str | Path, overrides: tuple[str, ...] = (), echo=print, restart: bool = False
) -> dict:
    """Run a sweep file; returns {"sweep", "trials": [...], "results_file", "resumed"} and prints a
    table. Rerunning an interrupted sweep resumes it: finished trials are kept, unfinished and
    failed ones continue from their last training checkpoint."""
    sweep, fixed, _ = load_sweep(path, overrides)
    return run_loaded_sweep(sweep, fixed, str(path), echo, restart)


class _ShowProgress(Callback):
    """Tune callback on the sweep's driver: one bar of the sweep's optimiser steps (every trial's
    iterations; a finished or scheduler-stopped trial counts whole, a running one as far as its
    progress file says) with trials done/running/pending and the best result so far."""

    def __init__(self, sweep: SweepConfig, iterations: int, storage: str):
        # (Tune pickles its callbacks into the experiment: names and numbers only, never the
        # sweep's settings, which may hold a presigned URL)
        self.name, self.samples = sweep.name, sweep.num_samples
        self.objectives = dict(sweep.objectives)
        self.iterations, self.storage = iterations, storage
        self.bar, self.store, self.looked = None, None, 0.0

    def __getstate__(self) -> dict:  # (Tune saves its callbacks with the experiment)
        return self.__dict__ | {"bar": None, "store": None}

    def setup(self, **info):
        from cadist.progress import Bar

        self.store = Storage(self.storage)
        self.bar = Bar(f"sweep {self.name}", self.samples * self.iterations, "step")

    def on_step_begin(self, iteration, trials, **info):
        if self.bar is None or time.monotonic() - self.looked < 2.0:
            return
        self.looked = time.monotonic()
        steps, count = 0, {"done": 0, "running": 0, "pending": 0}
        for t in trials:
            if t.status in ("TERMINATED", "ERROR"):
                count["done"] += 1
                steps += self.iterations if t.status == "TERMINATED" else 0
            elif t.status == "RUNNING":
                count["running"] += 1
                rec = self.store.read_json(job_key(f"{self.name}-{t.trial_id}", "progress"))
                steps += int((rec or {}).get("step") or 0)
            else:
                count["pending"] += 1
        count["pending"] += max(0, self.samples - len(trials))  # not created yet
        note = " · ".join(f"{v} {k}" for k, v in count.items())
        best = self._best(trials)
        self.bar.update_to(steps, note + (f" · best {best}" if best else ""))

    def _best(self, trials) -> str | None:
        (first, goal), *rest = self.objectives.items()
        done = [t.last_result for t in trials
                if t.status == "TERMINATED" and first in (t.last_result or {})]  # fmt: skip
        if not done:
            return None
        r = (max if goal == "max" else min)(done, key=lambda r: r[first])
        more = "".join(f", {k} {r[k]:.3f}" for k, _ in rest if k in r)
        return f"{first} {r[first]:.4f}{more}"

    def on_experiment_end(self, trials, **info):
        self.looked = 0.0
        self.on_step_begin(0, trials)
        if self.bar is not None:
            self.bar.close()


def run_loaded_sweep(
    sweep: SweepConfig,
    fixed: dict,
    source: str,
    echo=print,
    restart: bool = False,
    address: str | None = None,
) -> dict:
    """Run a sweep already read and checked (`load_sweep`): `fixed` is its base job tree with the
    sweep's fixed overrides, relative paths resolved here (on a cluster: its working directory);
    `address`: the Ray cluster (default: the base job's, else a local Ray)."""
    from ray import tune

    from cadist.cluster.paths import absolute_paths
    from cadist.cluster.ray import check_resources, cluster_nodes, connect_ray, trial_slots
    from cadist.train.checks import check_data, check_eval, check_weights

    base = absolute_paths(validate_job(json.loads(json.dumps(fixed)), source))
    check_data(base, source)
    check_weights(base, source)
    check_eval(base, source)
    fixed = json.loads(json.dumps(base.model_dump()))  # absolute paths for the trials
    store = Storage(base.cluster.storage_path)
    store.check()
    resumed = _resume_or_start(store, sweep, fixed, source, restart, echo)
    # a stop request is for the run going on when it was made: one left over would end this one
    stop_file = sweep_key(sweep.name, "stop")
    store.delete(stop_file)
    connect_ray(address or base.cluster.address, base.cluster.use_gpu, source)
    nodes = cluster_nodes()
    warning = check_resources(base, source, nodes)  # one trial must fit
    if warning:
        echo(warning)
    slots = trial_slots(base, nodes, sweep.max_concurrent)
    if slots < sweep.max_concurrent:
        echo(
            f"max_concurrent {sweep.max_concurrent}: the Ray cluster holds {slots} trial(s) of "
            f"{base.cluster.num_workers} worker(s) at once; running {slots} at a time"
        )
    parent, tracker = _open_parent(sweep, base, store) if base.mlflow.enabled else (None, None)
    ctx = {"fixed": fixed, "name": sweep.name, "source": source, "parent_run_id": parent,
           "asha": sweep.scheduler == "asha", "stop_file": store.uri(stop_file),
           "storage_env": location_env()}  # fmt: skip
    trainable = tune.with_resources(
        tune.with_parameters(_run_trial, ctx=ctx), {"CPU": 0, "memory": 64 * 1024**2}
    )
    storage_path, storage_filesystem = store.ray_storage()
    if resumed:
        tuner = tune.Tuner.restore(
            f"{storage_path}/sweep-{sweep.name}",
            trainable=trainable,
            resume_unfinished=True,
            resume_errored=True,
            storage_filesystem=storage_filesystem,
        )
        echo(f"resuming sweep {sweep.name}: finished trials are kept, the others continue")
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=_space(sweep),
            tune_config=_tune_config(sweep, base, slots),
            run_config=tune.RunConfig(
                name=f"sweep-{sweep.name}",
                storage_path=storage_path,
                storage_filesystem=storage_filesystem,
                callbacks=[
                    _StopWhenIdle(store.uri(stop_file)),
                    _RecordEnded(store.uri(f"sweep-{sweep.name}/{ENDED}")),
                    _ShowProgress(sweep, base.train.iterations, store.uri()),
                ],
                verbose=None if verbose() else 0,  # (cadist's bar instead of Tune's tables)
            ),
        )
    if (
        not verbose()
    ):  # Tune's own tables and INFO lines: with --verbose only (cadist's bar instead);
        # Tune's new output engine prints its tables even when silent, the former one does not
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
        logging.getLogger("ray.tune").setLevel(logging.WARNING)
    rows = _rows(tuner.fit(), sweep, base, store)
    # ended before its trials did: stopped on request, or interrupted (Ctrl-C, SIGTERM)
    stopped = any(r["state"] in ("stopped", "not started", "interrupted") for r in rows)
    requested = store.exists(stop_file)
    with tempfile.TemporaryDirectory() as tmp:
        result, out, plot = _write_results(rows, sweep, store, Path(tmp), stopped, requested)
        store.delete(stop_file)  # answered (or the sweep ended before it was read)
        if parent:  # (MLflow on)
            _finish_parent(tracker, parent, rows, Path(tmp), out, plot, stopped)
    echo(_table(rows, sweep))
    if stopped:
        n = {
            s: sum(r["state"] == s for r in rows) for s in ("stopped", "not started", "interrupted")
        }
        echo(
            f"sweep {sweep.name} stopped on request: {n['stopped']} trial(s) checkpointed and "
            f"ended, {n['not started']} not started; rerun the same `cadist tune` command to resume"
            if requested
            else f"sweep {sweep.name} interrupted: {n['interrupted'] + n['stopped']} trial(s) "
            f"ended before they finished, {n['not started']} not started; rerun the same `cadist "
            f"tune` command to resume them from their last checkpoints"
        )
    return result | {
        "parent_run_id": parent,
        "results_file": str(out),
        "resumed": resumed,
        "plot": str(plot) if plot else None,
    }


def _tune_config(sweep: SweepConfig, base, slots: int):
    """Searcher (random/grid or Optuna, at most `slots` trials at a time) and scheduler (ASHA on
    the first objective, in optimiser steps)."""
    from ray import tune
    from ray.tune.search import ConcurrencyLimiter

    metrics, modes = list(sweep.objectives), list(sweep.objectives.values())
    if sweep.searcher == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        searcher = (  # one objective: metric and mode come from the TuneConfig below
            OptunaSearch(seed=sweep.seed)
            if len(metrics) == 1
            else OptunaSearch(metric=metrics, mode=modes, seed=sweep.seed)
        )
        search_alg = ConcurrencyLimiter(searcher, slots)
    else:
        from ray.tune.search.basic_variant import BasicVariantGenerator

        search_alg = BasicVariantGenerator(max_concurrent=slots, random_state=sweep.seed)
    scheduler = None
    if sweep.scheduler == "asha":
        from ray.tune.schedulers import ASHAScheduler

        scheduler = ASHAScheduler(
            time_attr="step",
            max_t=base.train.iterations,
            grace_period=sweep.grace_steps or 2 * base.eval.interval,
            reduction_factor=sweep.reduction_factor,
            stop_last_trials=False,  # a trial at its last step finishes (final report, MLflow)
        )
    return tune.TuneConfig(
        search_alg=search_alg,
        scheduler=scheduler,
        trial_dirname_creator=_trial_dirname,
        num_samples=1 if sweep.searcher == "grid" else sweep.num_samples,  # (a grid: each once)
        **({"metric": metrics[0], "mode": modes[0]} if len(metrics) == 1 else {}),
    )
