"""Jobs run where their workers are (another folder, another node): the job with its local paths made
absolute, and the default MLflow store pinned to this machine's folder."""

from __future__ import annotations

from pathlib import Path

from cadist.config.schema import JobConfig
from cadist.tracking.sources import MLFLOW_SCHEMES


def absolute_paths(job: JobConfig) -> JobConfig:
    """Workers may run elsewhere (another cwd, another node): make local paths absolute."""

    def fix(p):
        local = p and "://" not in p and not p.startswith(("pipe:", *MLFLOW_SCHEMES))
        return str(Path(p).resolve()) if local else p

    data = job.data.model_copy(
        update={"train_shards": fix(job.data.train_shards), "val_shards": fix(job.data.val_shards)}
    )
    model = job.model.model_copy(
        update={
            "backbone_weights": fix(job.model.backbone_weights),
            "weights": fix(job.model.weights),
        }
    )
    cluster = job.cluster.model_copy(update={"storage_path": fix(job.cluster.storage_path)})
    mlflow = job.mlflow
    if mlflow.enabled:  # the default store (./mlflow.db) and relative SQLite paths, pinned here
        from cadist.tracking.runs import resolve_uri

        uri = resolve_uri(mlflow.tracking_uri)
        if uri.startswith("sqlite:///") and not uri[len("sqlite:///") :].startswith("/"):
            uri = "sqlite:///" + str(Path(uri[len("sqlite:///") :]).resolve())
        mlflow = mlflow.model_copy(update={"tracking_uri": uri})
    return job.model_copy(
        update={"data": data, "model": model, "cluster": cluster, "mlflow": mlflow}
    )
