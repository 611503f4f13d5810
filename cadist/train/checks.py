"""The checks a job passes on the driver before Ray starts (training and every sweep trial): its
shards, start weights and evaluation settings, with errors that name the key and the fix."""

from __future__ import annotations

from pathlib import Path

from cadist.config.schema import JobConfig
from cadist.data.stream import expand_shards
from cadist.errors import ConfigError, ShardError
from cadist.storage.fetch import http_fetch
from cadist.storage.store import Storage
from cadist.storage.uri import is_remote
from cadist.tracking.sources import MLFLOW_SCHEMES


def check_data(job: JobConfig, source: str) -> None:
    """Shards exist and suffice for ranks × loader workers — before any worker starts."""
    for key in ("train_shards", "val_shards"):
        spec = getattr(job.data, key)
        try:
            urls = expand_shards(spec)
        except ShardError as exn:
            raise ConfigError(f"{source}: data.{key}: {exn}") from None
        missing = missing_shards(urls)
        if missing:
            raise ConfigError(
                f"{source}: data.{key}: shard {missing[0]} does not exist "
                f"({len(missing)} of {len(urls)} missing); build shards with "
                f"`cadist shards build`"
            )
        readers = job.cluster.num_workers * max(1, job.data.num_workers)
        if key == "train_shards" and len(urls) < readers:
            raise ConfigError(
                f"{source}: data.train_shards: {len(urls)} shards for cluster.num_workers "
                f"{job.cluster.num_workers} × data.num_workers {job.data.num_workers} = {readers} "
                f"readers; rebuild with a smaller --samples-per-shard or lower data.num_workers"
            )


def missing_shards(urls: list[str]) -> list[str]:
    """The local and object-storage shards of `urls` that do not exist (one listing per folder
    on object storage; http(s) and pipe: sources are not checked here)."""
    local = [u for u in urls if "://" not in u and not u.startswith("pipe:")]
    missing = [u for u in local if not Path(u).is_file()]
    remote = [u for u in urls if is_remote(u)]
    folders: dict[str, set[str]] = {}
    for u in remote:
        parent, _, name = u.rpartition("/")
        if parent not in folders:
            folders[parent] = set(Storage(parent).list())
        if name not in folders[parent]:
            missing.append(u)
    return missing


def check_weights(job: JobConfig, source: str) -> None:
    """Weight files the job starts from exist — before any worker starts (MLflow URIs are checked
    when they are fetched)."""
    for key in ("backbone_weights", "weights"):
        spec = getattr(job.model, key)
        if spec and spec.startswith(("http://", "https://")):
            http_fetch(spec)  # answers (one byte), before any worker starts
            continue
        if not spec or spec.startswith(MLFLOW_SCHEMES) or ("://" in spec and not is_remote(spec)):
            continue
        if not (Storage(spec).is_file("") if is_remote(spec) else Path(spec).is_file()):
            raise ConfigError(
                f"{source}: model.{key}: {spec} does not exist; "
                + (
                    "put torchvision's ImageNet ResNet file there (e.g. resnet101-63fe2227.pth) "
                    "or set it to null for random initialisation"
                    if key == "backbone_weights"
                    else "give a weights file, a checkpoint folder's model.pt or an MLflow URI "
                    "(runs:/<run_id>)"
                )
            )


def check_eval(job: JobConfig, source: str) -> None:
    """A sliding-window evaluation (`eval.window`) suits the model: crop sides multiples of its
    input multiple — before any worker starts (else the first evaluation would fail). Scales need
    no check: each pass's size is rounded to the multiple."""
    tta = job.eval.augmentation()
    if tta is None or tta.window is None:
        return
    window, multiple = tta.window, input_multiple(job)
    if window.height % multiple or window.width % multiple:
        up = [-(-v // multiple) * multiple for v in (window.height, window.width)]
        raise ConfigError(
            f"{source}: eval.window {job.eval.window}: {job.model.name} takes inputs whose sides "
            f"are multiples of {multiple}; use e.g. eval.window={up[0]}x{up[1]}"
        )


def input_multiple(job: JobConfig) -> int:
    """The multiple the job's model needs its input sides to be (`cadist.eval.tta.size_multiple`)."""
    from cadist.eval.tta import input_multiple as of_model

    return of_model(job.model.build_kwargs())


def val_image_size(job: JobConfig) -> tuple[int, int] | None:
    """(H, W) of the first validation sample (its JSON record), or None if unreadable."""
    import json

    from cadist.data.stream import iter_raw_samples

    try:
        first = next(iter_raw_samples(expand_shards(job.data.val_shards)[0], job.data.allow_pipe))
        meta = json.loads(first["json"])
        return int(meta["height"]), int(meta["width"])
    except (StopIteration, ShardError, KeyError, ValueError):
        return None
