"""Where weights come from: a weights file, a cadist checkpoint folder (`cadist_runs/<job>/step_…`,
holding `model.pt`; either may be on object storage, `s3://…`/`gs://…`), or an MLflow artifact — `runs:/<run_id>/checkpoints/best.pt` (`runs:/<run_id>`
alone means its best weights) or `models:/<name>/<version>` — fetched from the tracking store."""

from __future__ import annotations

from pathlib import Path

from cadist.errors import CheckpointError

MLFLOW_SCHEMES = ("runs:/", "models:/", "mlflow-artifacts:/")

#: model options a cadist export records (its job's `model` section) and the CLI can take from it
RECORDED = ("output_stride", "adaptive_mode", "edge_threshold", "trimap_width", "mask_variant",
            "gumbel_tau", "mask_sampling", "head")  # fmt: skip


def resolve_weights(spec: str | Path, tracking_uri: str | None = None) -> Path:
    """A local weights file for `spec` (see the module doc); MLflow URIs are read from
    `tracking_uri` (default: $MLFLOW_TRACKING_URI, else ./mlflow.db)."""
    text = str(spec)
    if text.startswith(MLFLOW_SCHEMES):
        from cadist.tracking.registry import download_artifact

        if text.startswith("runs:/") and "/" not in text.removeprefix("runs:/").strip("/"):
            text = text.rstrip("/") + "/checkpoints/best.pt"
        return resolve_weights(download_artifact(text, tracking_uri))
    from cadist.storage.fetch import local_copy
    from cadist.storage.uri import is_remote

    if is_remote(text):  # a weights file or a checkpoint folder on s3:// or gs://
        return local_copy(text, _scratch())
    p = Path(spec)
    if p.is_dir():
        for inside in ("model.pt", "data/model.pt"):  # a checkpoint folder; a registered model
            if (p / inside).is_file():
                return p / inside
        raise CheckpointError(
            f"{p}: a folder without model.pt; pass a weights file, a cadist checkpoint folder "
            f"(cadist_runs/<job>/step_…) or an MLflow URI (runs:/<run_id>/checkpoints/best.pt)"
        )
    return p


def _scratch() -> str:
    """A folder for weights fetched from object storage, removed when the process ends."""
    import atexit
    import shutil
    import tempfile

    d = tempfile.mkdtemp(prefix="cadist-weights-")
    atexit.register(shutil.rmtree, d, True)
    return d


def recorded_model(path: Path) -> tuple[str | None, dict]:
    """(model name, its recorded `model` section) of a cadist export; (None, {}) for other files."""
    from cadist.nets.weights import read_file

    obj = read_file(path)
    if not isinstance(obj, dict) or "cadist_format" not in obj:
        return None, {}
    if obj.get("model"):
        return obj["model"], dict(obj.get("model_config") or {})
    return _model_of_run(path)


def _model_of_run(path: Path) -> tuple[str | None, dict]:
    """A training checkpoint written before checkpoints recorded their model
    (`<storage>/<job>/step_…/model.pt`): the model section of the job its run resolved
    (`<storage>/.cadist/<job>.yaml`, which a resumed run cannot change)."""
    from cadist.config.jobfile import read_yaml
    from cadist.storage.store import Storage
    from cadist.storage.uri import job_key

    step_dir = path.parent
    if path.name != "model.pt" or not step_dir.name.startswith("step_"):
        return None, {}
    store, job = Storage(step_dir.parent.parent), job_key(step_dir.parent.name, "job")
    if not store.is_file(job):
        return None, {}
    model = read_yaml(job, "resolved job", "a job mapping", store).get("model") or {}
    return model.get("name"), dict(model)
