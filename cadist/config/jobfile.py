"""Job files: a YAML job read with `--set key=value` overrides applied, validated into a `JobConfig`
(one error naming the file and key), where each key was set, and the job written back as YAML."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from cadist.config.schema import JobConfig
from cadist.errors import ConfigError
from cadist.redact import redact


def _set(tree: dict, dotted: str, value: Any, source: str) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        if not isinstance(node.setdefault(k, {}), dict):
            raise ConfigError(f"{source}: --set {dotted}: {k} is not a section")
        node = node[k]
    node[keys[-1]] = value


def parse_overrides(overrides: list[str] | tuple[str, ...]) -> list[tuple[str, Any]]:
    """["train.iterations=100", …] → [("train.iterations", 100), …] (values parsed as YAML)."""
    out = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(
                f"--set {item!r}: expected KEY=VALUE, e.g. --set train.iterations=1000"
            )
        out.append((key.strip(), yaml.safe_load(raw) if raw.strip() else None))
    return out


def load_job(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> JobConfig:
    """Read, override and validate a job file; `ConfigError` names file, key, value and the fix."""
    path = Path(path)
    tree = read_yaml(path, "job file", "a mapping of sections (name, model, data, …)")
    for key, value in parse_overrides(overrides):
        _set(tree, key, value, str(path))
    return validate_job(tree, str(path))


def job_sources(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, str]:
    """For each key the job file or an override sets: where — the file, or "--set"."""
    tree = read_yaml(Path(path), "job file", "a mapping of sections (name, model, data, …)")
    sources = dict.fromkeys(_leaves(tree), str(path))
    for key, _value in parse_overrides(overrides):
        for k in [k for k in sources if k == key or k.startswith(f"{key}.")]:
            del sources[k]
        sources[key] = "--set"
    return sources


def _leaves(tree: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in tree.items():
        out += _leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else [f"{prefix}{k}"]
    return out


def job_yaml(job: JobConfig, sources: dict[str, str] | None = None) -> str:
    """The job as YAML, every key (defaults included); with `sources` (`job_sources`), each key's
    line ends with a comment saying where it was set (`# default` where nowhere)."""
    if sources is None:
        return job.to_yaml()
    lines: list[str] = []

    def walk(tree: dict, prefix: str, pad: str) -> None:
        for k, v in tree.items():
            dotted = f"{prefix}{k}"
            if isinstance(v, dict) and v:
                lines.append(f"{pad}{k}:")
                walk(v, f"{dotted}.", pad + "  ")
                continue
            text = yaml.safe_dump(v, default_flow_style=True, width=1 << 20, allow_unicode=True)
            text = text.rstrip("\n").removesuffix("\n...")  # a scalar document's end marker
            lines.append(f"{pad}{k}: {text}  # {sources.get(dotted, 'default')}")

    walk(redact(job.model_dump()), "", "")
    return "\n".join(lines) + "\n"


def read_yaml(path: Path | str, what: str, expected: str, store=None) -> dict:
    """A YAML mapping from `path` (a key of the storage path `store`, a `cadist.storage.store.Storage`,
    where given); `ConfigError` naming the file otherwise."""
    if store is not None:
        key, path = path, store.uri(str(path))
    try:
        tree = yaml.safe_load(store.read_text(key) if store is not None else path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such {what}") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: a folder, not a {what}; pass the YAML file") from None
    except UnicodeDecodeError as exn:
        raise ConfigError(
            f"{path}: not UTF-8 text (byte {exn.object[exn.start]:#04x} at offset {exn.start}); "
            f"a {what} is YAML in UTF-8 — save it as UTF-8"
        ) from None
    except yaml.YAMLError as exn:
        raise ConfigError(f"{path}: not valid YAML ({str(exn).splitlines()[0]})") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: expected {expected}")
    return tree


def validate_job(tree: dict, source: str) -> JobConfig:
    try:
        return JobConfig.model_validate(tree)
    except ValidationError as exn:
        err = exn.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        where = f"{source}: {loc}" if loc else source
        if err["type"] == "extra_forbidden":
            parent = _section_of(err["loc"][:-1])
            allowed = ", ".join(parent.model_fields) if parent else "?"
            raise ConfigError(f"{where}: unknown key; allowed here: {allowed}") from None
        msg = err["msg"].removeprefix("Value error, ")
        got = f" (got {err['input']!r})" if err["type"] not in ("missing", "value_error") else ""
        raise ConfigError(f"{where}: {msg}{got}") from None


def _section_of(loc: tuple) -> type[BaseModel] | None:
    cls: type[BaseModel] = JobConfig
    for part in loc:
        field = cls.model_fields.get(str(part))
        if (
            field is None
            or not isinstance(field.annotation, type)
            or not issubclass(field.annotation, BaseModel)
        ):
            return None
        cls = field.annotation
    return cls
