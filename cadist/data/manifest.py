"""Shard manifests once written: reading one (a path, s3:// / gs:// URI or http(s) URL) with errors
that name it, and checking every shard it lists against its sha256."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from cadist.data.shards import MANIFEST_VERSION
from cadist.errors import ShardError


def read_manifest(path: str | Path) -> dict:
    """A shard manifest (a local path, an s3:// / gs:// URI or an http(s):// URL); ShardError
    naming it otherwise."""
    from cadist.storage.store import Storage
    from cadist.storage.uri import StorageError

    try:
        if str(path).startswith(("http://", "https://")):
            m = json.loads(_http_get(str(path)))
        else:  # a path, file://, s3://, gs://: the storage layer reads them all
            m = json.loads(Storage(str(path)).read_bytes(""))
    except StorageError as exn:
        raise ShardError(str(exn)) from None
    except FileNotFoundError:
        raise ShardError(
            f"{path}: no such manifest; build shards with `cadist shards build`"
        ) from None
    except ValueError as exn:  # JSONDecodeError, UnicodeDecodeError
        raise ShardError(
            f"{path}: not valid JSON ({str(exn)[:200]}); rebuild with `cadist shards build "
            f"--overwrite`"
        ) from None
    if not isinstance(m, dict):
        raise ShardError(f"{path}: not a cadist shard manifest (a JSON {type(m).__name__})")
    if m.get("manifest_version") != MANIFEST_VERSION or "shards" not in m:
        raise ShardError(
            f"{path}: not a cadist shard manifest (version {m.get('manifest_version')!r}, "
            f"expected {MANIFEST_VERSION})"
        )
    return m


def _http_get(url: str) -> bytes:
    """The body at `url`; FileNotFoundError for a 404, ShardError when nothing answers."""
    import urllib.error
    import urllib.request

    from cadist.storage.fetch import http_request

    try:
        with urllib.request.urlopen(http_request(url), timeout=60) as r:
            return r.read()
    except urllib.error.HTTPError as exn:
        if exn.code == 404:
            raise FileNotFoundError(url) from None
        raise ShardError(f"{url}: the server answered HTTP {exn.code} ({exn.reason})") from None
    except (urllib.error.URLError, OSError) as exn:
        reason = getattr(exn, "reason", exn)
        raise ShardError(f"{url}: cannot reach the server ({reason}); is it up?") from None


def verify_shards(manifest_file: str | Path) -> list[str]:
    """Check every shard listed in a manifest (local or on object storage, streamed) against its
    sha256. Returns the problems found."""
    from cadist.storage.store import Storage

    m = read_manifest(manifest_file)
    parent = str(manifest_file).rpartition("/")[0] or "."
    problems = []
    if parent.startswith(("http://", "https://")):
        import io

        for e in m["shards"]:
            p = f"{parent}/{e['name']}"
            try:
                body = _http_get(p)
            except FileNotFoundError:
                problems.append(f"{p}: missing")
                continue
            if _sha256_stream(io.BytesIO(body)) != e["sha256"]:
                problems.append(f"{p}: sha256 differs from the manifest (corrupt or replaced)")
        return problems
    folder = Storage(parent)
    for e in m["shards"]:
        p = folder.uri(e["name"])
        if not folder.is_file(e["name"]):
            problems.append(f"{p}: missing")
        elif _sha256_stream(folder.open_input(e["name"])) != e["sha256"]:
            problems.append(f"{p}: sha256 differs from the manifest (corrupt or replaced)")
    return problems


def _sha256_stream(f) -> str:
    h = hashlib.sha256()
    with f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
