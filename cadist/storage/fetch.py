"""Local copies of what a job names: a file or checkpoint folder on object storage, or an http(s) URL
(presigned, or with a user:password sent as Basic auth) downloaded under a temporary name."""

from __future__ import annotations

import posixpath
import uuid
from pathlib import Path
from urllib.parse import urlparse

from cadist.storage.store import Storage
from cadist.storage.uri import StorageError, is_remote


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
