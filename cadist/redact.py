"""Credentials never leave memory: what cadist writes or shows of a job value passes through here.

A run uses the real value; MLflow params and artifacts, the files on the storage path, logs and
command output get it with `***` for: the userinfo of a URL (`https://user:pass@host` →
`https://***@host`), presigned-URL credentials and signatures (`X-Amz-Credential`,
`X-Amz-Signature`, `X-Goog-Signature`, SAS `sig`, …), and every value of a key that names a token,
secret, password or key. Standard library only.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import parse_qsl, urlsplit, urlunsplit

MASK = "***"
#: a mapping key whose value is a credential (`api_key`, `AWS_SECRET_ACCESS_KEY`, `token`, …)
SECRET_KEY = re.compile(
    r"(?i)(token|secret|passw(or)?d|passphrase|credential|api[_-]?key|access[_-]?key|"
    r"private[_-]?key|auth|signature|^key$|[_-]key$)"
)
#: query parameters that carry a presigned URL's credential or signature
SECRET_QUERY = re.compile(
    r"(?i)^(x-amz-(credential|signature|security-token)|x-goog-(credential|signature)|"
    r"signature|awsaccesskeyid|sig|se?token|access_token|token|key|api[_-]?key|password)$"
)
_URL = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"<>]+")


def _url(url: str) -> str:
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{MASK}@{netloc.rsplit('@', 1)[1]}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(SECRET_QUERY.match(k) for k, _ in pairs):
            query = "&".join(f"{k}={MASK if SECRET_QUERY.match(k) else v}" for k, v in pairs)
    if (netloc, query) == (parts.netloc, parts.query):
        return url
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def redact_text(text: str) -> str:
    """`text` with the credentials of every URL in it shown as ***."""
    return _URL.sub(lambda m: _url(m.group(0)), text) if "://" in text else text


def redact(value: Any, key: str = "") -> Any:
    """A copy of a value (str, number, list, mapping, nested) fit to be written or shown."""
    if isinstance(value, dict):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v, key) for v in value)
    if key and SECRET_KEY.search(key.rsplit(".", 1)[-1]) and value not in (None, "", False):
        return MASK
    if isinstance(value, str):
        return redact_text(value)
    return value


def has_secret(value: Any, key: str = "") -> list[str]:
    """The dotted keys of a (nested) value that hold a credential."""
    if isinstance(value, dict):
        return [k2 for k, v in value.items() for k2 in has_secret(v, f"{key}.{k}" if key else k)]
    if isinstance(value, (list, tuple)):
        return [k for v in value for k in has_secret(v, key)][:1]
    return [key] if redact(value, key) != value else []
