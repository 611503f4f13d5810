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
from pathlib import Path

from cadist.storage.uri import META, StorageError, bucket_of, explain, filesystem_for, is_remote


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
                f"{bucket_of(self.root)}`) or fix cluster.storage_path"
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
