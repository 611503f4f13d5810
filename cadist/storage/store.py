"""The storage path: everything cadist keeps on `cluster.storage_path` goes through this module.

A storage root is a local folder (absolute or relative, or `file://…`), `s3://bucket/prefix` or
`gs://bucket/prefix`. One filesystem layer serves them all: `pyarrow.fs`, the layer Ray Train and
Ray Tune write their own checkpoints and experiment state through, so cadist's files and Ray's sit
behind the same filesystem object (handed to Ray as `storage_filesystem`) with the same
credentials. Credentials and the endpoint come from the standard environment (`AWS_ACCESS_KEY_ID`,
`AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_PROFILE`, instance roles; `AWS_ENDPOINT_URL` or
`AWS_ENDPOINT_URL_S3` for an S3-compatible server, which pyarrow itself ignores and cadist passes
on; `GOOGLE_APPLICATION_CREDENTIALS` for GCS) and are never written, logged or put in a URI.

Writes are atomic on every backend: a local file is written under a temporary name and renamed;
an object is one PUT (a multipart upload becomes visible only when it completes). A checkpoint is
taken as the latest only once Ray Train has registered it (`checkpoint_manager_snapshot.json`, its
commit record), so a half-uploaded one never is.

Layout under the root (`cadist status` reads nothing else):
    <job>/step_<n>/                Ray Train's checkpoints (DeepSpeed state per rank, model.pt)
    sweep-<name>/                  Ray Tune's experiment
    .cadist/<job>.yaml …           cadist's files per job and sweep (`job_key`, `sweep_key`)
"""

from __future__ import annotations

import fnmatch
import json
import os
import posixpath
import time
import uuid
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
    "init-weights", "stop") for job `name`."""
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
        fix = (
            f"the bucket does not exist: create it (e.g. `aws s3 mb {_bucket(uri)}`) or fix the URI"
        )
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


def _bucket(uri: str) -> str:
    pr = urlparse(uri)
    return f"{pr.scheme}://{pr.netloc}"


class Storage:
    """A storage root and the verbs cadist needs on it, by key relative to the root ("a/b.json").

    `root` is the URI as given (local paths made absolute); `fs`/`base` the pyarrow filesystem and
    the root's path in it, which Ray gets too (`ray_storage`)."""

    def __init__(self, root: str | Path):
        root = str(root)
        self.fs, self.base = filesystem_for(root)
        self.remote = is_remote(root)
        self.root = root.rstrip("/") if self.remote else self.base

    def __repr__(self) -> str:
        return f"Storage({self.root!r})"

    # -- names ---------------------------------------------------------------------------------
    def path(self, key: str = "") -> str:
        """The key's path inside `fs`."""
        return posixpath.join(self.base, key) if key else self.base

    def uri(self, key: str = "") -> str:
        """The key as users see it: a local path, or s3://… / gs://…"""
        return posixpath.join(self.root, key) if key and self.remote else (
            str(Path(self.base) / key) if key else self.root
        )  # fmt: skip

    def uri_of(self, fs_path: str) -> str:
        """The URI of a path inside `fs` under the root (what Ray reports, without a scheme)."""
        rel = fs_path[len(self.base) :].lstrip("/") if fs_path.startswith(self.base) else None
        return self.uri(rel) if rel is not None else fs_path

    def ray_storage(self) -> tuple[str, object | None]:
        """(storage_path, storage_filesystem) for Ray Train's and Tune's RunConfig."""
        return (self.base, self.fs) if self.remote else (self.base, None)

    def check(self) -> None:
        """Fail early, with the fix, where the root cannot be used (missing bucket, refused
        credentials, endpoint down): before Ray starts."""
        if not self.remote:
            return
        bucket = self.base.split("/")[0]
        info = self._call("", "reach", self.fs.get_file_info, bucket)
        import pyarrow.fs as pafs

        if info.type == pafs.FileType.NotFound:
            raise StorageError(
                f"{self.root}: bucket {bucket} does not exist; create it (e.g. `aws s3 mb "
                f"{_bucket(self.root)}`) or fix cluster.storage_path"
            )
        self.list(META, limit=1)  # listing needs the read permission every command uses

    # -- reading -------------------------------------------------------------------------------
    def _call(self, key: str, doing: str, fn, *args):
        try:
            return fn(*args)
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.uri(key)}: no such file") from None
        except OSError as exn:
            if "not found" in str(exn).lower() and "bucket" not in str(exn).lower():
                raise FileNotFoundError(self.uri(key)) from None
            raise explain(exn, self.uri(key), doing) from None

    def read_bytes(self, key: str) -> bytes:
        """The object's bytes; FileNotFoundError where there is none."""

        def read():
            with self.fs.open_input_stream(self.path(key)) as f:
                return f.read()

        return self._call(key, "read", read)

    def read_text(self, key: str) -> str:
        return self.read_bytes(key).decode()

    def read_json(self, key: str, default=None):
        """Parsed JSON, or `default` where the file is missing or cut short."""
        try:
            return json.loads(self.read_bytes(key))
        except (FileNotFoundError, ValueError):
            return default

    def open_input(self, key: str, buffer_mib: int = 8):
        """A readable binary stream (streamed, not downloaded whole). On object storage reads
        go through a `buffer_mib` read-ahead buffer: unbuffered, every small read of a tar
        header would be a request of its own."""
        buffer = buffer_mib << 20 if self.remote else 0
        return self._call(key, "open", self.fs.open_input_stream, self.path(key), None, buffer)

    def info(self, key: str = ""):
        import pyarrow.fs as pafs

        return self._call(key, "look up", self.fs.get_file_info, self.path(key)), pafs.FileType

    def exists(self, key: str = "") -> bool:
        info, types = self.info(key)
        return info.type != types.NotFound

    def is_file(self, key: str) -> bool:
        info, types = self.info(key)
        return info.type == types.File

    def is_dir(self, key: str = "") -> bool:
        """A folder locally; on object storage, a prefix holding at least one object."""
        info, types = self.info(key)
        if info.type == types.Directory:
            return True
        return self.remote and info.type == types.NotFound and bool(self.list(key, limit=1))

    def size(self, key: str) -> int:
        return self.info(key)[0].size

    def list(self, key: str = "", pattern: str = "*", limit: int | None = None) -> list[str]:
        """Names of the entries right under `key` matching the glob `pattern`, sorted."""
        import pyarrow.fs as pafs

        sel = pafs.FileSelector(self.path(key), recursive=False, allow_not_found=True)
        try:
            infos = self._call(key, "list", self.fs.get_file_info, sel)
        except FileNotFoundError:
            return []
        names = sorted(posixpath.basename(i.path.rstrip("/")) for i in infos)
        out = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        return out[:limit] if limit else out

    def walk(self, key: str) -> list[str]:
        """Keys of every file under `key` (relative to the root), sorted."""
        import pyarrow.fs as pafs

        sel = pafs.FileSelector(self.path(key), recursive=True, allow_not_found=True)
        try:
            infos = self._call(key, "list", self.fs.get_file_info, sel)
        except FileNotFoundError:
            return []
        prefix = self.base.rstrip("/") + "/"
        return sorted(
            i.path[len(prefix):] for i in infos if i.type == pafs.FileType.File
        )  # fmt: skip

    # -- writing -------------------------------------------------------------------------------
    def write(self, key: str, data: bytes | str) -> str:
        """Write the whole file atomically (a temporary name then a rename; one PUT on object
        storage); returns its URI."""
        if isinstance(data, str):
            data = data.encode()
        path = self.path(key)

        def put():
            if self.remote:
                with self.fs.open_output_stream(path) as f:
                    f.write(data)
                return
            self.fs.create_dir(posixpath.dirname(path), recursive=True)
            tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
            with self.fs.open_output_stream(tmp) as f:
                f.write(data)
            os.replace(tmp, path)

        self._call(key, "write", put)
        return self.uri(key)

    def write_json(self, key: str, obj, indent: int | None = 1) -> str:
        return self.write(key, json.dumps(obj, indent=indent))

    def upload(self, local: str | Path, key: str) -> str:
        """Copy a local file to `key` (atomically, streamed); returns its URI."""
        import pyarrow.fs as pafs

        path = self.path(key)
        if not self.remote:
            self.fs.create_dir(posixpath.dirname(path), recursive=True)
        dest = path if self.remote else f"{path}.tmp-{uuid.uuid4().hex[:8]}"

        def copy():
            pafs.copy_files(str(Path(local).resolve()), dest, destination_filesystem=self.fs)
            if not self.remote:
                os.replace(dest, path)

        self._call(key, "upload to", copy)
        return self.uri(key)

    def download(self, key: str, local: str | Path) -> Path:
        """Copy file `key` to the local path `local` (written under a temporary name)."""
        import pyarrow.fs as pafs

        local = Path(local)
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(f"{local.name}.tmp-{uuid.uuid4().hex[:8]}")
        self._call(
            key,
            "download",
            lambda: pafs.copy_files(
                self.path(key), str(tmp), source_filesystem=self.fs,
                destination_filesystem=pafs.LocalFileSystem(),
            ),
        )  # fmt: skip
        os.replace(tmp, local)
        return local

    def delete(self, key: str) -> None:
        """Remove a file or a whole folder/prefix; nothing where there is none."""
        info, types = self.info(key)
        if info.type == types.File:
            self._call(key, "delete", self.fs.delete_file, self.path(key))
        elif info.type == types.Directory or (self.remote and self.walk(key)):
            self._call(key, "delete", self.fs.delete_dir, self.path(key))

    def move(self, key: str, dest: str) -> None:
        """Rename a file or folder (on object storage: copy every object, then delete)."""
        if not self.remote:
            os.replace(self.path(key), self.path(dest))
            return
        if self.is_file(key):
            self._call(key, "copy", self.fs.copy_file, self.path(key), self.path(dest))
        else:
            for k in self.walk(key):
                self._call(k, "copy", self.fs.copy_file, self.path(k),
                           self.path(dest + k[len(key):]))  # fmt: skip
        self.delete(key)

    def set_aside(self, keys: list[str]) -> list[str]:
        """Rename an earlier run's files out of the way (`<name>.before-<time>`; nothing is
        deleted); returns their new URIs."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        moved = []
        for key in keys:
            if self.exists(key) or self.is_dir(key):
                dest = f"{key}.before-{stamp}"
                self.move(key, dest)
                moved.append(self.uri(dest))
        return moved

    # -- the job layout ------------------------------------------------------------------------
    def jobs(self) -> list[str]:
        """Names of the jobs a driver resolved here (`.cadist/<name>.yaml`)."""
        return [n[: -len(".yaml")] for n in self.list(META, "*.yaml")]

    def sweeps(self) -> list[str]:
        """Names of the sweeps started here (`.cadist/sweep-<name>.state.json`)."""
        return [n[len("sweep-"): -len(".state.json")]
                for n in self.list(META, "sweep-*.state.json")]  # fmt: skip

    def checkpoints(self, job: str) -> list[tuple[int, str]]:
        """(step, key) of the job's complete checkpoint folders (`step_<n>/` with model.pt,
        DeepSpeed state and the manifest that commits them) that Ray Train registered — the ones a rerun may resume from. Without
        Ray Train's record there are none (Ray Train then starts the run over); with a record
        that cannot be read, every complete folder counts."""
        found = []
        for name in self.list(job, "step_*"):
            if not name[5:].isdigit():
                continue
            inside = set(self.list(f"{job}/{name}"))
            if {"model.pt", "state", "manifest.json"} <= inside:
                found.append((int(name[5:]), f"{job}/{name}"))
        if found and not self.exists(f"{job}/checkpoint_manager_snapshot.json"):
            return []  # Ray Train resumes from its record only: without one it starts over
        snapshot = self.read_json(f"{job}/checkpoint_manager_snapshot.json")
        try:
            registered = {r["checkpoint_dir_name"] for r in snapshot["checkpoint_results"]}
        except (TypeError, KeyError):  # unreadable: every complete folder counts
            registered = None
        if registered is not None:
            found = [(s, k) for s, k in found if posixpath.basename(k) in registered]
        return sorted(found)

    def latest_checkpoint(self, job: str) -> tuple[int, str] | None:
        """(step, URI) of the newest registered complete checkpoint of `job`, or None."""
        found = self.checkpoints(job)
        return (found[-1][0], self.uri(found[-1][1])) if found else None


def http_request(url: str, **headers):
    """A GET request for an http(s) URL; a URL's `user:password@` becomes a Basic auth header
    (urllib would take it for a host and port)."""
    import base64
    import urllib.request

    pr = urlparse(url)
    if "@" in pr.netloc:
        userinfo, host = pr.netloc.rsplit("@", 1)
        token = base64.b64encode(userinfo.encode()).decode()
        headers["Authorization"] = f"Basic {token}"
        url = pr._replace(netloc=host).geturl()
    return urllib.request.Request(url, headers=headers)


def http_fetch(url: str, dest: Path | None = None, timeout_s: float = 30.0) -> Path | None:
    """Download an http(s) URL to `dest` (temporary name, then renamed); with `dest` None only
    check that it answers (its first byte). A StorageError naming the URL, credentials shown as
    ***, where it cannot."""
    import shutil
    import urllib.error
    import urllib.request

    from cadist.redact import redact_text

    shown = redact_text(url)
    headers = {"Range": "bytes=0-0"} if dest is None else {}
    try:
        with urllib.request.urlopen(http_request(url, **headers), timeout=timeout_s) as r:
            if dest is None:
                return None
            part = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.part")
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                with open(part, "wb") as f:
                    shutil.copyfileobj(r, f, 1 << 20)
                part.replace(dest)
            finally:
                part.unlink(missing_ok=True)
            return dest
    except urllib.error.HTTPError as exn:
        raise StorageError(
            f"{shown}: the server answered HTTP {exn.code} ({exn.reason}); "
            + (
                "check the URL"
                if exn.code == 404
                else "check the URL and its credentials (a presigned URL expires)"
            )  # fmt: skip
        ) from None
    except (urllib.error.URLError, OSError, ValueError) as exn:
        reason = getattr(exn, "reason", exn)
        raise StorageError(f"{shown}: cannot download ({reason}); is the server up?") from None


def local_copy(uri: str, dest_dir: str | Path) -> Path:
    """A local file for `uri`: the path itself where it is local, else a download into
    `dest_dir` (a checkpoint folder on object storage: its model.pt; an http(s) URL)."""
    if str(uri).startswith(("http://", "https://")):
        name = posixpath.basename(urlparse(str(uri)).path) or "weights.pt"
        return http_fetch(str(uri), Path(dest_dir) / name)
    if not is_remote(uri):
        p = Path(urlparse(uri).path if str(uri).startswith("file://") else uri)
        return p / "model.pt" if (p / "model.pt").is_file() else p
    store = Storage(uri)
    info, types = store.info()
    if info.type == types.File:
        return store.download("", Path(dest_dir) / posixpath.basename(store.base))
    if store.is_file("model.pt"):
        return store.download("model.pt", Path(dest_dir) / "model.pt")
    raise StorageError(
        f"{uri}: no such file"
        + (" (a folder without model.pt)" if store.is_dir() else "")
        + "; pass a weights file or a cadist checkpoint folder (…/<job>/step_…)"
    )
