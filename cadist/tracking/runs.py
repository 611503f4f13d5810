"""MLflow: the only `import mlflow`. A `NullTracker` stands in when tracking is off or on ranks > 0.

The tracking URI comes from the job, else `$MLFLOW_TRACKING_URI`, else a local SQLite store
`sqlite:///<cwd>/mlflow.db` with artifacts in `<cwd>/mlruns` (no server needed). A server that cannot
be reached is a `ConfigError` before training starts.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

from cadist.errors import ConfigError
from cadist.redact import redact, redact_text

#: tracking store URI schemes MLflow takes (SQLAlchemy's with a driver: postgresql+psycopg2://)
STORE_SCHEMES = ("sqlite", "http", "https", "postgresql", "mysql", "mssql", "databricks", "file")


def resolve_uri(configured: str | None, cwd: Path | None = None) -> str:
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        uri = f"sqlite:///{(cwd or Path.cwd()).resolve() / 'mlflow.db'}"
    scheme = uri.split("://", 1)[0].split("+", 1)[0].lower() if "://" in uri else ""
    rest = uri.split("://", 1)[1] if "://" in uri else ""
    if (
        scheme not in STORE_SCHEMES  # (a bare path: a local file store is gone in MLflow 3)
        or (scheme in ("http", "https") and not urllib.parse.urlparse(uri).hostname)
        or (scheme == "sqlite" and not rest.lstrip("/"))
    ):
        raise ConfigError(
            f"mlflow.tracking_uri {redact_text(uri)!r}: expected a URI such as "
            f"sqlite:////abs/path/mlflow.db or http://127.0.0.1:5000 (MLflow's store schemes: "
            f"{', '.join(STORE_SCHEMES)})"
        )
    return uri


def download_artifact(artifact_uri: str, tracking_uri: str | None = None) -> Path:
    """Fetch an MLflow artifact (`runs:/…`, `models:/…`) into a temporary folder removed at exit."""
    import atexit
    import shutil
    import tempfile

    import mlflow.artifacts

    uri = resolve_uri(tracking_uri)
    check_reachable(uri, read_only=True)
    dst = Path(tempfile.mkdtemp(prefix="cadist-artifact-"))
    atexit.register(shutil.rmtree, dst, True)
    try:
        source = (
            _model_version_uri(artifact_uri, uri) if artifact_uri.startswith("models:/") else None
        )
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=source or artifact_uri, dst_path=str(dst), tracking_uri=uri
        )
    except Exception as exn:
        from cadist.errors import CheckpointError

        first = (str(exn).strip().splitlines() or [type(exn).__name__])[0][:300]
        raise CheckpointError(
            f"{artifact_uri}: cannot be fetched from the MLflow store {uri} ({first}); check the "
            f"run id and path (`cadist report` lists runs; a run's weights are under "
            f"checkpoints/), or point $MLFLOW_TRACKING_URI at the store that holds it"
        ) from None
    return Path(local)


def _model_version_uri(model_uri: str, uri: str) -> str:
    """`models:/<name>/<version>`, `models:/<name>/latest` or `models:/<name>@<alias>` → where that
    version's files are, looked up in the registry of the same store."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    ref = model_uri.removeprefix("models:/").strip("/")
    if "@" in ref:
        name, alias = ref.split("@", 1)
        version = str(client.get_model_version_by_alias(name, alias).version)
    else:
        name, _, version = ref.partition("/")
        if version in ("", "latest"):
            versions = client.search_model_versions(f"name = '{name}'")
            if not versions:
                raise ValueError(f"registered model {name!r} has no versions")
            version = str(max(int(v.version) for v in versions))
    return client.get_model_version_download_uri(name, version)


def register_best(uri: str, run_id: str, name: str) -> str | None:
    """The run's best weights (`checkpoints/best.pt`) as a version of registered model `name`:
    copied to the run's `registered/step_<step>/` as an MLflow pyfunc model (`data/model.pt` and
    `cadist.serving` as its loader; later bests do not change it) and registered from there; the
    same best again returns its existing version. None: no best yet."""
    import shutil
    import tempfile

    import torch
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    if "checkpoints/best.pt" not in {a.path for a in client.list_artifacts(run_id, "checkpoints")}:
        return None
    tmp = Path(tempfile.mkdtemp(prefix="cadist-register-"))
    try:
        best = Path(client.download_artifacts(run_id, "checkpoints/best.pt", str(tmp)))
        meta = torch.load(best, map_location="cpu", weights_only=True)
        step = int(meta.get("step", 0))
        source = f"runs:/{run_id}/registered/step_{step:08d}"
        try:
            client.create_registered_model(name)
        except MlflowException:  # exists already
            pass
        for v in client.search_model_versions(f"name = '{name}'"):
            if v.source == source:
                return str(v.version)
        (tmp / "weights").mkdir()
        shutil.move(best, tmp / "weights" / "model.pt")
        _save_pyfunc(tmp / "weights" / "model.pt", tmp / "model")
        client.log_artifacts(run_id, str(tmp / "model"), f"registered/step_{step:08d}")
        tags = {"step": str(step), "model": str(meta.get("model", ""))}
        if "miou" in meta:
            tags["val_miou"] = f"{float(meta['miou']):.6f}"
        return str(client.create_model_version(name, source, run_id=run_id, tags=tags).version)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _save_pyfunc(weights: Path, dest: Path) -> None:
    """An MLflow pyfunc model at `dest` around a cadist export: loaded by `cadist.serving` (whose
    package travels along as code), RGB uint8 images (B, H, W, 3) in, trainIds (B, H, W) out."""
    from importlib.metadata import PackageNotFoundError, version

    import mlflow.pyfunc
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    requirements = []
    for dist in ("torch", "numpy", "pillow", "pydantic", "pyyaml"):
        try:
            requirements.append(f"{dist}=={version(dist).split('+')[0]}")
        except PackageNotFoundError:
            requirements.append(dist)
    mlflow.pyfunc.save_model(
        str(dest),
        loader_module="cadist.serving",
        data_path=str(weights),
        code_paths=[str(Path(__file__).resolve().parent)],
        signature=ModelSignature(
            inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, 3))]),
            outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1))]),
        ),
        pip_requirements=requirements,
    )


def set_status(uri: str, run_id: str, status: str) -> None:
    """End a run with `status` (e.g. KILLED for a sweep trial its scheduler stopped)."""
    from mlflow.tracking import MlflowClient

    MlflowClient(uri).set_terminated(run_id, status=status)


def check_reachable(uri: str, timeout: float = 5.0, read_only: bool = False) -> None:
    """Fail early and clearly (within `timeout`) when a tracking server is down or a store cannot
    be created; `read_only` (report, fetching a run's weights): a SQLite store must exist already
    — such a command creates nothing."""
    if read_only and uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///") :])
        if not db.is_file():
            raise ConfigError(
                f"MLflow store {uri}: no such database ({db}); nothing has been tracked there — "
                f"pass the tracking URI the runs were logged to (--tracking-uri / "
                f"$MLFLOW_TRACKING_URI; training's default is sqlite:///<folder it ran in>/mlflow.db)"
            )
        return
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as r:
                if r.status != 200:
                    raise OSError(f"HTTP {r.status}")
        except (OSError, urllib.error.URLError) as exn:
            raise ConfigError(
                f"MLflow tracking server {redact_text(uri)} cannot be reached ({exn}); start it (e.g. `mlflow "
                f"server --host 127.0.0.1 --port 5000`), fix mlflow.tracking_uri, or unset it to use "
                f"the local store"
            ) from None
    elif uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///") :])
        if not db.parent.is_dir():
            raise ConfigError(
                f"MLflow store {uri}: folder {db.parent} does not exist; create it or "
                f"change mlflow.tracking_uri"
            )


def _default_artifact_location(uri: str, experiment: str) -> str | None:
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///") :]).parent / "mlruns" / experiment).resolve().as_uri()
    return None


def start_or_resume_run(
    uri: str, experiment: str, run_name: str, store, marker: str, tags: dict[str, str]
) -> str:
    """The MLflow run of a job: created on the first start, found again on reruns via the file
    `marker` (a key of the storage path `store`, a `cadist.storage.store.Storage`)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    run_id = (store.read_json(marker) or {}).get("run_id")
    if run_id:
        try:
            run = client.get_run(run_id)
            if run.info.lifecycle_stage == "active":
                client.update_run(run_id, status="RUNNING")
                return run_id
        except Exception:  # deleted or from another store: start a new run
            pass
    run_id = new_run(uri, experiment, run_name, tags)
    store.write_json(marker, {"run_id": run_id, "tracking_uri": uri}, indent=None)
    return run_id


def new_run(uri: str, experiment: str, run_name: str, tags: dict[str, str]) -> str:
    """A fresh MLflow run (evaluations that are not resumed, e.g. an HPatches score)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    exp_id = (
        exp.experiment_id
        if exp
        else client.create_experiment(
            experiment, artifact_location=_default_artifact_location(uri, experiment)
        )
    )
    return client.create_run(
        exp_id, run_name=run_name, tags={k: str(redact(v, k)) for k, v in (tags or {}).items()}
    ).info.run_id


class Tracker:
    """Logs to one MLflow run through the client API (no global active-run state)."""

    def __init__(self, uri: str, run_id: str):
        from mlflow.tracking import MlflowClient

        self.client, self.run_id, self.uri = MlflowClient(uri), run_id, uri

    def log_metrics(self, metrics: dict[str, float], step: int, ts: int | None = None) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000) if ts is None else ts
        items = [
            Metric(k.replace(" ", "_"), float(v), ts, step)
            for k, v in metrics.items()
            if v is not None and np.isfinite(v)
        ]
        for i in range(0, len(items), 500):
            self.client.log_batch(self.run_id, metrics=items[i : i + 500])

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(redact(v, k))[:6000]) for k, v in params.items()]
        existing = self.client.get_run(self.run_id).data.params
        items = [p for p in items if p.key not in existing]  # params are immutable on resume
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def set_tags(self, tags: dict[str, str]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, str(redact(v, k)))

    def note_resume_changes(self, step: int, changes: str, world_size: int) -> None:
        """A resume with changed settings: appended to the run's `cadist.resume_changes` tag (its
        params keep the values of the first start), and the world size it now runs at."""
        earlier = self.client.get_run(self.run_id).data.tags.get("cadist.resume_changes")
        line = f"step {step}: {changes}"
        self.set_tags(
            {
                "cadist.resume_changes": f"{earlier}; {line}" if earlier else line,
                "cadist.world_size": str(world_size),
            }
        )

    def log_datasets(self, sets: list[tuple[dict, str]]) -> None:
        """Shard sets (`cadist.data.stream.shard_set`) as the run's dataset inputs, each with its
        context ("training", "validation", "evaluation"): the MLflow UI's Datasets column, name
        and digest — which runs saw the same shards."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        inputs = []
        for s, context in sets:
            scheme = s["source"].split("://", 1)[0] if "://" in s["source"] else "local"
            profile = {"num_shards": s["shards"], "num_samples": s["samples"]}
            ds = Dataset(name=s["name"], digest=s["digest"], source_type=scheme,
                         source=json.dumps({"uri": redact_text(s["source"])}),
                         profile=json.dumps(profile))  # fmt: skip
            inputs.append(DatasetInput(ds, [InputTag("mlflow.data.context", context)]))
        self.client.log_inputs(self.run_id, datasets=inputs)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, redact_text(text), artifact_file)

    def log_dict(self, obj: dict, artifact_file: str) -> None:
        self.client.log_dict(self.run_id, redact(obj), artifact_file)

    def log_image(self, image: np.ndarray, artifact_file: str) -> None:
        self.client.log_image(self.run_id, image, artifact_file=artifact_file)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)


def training_runs(uri: str, experiment: str, per_class: bool = False) -> list[dict]:
    """The training runs of an experiment (those with a `cadist.job` tag), each as {run_id, name,
    status, params, tags, history: {metric: [(step, value), …]}, datasets: {context:
    "name@digest"}} for the metrics a report needs;
    `per_class`: the per-class IoU histories (`val/iou/<class>`) too."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise ConfigError(
            f"MLflow at {uri}: no experiment {experiment!r}; {experiments_there(uri)}"
        )
    out = []
    for run in client.search_runs([exp.experiment_id], "tags.`cadist.job` != ''"):
        history = {
            key: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]
            for key in run.data.metrics
            if key in REPORT_METRICS or (per_class and key.startswith("val/iou/"))
        }
        out.append(
            {
                "run_id": run.info.run_id,
                "name": run.info.run_name,
                "status": run.info.status,
                "params": run.data.params,
                "tags": run.data.tags,
                "history": history,
                "datasets": _datasets_of(run),
            }
        )
    return out


def _datasets_of(run) -> dict[str, str]:
    """{context: "<name>@<digest>"} of a run's dataset inputs (`Tracker.log_datasets`)."""
    out = {}
    for given in getattr(run.inputs, "dataset_inputs", None) or []:
        context = next((t.value for t in given.tags if t.key == "mlflow.data.context"), "")
        out[context] = f"{given.dataset.name}@{given.dataset.digest}"
    return out


def experiments_there(uri: str) -> str:
    """'experiments there: a, b' (those with runs), for errors that name a missing one."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    names = sorted(
        e.name
        for e in client.search_experiments()
        if client.search_runs([e.experiment_id], max_results=1)
    )
    return f"experiments there: {', '.join(names)}" if names else "it holds no runs yet"


#: metrics `cadist report` reads from every run
REPORT_METRICS = (
    "val/miou",
    "val/miou_inference",
    "val/high_res_fraction",
    "macs/backbone_gmac",
    "macs/backbone_gmac_computed",
)


def unreachable(exn: BaseException) -> bool:
    """A tracking server that does not answer (connection refused or reset, a timeout, HTTP 503
    after the client's retries), as opposed to a request it answers and rejects."""
    import requests
    from mlflow.exceptions import MlflowException

    if isinstance(exn, MlflowException):
        return str(exn).startswith("API request to") or exn.error_code == "TEMPORARILY_UNAVAILABLE"
    return isinstance(exn, (requests.exceptions.RequestException, ConnectionError, TimeoutError))


#: how a training worker's MLflow client waits on a server that does not answer (unless set): a
#: few seconds, not the client's default of several minutes per call
WORKER_HTTP_ENV = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}


class SpooledTracker(Tracker):
    """A Tracker that training does not wait on. When the tracking server does not answer, each
    record goes to a spool on the storage path instead (`spool` a folder or s3://… / gs://… URI:
    `q/<time>.json` one record each — metrics with their steps and times, texts, files — and the
    files themselves under `files/`) and training goes on; the spool is sent in order once the
    server answers again — by this process, by a restarted worker on any node, or by the driver at
    the end. While the server is down it is tried at most once every `retry_s` seconds."""

    def __init__(self, uri: str, run_id: str, spool: str | Path, echo=print, retry_s=60.0):
        from cadist.storage.store import Storage

        super().__init__(uri, run_id)
        self.store = Storage(spool)
        self.spool, self.echo, self.retry_s = self.store.uri(), echo, retry_s
        self._next_try, self._down_at_step, self._step = 0.0, None, 0
        self._maybe_pending = True  # until a look finds the spool empty (a crash may have left one)

    # -- what training calls ------------------------------------------------------------------
    def log_metrics(self, metrics: dict[str, float], step: int, ts: int | None = None) -> None:
        self._step = step
        clean = {k: float(v) for k, v in metrics.items() if v is not None and np.isfinite(v)}
        ts = int(time.time() * 1000) if ts is None else ts
        self._record({"op": "metrics", "metrics": clean, "step": step, "ts": ts})

    def log_text(self, text: str, artifact_file: str) -> None:
        self._record({"op": "text", "text": redact_text(text), "artifact_file": artifact_file})

    def log_image(self, image: np.ndarray, artifact_file: str) -> None:
        def spooled(dest: Path) -> None:
            from PIL import Image

            Image.fromarray(np.asarray(image)).save(dest)

        self._record_file(
            lambda: super(SpooledTracker, self).log_image(image, artifact_file),
            Path(artifact_file).name,
            str(Path(artifact_file).parent) if "/" in artifact_file else None,
            spooled,
        )

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        import shutil

        self._record_file(
            lambda: super(SpooledTracker, self).log_artifact(path, artifact_path),
            Path(path).name,
            artifact_path,
            lambda dest: shutil.copyfile(path, dest),
        )

    def flush(self, force: bool = False) -> bool:
        """Send what the spool holds; True when it is empty afterwards."""
        pending = self._pending() if self._maybe_pending else []
        if not pending:
            self._maybe_pending = False
            return True
        if not force and time.monotonic() < self._next_try:
            return False
        sent = 0
        try:
            for key, rec in pending:
                self._send(rec)
                self._drop(key, rec)
                sent += 1
        except Exception as exn:
            if not unreachable(exn):
                raise
            self._went_down(exn)
            return False
        self.store.delete("")
        self._maybe_pending = False
        if self._down_at_step is not None:
            self.echo(
                f"[cadist] MLflow at {self.uri} answers again: sent the {sent} records kept since "
                f"step {self._down_at_step}"
            )
        self._down_at_step = None
        return True

    def pending_count(self) -> int:
        return len(self.store.list("q", "*.json"))

    # -- the spool ------------------------------------------------------------------------------
    def _pending(self) -> list[tuple[str, dict]]:
        out = []
        for name in self.store.list("q", "*.json"):
            rec = self.store.read_json(f"q/{name}")
            if rec is not None:  # (a record cut short by a crash is never written: one PUT)
                out.append((f"q/{name}", rec))
        return out

    def _append(self, rec: dict) -> None:
        self._maybe_pending = True
        self.store.write_json(f"q/{time.time_ns():020d}-{os.getpid()}.json", rec, indent=None)

    def _drop(self, key: str, rec: dict) -> None:
        """A record sent: its entry (and spooled file) go."""
        self.store.delete(key)
        if rec["op"] == "artifact":
            self.store.delete(rec["key"].rsplit("/", 1)[0])

    def _send(self, rec: dict) -> None:
        if rec["op"] == "metrics":
            super().log_metrics(rec["metrics"], rec["step"], rec["ts"])
        elif rec["op"] == "text":
            super().log_text(rec["text"], rec["artifact_file"])
        elif rec["op"] == "artifact":
            import tempfile

            with tempfile.TemporaryDirectory() as tmp:  # the file keeps its name as an artifact
                local = self.store.download(rec["key"], Path(tmp) / rec["key"].rsplit("/", 1)[1])
                super().log_artifact(local, rec["artifact_path"])

    def _record(self, rec: dict) -> None:
        if self.flush():
            try:
                self._send(rec)
                return
            except Exception as exn:
                if not unreachable(exn):
                    raise
                self._went_down(exn)
        self._append(rec)

    def _record_file(self, send, name: str, artifact_path: str | None, copy) -> None:
        """Files are sent as they are; only when the server does not answer is a copy spooled
        (`files/<n>/<name>`, as the artifact keeps its file name)."""
        import tempfile

        if self.flush():
            try:
                send()
                return
            except Exception as exn:
                if not unreachable(exn):
                    raise
                self._went_down(exn)
        key = f"files/{time.time_ns()}/{name}"
        with tempfile.TemporaryDirectory() as tmp:
            copy(Path(tmp) / name)
            self.store.upload(Path(tmp) / name, key)
        self._append({"op": "artifact", "key": key, "artifact_path": artifact_path})

    def _went_down(self, exn: BaseException) -> None:
        self._next_try = time.monotonic() + self.retry_s
        if self._down_at_step is None:
            self._down_at_step = self._step
            reason = str(exn).splitlines()[0][:160]
            self.echo(
                f"[cadist] MLflow at {self.uri} does not answer at step {self._step} ({reason}); "
                f"training goes on, records are kept in {self.spool} and sent once it answers"
            )


def system_metrics(uri: str, run_id: str, node: str, interval_s: float, retry_s: float = 60.0):
    """Sample this machine's CPU, memory, disk, network and (with NVML) GPU use for the run, as
    `system/<node>/…` metrics continuing the run's earlier steps; returns the sampler (call
    `finish()`), or None when it cannot start. MLflow's sampler stops for good the first time the
    server does not answer; this one starts it again, at most every `retry_s` seconds, once the
    server answers and the run is still running."""
    import logging

    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
    sampler = SystemSampler(uri, run_id, node, interval_s, retry_s)
    return sampler if sampler.monitor is not None else None


class SystemSampler:
    """MLflow's SystemMetricsMonitor, started again after a tracking-server outage (see
    `system_metrics`). Samples taken while the server is down are not kept."""

    def __init__(self, uri: str, run_id: str, node: str, interval_s: float, retry_s: float):
        import threading

        self.uri, self.run_id, self.node = uri, run_id, node
        self.interval_s, self.retry_s = interval_s, retry_s
        self.restarts = 0
        self.monitor = self._start()
        self._stop = threading.Event()
        self._watch = threading.Thread(target=self._watch_loop, daemon=True, name="cadist-sysmet")
        if self.monitor is not None:
            self._watch.start()

    def _start(self):
        import logging

        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        try:
            monitor = SystemMetricsMonitor(
                self.run_id,
                sampling_interval=self.interval_s,
                samples_before_logging=1,
                resume_logging=True,  # steps continue after the run's last system metric
                node_id=self.node,
                tracking_uri=self.uri,
            )
            monitor.start()
        except Exception as exn:  # a sampler is never worth stopping training for
            logging.getLogger("cadist.train").warning(f"[cadist] no system metrics: {exn}")
            return None
        return monitor

    def _stopped(self) -> bool:
        thread = getattr(self.monitor, "_process", None)  # MLflow's sampling thread
        return thread is not None and not thread.is_alive()

    def _watch_loop(self) -> None:
        from mlflow.tracking import MlflowClient

        while not self._stop.wait(self.retry_s):
            if not self._stopped():
                continue
            try:  # the server answers again? (else MLflow would restart its steps at 0)
                status = MlflowClient(self.uri).get_run(self.run_id).info.status
            except Exception:
                continue
            if status != "RUNNING":
                return
            monitor = self._start()
            if monitor is not None:
                self.monitor, self.restarts = monitor, self.restarts + 1

    def finish(self) -> None:
        self._stop.set()
        if self._watch.is_alive():
            self._watch.join(timeout=10)  # it may be waiting on a server that does not answer
        if self.monitor is not None:
            self.monitor.finish()


class NullTracker:
    """Tracking off, or a rank that does not log: every call does nothing."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None
