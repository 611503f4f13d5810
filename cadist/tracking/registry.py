"""MLflow artifacts and the model registry: fetching a run's or a registered model's files, and
registering a run's best weights as an MLflow pyfunc model (`cadist.serving` its loader)."""

from __future__ import annotations

from pathlib import Path

from cadist.tracking.runs import check_reachable, resolve_uri


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
        code_paths=[str(Path(__file__).resolve().parents[1])],  # the cadist package
        signature=ModelSignature(
            inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, 3))]),
            outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1))]),
        ),
        pip_requirements=requirements,
    )
