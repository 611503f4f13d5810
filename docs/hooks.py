"""MkDocs hooks: the pages generated from the code, so they cannot drift from it — the job and sweep
reference from the pydantic schema (each key's type, default, bounds and its docstring), and the
architecture from the packages' own docstrings."""

from __future__ import annotations

import ast
import typing
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[1]
#: the packages bottom to top: each may import those before it
LAYERS = ["storage", "config", "data", "models", "adaptive", "nets", "keypoints", "tracking",
          "results", "cluster", "eval", "train", "sweep", "submit", "cli"]  # fmt: skip


def _type(annotation) -> str:
    if typing.get_origin(annotation) is typing.Literal:
        return " \\| ".join(f"`{a!r}`" for a in typing.get_args(annotation))
    text = getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")
    return f"`{text}`".replace("|", "\\|")


def _bounds(field) -> str:
    out = []
    for m in field.metadata:
        for attr, sign in (("gt", ">"), ("ge", "≥"), ("lt", "<"), ("le", "≤")):
            if getattr(m, attr, None) is not None:
                out.append(f"{sign} {getattr(m, attr)}")
        if getattr(m, "pattern", None):
            out.append(f"matches `{m.pattern}`")
    return ", ".join(out)


def _default(field) -> str:
    if field.is_required():
        return "required"
    value = field.default if field.default_factory is None else field.default_factory()
    return f"`{value!r}`" if not hasattr(value, "model_fields") else ""


def _table(model, prefix: str) -> list[str]:
    lines = ["| key | type | default | bounds | what it does |", "|---|---|---|---|---|"]
    for name, field in model.model_fields.items():
        if hasattr(field.annotation, "model_fields"):
            continue
        doc = " ".join((field.description or "").split()).replace("|", "\\|")
        lines.append(f"| `{prefix}{name}` | {_type(field.annotation)} | {_default(field)} | "
                     f"{_bounds(field)} | {doc} |")  # fmt: skip
    return lines


def config_reference() -> str:
    from cadist.config.schema import JobConfig
    from cadist.sweep.spec import SweepConfig

    out = ["# Jobs and sweeps: the reference", "",
           "Generated from the schema in `cadist/config/schema.py` and `cadist/sweep/spec.py` (the "
           "docstrings under each field), so it always says what the code takes. A job file is YAML "
           "with these sections; `--set section.key=value` overrides any key, and `cadist config "
           "JOB --sources` prints every key with where it was set.", "",
           "## Top level", "", *_table(JobConfig, ""), ""]  # fmt: skip
    for name, field in JobConfig.model_fields.items():
        if hasattr(field.annotation, "model_fields"):
            doc = (field.annotation.__doc__ or "").strip().split("\n\n")[0]
            out += [
                f"## `{name}`",
                "",
                " ".join(doc.split()),
                "",
                *_table(field.annotation, f"{name}."),
                "",
            ]
    out += ["## Sweep files (`cadist tune`)", "", *_table(SweepConfig, ""), ""]
    return "\n".join(out)


def _doc(path: Path) -> str:
    tree = ast.parse(path.read_text())
    return " ".join((ast.get_docstring(tree) or "").split())


def architecture() -> str:
    pkg = ROOT / "cadist"
    loose = sorted(p.name for p in pkg.glob("*.py") if p.name not in ("__init__.py", "__main__.py"))
    out = ["# Architecture", "",
           "cadist's packages follow the data's way through the system, bottom to top: each imports "
           "only those above it in this list (checked by `tests/unit/test_layout.py`: no import "
           "cycle, no package importing one that imports it back). Generated from each package's "
           "docstring.", "",
           "| package | what it owns, and what it may import | modules |", "|---|---|---|"]  # fmt: skip
    for name in LAYERS:
        mods = sorted(p.stem for p in (pkg / name).glob("*.py") if p.name != "__init__.py")
        out.append(f"| `cadist/{name}/` | {_doc(pkg / name / '__init__.py')} | "
                   f"{', '.join(mods)} |")  # fmt: skip
    out += ["", "Loose modules, below every package or beside them:", ""]
    out += [f"- `cadist/{m}`: {_doc(pkg / m).split('. ')[0]}." for m in loose]
    return "\n".join(out) + "\n"


def on_files(files, config):
    files.append(File.generated(config, "reference/config.md", content=config_reference()))
    files.append(File.generated(config, "architecture.md", content=architecture()))
    return files
