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
    "macs/total_gmac",
    "val/images_per_s",
)


class NullTracker:
    """Tracking off, or a rank that does not log: every call does nothing."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def metric_history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    """(step, value) of every logged value of metric `key` of a run, by step."""
    from mlflow.tracking import MlflowClient

    return sorted((m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, key))


def run_metrics(uri: str, run_id: str) -> dict[str, float]:
    """A run's latest value of each metric."""
    from mlflow.tracking import MlflowClient

    return dict(MlflowClient(uri).get_run(run_id).data.metrics)


def run_status(uri: str, run_id: str | None) -> str | None:
    """A run's status (FINISHED, RUNNING, KILLED, …), None if there is no such run."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    if not run_id:
        return None
    try:
        return MlflowClient(uri).get_run(run_id).info.status
    except MlflowException:
        return None


def experiment_id(uri: str, name: str) -> str | None:
    """The id of experiment `name`, None if there is none."""
    from mlflow.tracking import MlflowClient

    exp = MlflowClient(uri).get_experiment_by_name(name)
    return exp.experiment_id if exp else None


def experiments_with_training_runs(uri: str) -> list[str]:
    """The names of the experiments that hold cadist training or evaluation runs (a `cadist.job`
    tag), oldest experiment first."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exps = sorted(client.search_experiments(), key=lambda e: (e.creation_time or 0, e.name))
    return [
        e.name
        for e in exps
        if client.search_runs([e.experiment_id], "tags.`cadist.job` != ''", max_results=1)
    ]
