"""Storage roots and their filesystems: which URIs are a storage root (a folder, file://, s3://,
gs://), the pyarrow filesystem for one (endpoint, region, retries from the environment, never
credentials), the job and sweep file names under `.cadist/`, and one clear error for a failed call."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlparse

from cadist.errors import CadistError

REMOTE_SCHEMES = ("s3", "gs")


#: cadist's files for a job, beside Ray's run folder `<root>/<job>/`: in `<root>/.cadist/`
META = ".cadist"


_JOB_SUFFIX = {
    "job": ".yaml",  # the job as its last start resolved it
    "mlflow": ".mlflow.json",  # its MLflow run (run id, tracking URI)
    "spool": ".mlflow-spool",  # records waiting for a tracking server, one folder per run
    "init-weights": ".init-weights.pt",  # model.weights fetched from MLflow
    "stop": ".stop.json",  # `cadist stop`: checkpoint at the next progress report and end
    "progress": ".progress.json",  # rank 0's latest progress and heartbeat (cadist.progress)
    "log": ".log",  # the driver's log (`cadist logs JOB`)
}


#: a sweep's files in `<root>/.cadist/`, beside Tune's experiment folder `<root>/sweep-<name>/`
_SWEEP_SUFFIX = {
    "state": ".state.json",  # the settings it started with (a rerun with others is refused)
    "mlflow": ".mlflow.json",  # its parent MLflow run
    "results": ".results.json",  # written when it ends (or stops on request)
    "pareto": ".pareto.png",  # the trade-off figure, for two objectives
    "stop": ".stop.json",  # `cadist stop SWEEP`: trials checkpoint and end, none starts
}


class StorageError(CadistError):
    """The storage path (or a shard URL on object storage) cannot be used: unknown scheme, missing
    bucket, no or wrong credentials, access denied, endpoint down."""


def job_key(name: str, kind: str) -> str:
    """Key (relative to the root) of cadist's file `kind` ("job", "mlflow", "spool",
    "init-weights", "stop", "progress", "log") for job `name`."""
    return f"{META}/{name}{_JOB_SUFFIX[kind]}"


def sweep_key(name: str, kind: str) -> str:
    """Key of cadist's file `kind` ("state", "mlflow", "results", "pareto", "stop") for sweep
    `name`."""
    return f"{META}/sweep-{name}{_SWEEP_SUFFIX[kind]}"


def is_remote(uri: str | Path) -> bool:
    return urlparse(str(uri)).scheme in REMOTE_SCHEMES


def check_uri(uri: str) -> None:
    """A storage root or object URI cadist can use; a StorageError naming it and the fix if not."""
    pr = urlparse(uri)
    if "://" not in uri or pr.scheme == "file":
        return
    if pr.scheme not in REMOTE_SCHEMES:
        raise StorageError(
            f"{uri}: unknown storage scheme {pr.scheme!r}; use a local folder, file://, "
            f"s3://bucket/prefix or gs://bucket/prefix"
        )
    if not pr.netloc:
        raise StorageError(f"{uri}: no bucket; write {pr.scheme}://BUCKET/prefix")
    if pr.username or pr.password or "@" in pr.netloc:
        raise StorageError(
            f"{pr.scheme}://…@{pr.hostname}: credentials do not go in the URI (cadist stores and "
            f"logs it); set them in the environment ("
            + (
                "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"
                if pr.scheme == "s3"
                else "GOOGLE_APPLICATION_CREDENTIALS"
            )  # fmt: skip
            + ")"
        )


def s3_endpoint() -> str | None:
    """The S3 endpoint of the environment: `AWS_ENDPOINT_URL_S3`, else `AWS_ENDPOINT_URL`."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


#: where the object storage is and how long to retry it (no secrets): passed from the driver to
#: its workers and trials, whose nodes may have been started without them; credentials stay each
#: node's own
LOCATION_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION",
                "CADIST_STORAGE_RETRIES", "CADIST_STORAGE_TIMEOUT_S")  # fmt: skip


def location_env() -> dict[str, str]:
    """The storage location settings of this process's environment (`LOCATION_ENV`)."""
    return {k: os.environ[k] for k in LOCATION_ENV if os.environ.get(k)}


def adopt_location_env(env: dict[str, str] | None) -> None:
    """Take the driver's storage location settings where this process has none."""
    for k, v in (env or {}).items():
        if k in LOCATION_ENV:
            os.environ.setdefault(k, v)


def _filesystem(scheme: str, endpoint: str | None, region: str | None):
    retries = int(os.environ.get("CADIST_STORAGE_RETRIES", "6"))
    timeout = float(os.environ.get("CADIST_STORAGE_TIMEOUT_S", "10"))
    return _made(scheme, endpoint, region, retries, timeout)


def forget_filesystems() -> None:
    """Drop the filesystems made so far: the next use reads the credentials again."""
    _made.cache_clear()


@lru_cache(maxsize=8)
def _made(scheme: str, endpoint: str | None, region: str | None, retries: int, timeout: float):
    """One filesystem per setting (the AWS SDK reads the credentials when it is made)."""
    import pyarrow.fs as pafs

    if scheme == "s3":
        kw = {"region": region or "us-east-1"}
        if endpoint:
            kw |= {"endpoint_override": endpoint, "scheme": urlparse(endpoint).scheme or "https"}
            # path-style addressing: what S3-compatible servers (MinIO, SeaweedFS, moto) serve
            kw["force_virtual_addressing"] = False
        return pafs.S3FileSystem(
            **kw,
            connect_timeout=timeout,
            request_timeout=timeout * 6,
            retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=retries),
        )
    if scheme == "gs":
        return pafs.GcsFileSystem(retry_time_limit_s=60.0)
    return pafs.LocalFileSystem()


def filesystem_for(uri: str):
    """(pyarrow filesystem, path inside it) for a local path, file://, s3:// or gs:// URI."""
    check_uri(uri)
    pr = urlparse(uri)
    if pr.scheme in REMOTE_SCHEMES:
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        endpoint = s3_endpoint() if pr.scheme == "s3" else None
        fs = _filesystem(pr.scheme, endpoint, region if pr.scheme == "s3" else None)
        return fs, f"{pr.netloc}{pr.path}".rstrip("/")
    path = pr.path if pr.scheme == "file" else uri
    return _filesystem("file", None, None), str(Path(path).resolve())


def explain(exn: BaseException, uri: str, doing: str) -> StorageError:
    """One clear error for a failed storage call: what, where (the URI) and the fix."""
    text = str(exn)
    up = text.upper()
    scheme = urlparse(uri).scheme
    if scheme == "gs":
        creds = "set GOOGLE_APPLICATION_CREDENTIALS to a service-account key file"
    else:
        creds = "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, an instance role)"
    if "NO_SUCH_BUCKET" in up or "BUCKET DOES NOT EXIST" in up or "NOSUCHBUCKET" in up:
        fix = f"the bucket does not exist: create it (e.g. `aws s3 mb {bucket_of(uri)}`) or fix the URI"
    elif any(c in up for c in ("INVALID_ACCESS_KEY", "INVALIDACCESSKEY", "SIGNATURE", "EXPIRED",
                               "INVALIDTOKEN", "INVALID_TOKEN", "CREDENTIAL")):  # fmt: skip
        fix = f"the credentials were refused: {creds}"
    elif "ACCESS_DENIED" in up or "ACCESSDENIED" in up or "FORBIDDEN" in up or "403" in text:
        missing = scheme == "s3" and not any(
            os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_PROFILE",
                                        "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_FULL_URI")
        )  # fmt: skip
        fix = (
            f"access denied, and no credentials in the environment: {creds}"
            if missing
            else "access denied: these credentials are refused or may not use this bucket; check "
            "the key pair (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY) and grant it read and write "
            "on the bucket"
        )
    elif (
        "NETWORK_CONNECTION" in up
        or "COULDN'T CONNECT" in up
        or "RESOLVE HOST" in up
        or ("CURL" in up)
    ):
        where = s3_endpoint() if scheme == "s3" else None
        fix = (
            f"the storage endpoint{' ' + where if where else ''} does not answer (retried with "
            f"backoff); check the network or AWS_ENDPOINT_URL, then rerun: training resumes from "
            f"its last checkpoint"
        )
    else:
        fix = f"{type(exn).__name__}: {text.splitlines()[0][:200] if text else ''}"
    return StorageError(f"{uri}: cannot {doing} ({fix})")


def bucket_of(uri: str) -> str:
    pr = urlparse(uri)
    return f"{pr.scheme}://{pr.netloc}"
