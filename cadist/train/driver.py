"""The driver: validate on this machine, open the MLflow run, start Ray, fit the `TorchTrainer`.

Rerunning a job of the same name with the same storage path resumes it (Ray Train restores the
latest checkpoint; the MLflow run is found again through a marker file); `cadist.train.resume`
decides which changed settings such a rerun may bring.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from cadist import __version__
from cadist.cluster.paths import absolute_paths
from cadist.cluster.ray import (
    check_resources,
    check_shared_paths,
    cluster_nodes,
    connect_ray,
    describe_nodes,
    is_start_failure,
)
from cadist.config.jobfile import read_yaml
from cadist.config.schema import JobConfig
from cadist.data.stream import shard_set
from cadist.errors import CheckpointError, ClusterError, ShardError, TrackingError
from cadist.progress import TrainView, Watcher, verbose
from cadist.redact import redact, redact_text
from cadist.storage.store import Storage
from cadist.storage.uri import job_key, location_env
from cadist.tracking.sources import MLFLOW_SCHEMES
from cadist.train.checks import check_data, check_eval, check_weights, val_image_size
from cadist.train.resume import check_rerun


@dataclass
class TrainResult:
    run_id: str | None
    tracking_uri: str | None
    checkpoint: str | None
    metrics: dict
    stopped: bool = False  # ended early by `cadist stop`; a rerun resumes


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def log_macs(tracker, job: JobConfig) -> None:
    """The model's GMac per validation image (method §10 rules) as `macs/*` metrics at step 0."""
    from cadist.nets.build import is_adaptive
    from cadist.nets.macs import count_dense

    hw = val_image_size(job)
    if hw is None or is_adaptive(job.model.name):  # adaptive models: per evaluation (worker)
        return
    m = count_dense(job.model.name, job.model.output_stride, *hw)
    tracker.log_metrics(
        {
            "macs/backbone_gmac": m["backbone_gmac"],
            "macs/head_gmac": m["head_gmac"],
            "macs/total_gmac": m["total_gmac"],
        },
        step=0,
    )
    tracker.log_params({"macs.input_hw": f"{hw[0]}x{hw[1]}"})


def _previous_job(store: Storage, resolved: str) -> dict | None:
    """The resolved job an earlier start of this job name wrote (key `resolved` of the storage
    path; with today's defaults filled in, so a key added since is no change); None on a first
    start."""
    if not store.is_file(resolved):
        return None
    tree = read_yaml(resolved, "resolved job", "a job mapping", store)
    try:
        return JobConfig.model_validate(tree).model_dump()
    except ValueError:  # written by another cadist version: compare what is there
        return tree


def spool_dir(store: Storage, job_name: str, run_id: str) -> str:
    """Where records for an MLflow run wait while its tracking server does not answer (a URI on
    the storage path, which every node reads)."""
    return store.uri(f"{job_key(job_name, 'spool')}/{run_id}")


def _finish_tracking(
    job: JobConfig, uri: str, run_id: str, tracker, spool: str, ckpt, stopped_at=None
) -> None:
    """Send what the workers spooled, register the best weights, mark the run FINISHED (KILLED,
    tagged `cadist.stopped_at_step`, when `cadist stop` ended it at step `stopped_at`) — or, when
    the tracking server does not answer, one error that says nothing is lost and what to do."""
    from cadist.tracking.registry import register_best
    from cadist.tracking.spool import SpooledTracker, unreachable

    try:
        spooled = SpooledTracker(uri, run_id, spool, echo=print)
        if not spooled.flush(force=True):
            raise TimeoutError("it did not answer")
        if stopped_at is not None:
            tracker.set_tags({"cadist.stopped_at_step": str(stopped_at)})
            tracker.finish("KILLED")
            return
        if job.mlflow.register_model:
            version = register_best(uri, run_id, job.mlflow.register_model)
            if version:
                tracker.set_tags(
                    {"cadist.registered_model": f"{job.mlflow.register_model}/{version}"}
                )
                print(f"registered models:/{job.mlflow.register_model}/{version}", file=sys.stderr)
        tracker.finish("FINISHED")
    except Exception as exn:
        if not unreachable(exn):
            raise
        waiting = SpooledTracker(uri, run_id, spool).pending_count()
        raise TrackingError(
            f"job {job.name}: training {'stopped' if stopped_at is not None else 'finished'} "
            f"(last checkpoint {ckpt}), but the MLflow server "
            f"{uri} does not answer"
            + (f"; {waiting} records wait in {spool}" if waiting else "")
            + "; rerun the same command once it answers: the job then finishes at once and "
            "sends them"
        ) from None


def _mark_failed(tracker) -> None:
    from cadist.tracking.spool import unreachable

    try:
        tracker.finish("FAILED")
    except Exception as exn:
        if not unreachable(exn):
            raise


def _fetch_initial_weights(job: JobConfig, store: Storage) -> JobConfig:
    """model.weights given as an MLflow URI (e.g. the best weights of an earlier run): fetched once
    on the driver into the run's storage (which every node reads), the job pointed at the copy."""
    from cadist.tracking.sources import resolve_weights

    dest = job_key(job.name, "init-weights")
    if not store.is_file(dest):  # a resumed run keeps the copy it started from
        store.upload(resolve_weights(job.model.weights, job.mlflow.tracking_uri), dest)
    model = job.model.model_copy(update={"weights": store.uri(dest)})
    return job.model_copy(update={"model": model})


def run_training(
    job: JobConfig,
    source: str = "<job>",
    address: str | None = None,
    extra_tags: dict[str, str] | None = None,
    callbacks: list | None = None,
    report_evals: bool = False,
    in_sweep: bool = False,
    restart: bool = False,
    stop_file: str | None = None,
) -> TrainResult:
    """Train (or resume) `job` on a Ray cluster; returns the run's final metrics and checkpoint.
    `extra_tags` go on a new MLflow run (a sweep's trials: the parent run); `callbacks` are Ray Train
    callbacks (a sweep's: reports to Tune), `report_evals` reports every evaluation to them;
    `in_sweep`: a failure leaves the MLflow run to the sweep, which marks it FAILED or KILLED;
    `restart`: set an earlier run of this job name aside and start over (else a rerun resumes);
    `stop_file`: the request file that stops it (default: the job's own, which `cadist stop JOB`
    writes; a sweep's trials: the sweep's)."""
    from cadist.tracking.runs import NullTracker, check_reachable, resolve_uri

    check_data(job, source)
    check_weights(job, source)
    check_eval(job, source)
    job = absolute_paths(job)
    weights_source = job.model.weights  # as given: an MLflow URI is fetched to a file below
    store = Storage(job.cluster.storage_path)
    store.check()  # bucket, credentials, endpoint: before Ray starts
    job, rerun = _prepare_storage(job, store, source, restart)
    uri = resolve_uri(job.mlflow.tracking_uri) if job.mlflow.enabled else None
    if uri:
        check_reachable(uri)  # before Ray starts
    if not (in_sweep or callbacks):  # (a sweep's trials: Tune keeps those that finished)
        done = _finished_before(job, store, uri, rerun)
        if done is not None:
            return done
    connect_ray(address or job.cluster.address, job.cluster.use_gpu, source)
    warning = check_resources(job, source, cluster_nodes())  # before the MLflow run opens
    if warning:
        print(f"cadist: {warning}", file=sys.stderr)
    check_shared_paths(_local_paths(store, uri), source)
    run_id, tracker = (None, NullTracker())
    if uri:
        tags = {**({"cadist.weights_source": weights_source} if weights_source else {}),
                **(extra_tags or {})}  # fmt: skip
        run_id, tracker = _open_run(job, uri, store, rerun, tags)
    stop_file = stop_file or store.uri(job_key(job.name, "stop"))
    channel = {"uri": store.uri(job_key(job.name, "progress")), "token": uuid.uuid4().hex}
    trainer = _trainer(job, store, uri, run_id, report_evals, callbacks, stop_file, channel)
    # read by Ray Train's controller, which the driver's environment is passed to at fit()
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = str(job.cluster.start_timeout_s)
    # a sweep's trials: the sweep shows its own progress (a trial's driver is a Tune actor)
    view = None
    if not (in_sweep or callbacks):
        log = store.uri(job_key(job.name, "log"))
        view = TrainView(job.name, job.train.iterations, _workers(job), log=log)
    try:
        with Watcher(channel["uri"], channel["token"], view.on_record) if view else nullcontext():
            result = trainer.fit()
    except Exception as exn:
        if view:
            last = (str(exn).strip().splitlines() or [type(exn).__name__])[-1]
            view.close(f"cadist: job {job.name} failed: {redact_text(last)}")
        if not in_sweep:  # a sweep's trials are marked by the sweep (FAILED, or KILLED if stopped)
            _mark_failed(tracker)
        lost = _storage_failure(exn, store)
        if lost is not None:
            raise lost from None
        if is_start_failure(exn):
            raise ClusterError(
                f"{source}: job {job.name}: Ray Train could not start its "
                f"{_workers(job)} workers within cluster.start_timeout_s "
                f"{job.cluster.start_timeout_s:g} s, twice (nodes lost or busy? the cluster now "
                f"holds {describe_nodes(cluster_nodes())}); rerun the same command once it has the "
                f"nodes again — training resumes from its last checkpoint"
            ) from None
        raise
    ckpt = store.uri_of(result.checkpoint.path) if result.checkpoint else None
    metrics = dict(result.metrics or {})
    stopped = bool(metrics.pop("stopped", False))
    said = f"cadist: job {job.name} finished at step {metrics.get('step')} (checkpoint {ckpt})"
    if stopped:
        if not in_sweep:  # a sweep's request is the sweep's to clear, once no trial runs
            Storage(stop_file).delete("")
        said = (
            f"cadist: job {job.name} stopped at step {metrics.get('step')} on request (checkpoint "
            f"{ckpt}); "
            + ("rerunning the sweep resumes it" if in_sweep else "rerun the same command to resume")
        )
        if not view:
            print(said, file=sys.stderr)
    if view:
        view.close(said)
    if run_id:
        spool = spool_dir(store, job.name, run_id)
        _finish_tracking(
            job,
            uri,
            run_id,
            tracker,
            spool,
            ckpt,
            stopped_at=metrics.get("step") if stopped else None,
        )
    return TrainResult(run_id, uri, ckpt, metrics, stopped)


def _finished_before(job: JobConfig, store: Storage, uri: str | None, rerun) -> TrainResult | None:
    """A rerun of a job that already reached its last step (a committed checkpoint there, its
    MLflow run FINISHED): its result, said in one line, without starting Ray; None otherwise."""
    from cadist.tracking.runs import run_metrics, run_status

    latest = store.latest_checkpoint(job.name) if rerun.step is not None else None
    if latest is None or latest[0] < job.train.iterations:
        return None
    run_id = (store.read_json(job_key(job.name, "mlflow")) or {}).get("run_id") if uri else None
    if uri and run_status(uri, run_id) != "FINISHED":
        return None  # e.g. it ended before its tracking did: the ordinary resume finishes that
    print(
        f"cadist: job {job.name} already reached its last step {latest[0]} (checkpoint "
        f"{latest[1]}); nothing to train — raise train.iterations to train on, or --restart",
        file=sys.stderr,
    )
    metrics = (run_metrics(uri, run_id) if uri else {}) | {"step": latest[0]}
    return TrainResult(run_id, uri, latest[1], metrics, False)


def _storage_failure(exn: BaseException, store: Storage):
    """A StorageError for a run that lost its storage (a worker's cadist.storage.store error, or Ray
    Train's own checkpoint upload failing after its retries), a CheckpointError for a checkpoint a
    worker refused on resume, or None for other failures."""
    from cadist.storage.uri import StorageError, explain

    def mark(cls: type) -> str:  # how a worker's traceback names the class (follows moves)
        return f"{cls.__module__}.{cls.__qualname__}: "

    text = str(exn)
    for line in text.splitlines():
        if mark(CheckpointError) in line:  # a checkpoint refused on resume
            return CheckpointError(line.split(mark(CheckpointError), 1)[1])
        for m in (mark(StorageError), f"{mark(ShardError)}cannot open shard: "):
            if m in line:  # (a shard read is often what meets the outage first)
                return StorageError(f"training stopped: {line.split(m, 1)[1]}")
    if "AWS Error" in text or "google::cloud::Status" in text:
        return StorageError(
            f"training stopped: {explain(exn, store.root, 'write checkpoints to')}; nothing is "
            f"lost: rerun the same command once the storage answers, training resumes from the "
            f"last checkpoint"
        )
    return None


def _local_paths(store: Storage, uri: str | None) -> dict[str, str]:
    """What of the job lives on this machine's disk and must be shared with every node."""
    paths = {} if store.remote else {"cluster.storage_path": store.base}
    if uri and uri.startswith("sqlite:///"):
        paths["mlflow.tracking_uri"] = uri[len("sqlite:///") :]  # (made absolute before)
    return paths


def _workers(job: JobConfig) -> str:
    c = job.cluster
    return f"{c.min_workers} to {c.num_workers}" if c.min_workers else str(c.num_workers)


def _prepare_storage(job: JobConfig, store: Storage, source: str, restart: bool):
    """The job's files beside Ray's run folder: set an earlier run aside (`restart`), fetch start
    weights given by MLflow URI, check what a rerun may change, and save the resolved job.
    Returns the job (weights now a file on the storage path) and the rerun check."""
    resolved, marker = job_key(job.name, "job"), job_key(job.name, "mlflow")
    if restart:
        moved = store.set_aside([job.name, resolved, marker, job_key(job.name, "init-weights")])
        if moved:
            print(f"cadist: restarting job {job.name}; the earlier run is kept as {moved[0]}")
    weights_source = job.model.weights
    if weights_source and weights_source.startswith(MLFLOW_SCHEMES):
        job = _fetch_initial_weights(job, store)
    before = _previous_job(store, resolved)
    # as written (credentials as ***): a rotated presigned URL is the same weights
    rerun = check_rerun(redact(job.model_dump()), before, store.uri(job.name), source)
    if rerun.changes and rerun.step is None:  # nothing to resume: a new MLflow run, right params
        store.set_aside([marker])
    elif rerun.changes:
        print(f"cadist: resuming job {job.name} at step {rerun.step} with {rerun.describe()}")
    # a stop request is for the run going on when it was made: one left over would end this one
    store.delete(job_key(job.name, "stop"))
    store.write(resolved, job.to_yaml())
    return job, rerun


def _open_run(job: JobConfig, uri: str, store: Storage, rerun, extra_tags: dict):
    """Start the job's MLflow run, or continue the one its marker names; params, the resolved job
    and the MAC counts on a new run. Returns (run_id, tracker)."""
    from cadist.tracking.runs import Tracker, start_or_resume_run

    tags = {
        "cadist.version": __version__,
        "cadist.git_commit": git_commit(),
        "cadist.world_size": str(job.cluster.num_workers),
        "cadist.device": "gpu" if job.cluster.use_gpu else "cpu",
        "cadist.job": job.name,
        **extra_tags,
    }
    marker = job_key(job.name, "mlflow")
    run_id = start_or_resume_run(uri, job.mlflow.experiment, job.name, store, marker, tags)
    tracker = Tracker(uri, run_id)
    if rerun.step is not None and rerun.changes:  # params stay those of the first start
        tracker.note_resume_changes(rerun.step, rerun.describe(), job.cluster.num_workers)
    tracker.log_params(job.flat())
    tracker.log_datasets([(shard_set(job.data.train_shards), "training"),
                          (shard_set(job.data.val_shards), "validation")])  # fmt: skip
    tracker.log_text(job.to_yaml(), "config/job.yaml")
    log_macs(tracker, job)
    return run_id, tracker


def _trainer(
    job: JobConfig,
    store: Storage,
    uri,
    run_id,
    report_evals: bool,
    callbacks,
    stop_file: str,
    channel: dict | None = None,
):
    """Ray Train's TorchTrainer for the job: one DeepSpeed rank per worker (`train_worker`);
    rank 0 writes its progress to `channel` ({"uri", "token"}: cadist.progress)."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig

    from cadist.train.backend import CadistTorchConfig, CadistTrainer
    from cadist.train.worker import train_worker

    c = job.cluster
    workers = (c.min_workers, c.num_workers) if c.min_workers else c.num_workers
    storage_path, storage_filesystem = store.ray_storage()
    return CadistTrainer(
        train_worker,
        train_loop_config={
            "job": job.model_dump(),
            "tracking_uri": uri,
            "run_id": run_id,
            "report_evals": report_evals,
            # where rank 0 keeps what a tracking server that stops answering cannot take yet
            "spool": spool_dir(store, job.name, run_id) if run_id else None,
            # `cadist stop` writes it: checkpoint at the next progress report and end
            "stop_file": stop_file,
            # where the object storage is (endpoint, region; never credentials)
            "storage_env": location_env(),
            "progress": channel,
            # each progress line of rank 0 on the console too
            "verbose": verbose() or job.cluster.log_level in ("DEBUG", "INFO"),
        },
        torch_config=CadistTorchConfig(network_interface=job.cluster.network_interface),
        scaling_config=ScalingConfig(
            # elastic: Ray Train asks for num_workers and starts with at least min_workers
            num_workers=workers,
            use_gpu=job.cluster.use_gpu,
            resources_per_worker={"CPU": job.cluster.cpus_per_worker},
            elastic_resize_monitor_interval_s=c.elastic_resize_s,
        ),
        run_config=RunConfig(
            name=job.name,
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            failure_config=FailureConfig(
                max_failures=job.cluster.max_failures,
                # worker groups that cannot start (nodes gone): retry once unless nodes may come;
                # elastic jobs a few times: for some 20-30 s after a node loss Ray Train still
                # counts the lost node, and each start for it waits start_timeout_s
                controller_failure_limit=-1 if c.autoscale else 5 if c.min_workers else 1,
            ),
            checkpoint_config=CheckpointConfig(num_to_keep=job.train.keep_checkpoints),
            callbacks=callbacks,
            logging_config=LoggingConfig(log_level=job.cluster.log_level),
        ),
    )
