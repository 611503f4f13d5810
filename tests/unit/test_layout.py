"""The layout the architecture page promises: packages that import only those below them (no module
cycle, no two packages importing each other — static imports, inside functions too), at most four
loose modules, no module over 450 lines, each package saying in two lines what it owns, a README
read in minutes, and a docs site that builds with --strict."""

import ast
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "cadist"


def _modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        parts = list(p.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _imports() -> dict[str, set[str]]:
    """Module → the cadist modules it imports (module level and inside functions)."""
    mods = _modules()
    edges = defaultdict(set)
    for name, p in mods.items():
        for n in ast.walk(ast.parse(p.read_text())):
            targets = []
            if isinstance(n, ast.Import):
                targets = [a.name for a in n.names]
            elif isinstance(n, ast.ImportFrom) and n.module and n.level == 0:
                targets = [n.module] + [f"{n.module}.{a.name}" for a in n.names]
            edges[name] |= {t for t in targets if t in mods and t != name}
    return edges


def _cycle(edges) -> list[str] | None:
    state, stack = {}, []

    def visit(v):
        state[v] = 1
        stack.append(v)
        for w in sorted(edges.get(v, ())):
            if state.get(w) == 1:
                return stack[stack.index(w) :] + [w]
            if w not in state and (found := visit(w)):
                return found
        state[v] = 2
        stack.pop()
        return None

    for v in sorted(edges):
        if v not in state and (found := visit(v)):
            return found
    return None


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (PKG / parts[-1]).is_dir() else module


def test_no_import_cycle_and_packages_point_one_way():
    edges = _imports()
    assert _cycle(edges) is None, f"import cycle: {' → '.join(_cycle(edges))}"
    ties = defaultdict(set)
    for a, bs in edges.items():
        for b in bs:
            if len(a.split(".")) > 1 and len(b.split(".")) > 1 and _package(a) != _package(b):
                ties[_package(a)].add(_package(b))
    both = sorted({tuple(sorted((a, b))) for a in ties for b in ties[a] if a in ties.get(b, ())})
    assert both == [], f"packages importing each other: {both}"


def test_loose_modules_sizes_and_package_docstrings():
    loose = sorted(p.name for p in PKG.glob("*.py") if p.name not in ("__init__.py", "__main__.py"))
    assert len(loose) <= 4, loose
    long = {str(p.relative_to(ROOT)): n for p in PKG.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 450}  # fmt: skip
    assert long == {}, long
    for init in sorted(PKG.glob("*/__init__.py")):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and len(doc.splitlines()) == 2, f"{init}: say in two lines what it owns"
        assert "import" in doc.lower(), f"{init}: say what it may import"


def test_readme_is_short_and_keeps_the_ci_command():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 300
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci in readme  # the README's test command is what CI runs


@pytest.mark.skipif(shutil.which("mkdocs", path=str(Path(sys.executable).parent)) is None,
                    reason="mkdocs not installed (pip install -e '.[docs]')")  # fmt: skip
def test_docs_site_builds_strict(tmp_path):
    mkdocs = str(Path(sys.executable).parent / "mkdocs")
    r = subprocess.run([mkdocs, "build", "--strict", "--site-dir", str(tmp_path / "site")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    pages = list((tmp_path / "site").rglob("index.html"))
    assert len(pages) >= 6, pages
    ref = (tmp_path / "site" / "reference" / "config" / "index.html").read_text()
    # generated from the schema: a key, its default and its docstring
    assert "model.edge_threshold" in ref and "0.15" in ref and "edge threshold" in ref
    arch = (tmp_path / "site" / "architecture" / "index.html").read_text()
    assert "cadist/tracking/" in arch and "the only" in arch


#: where each heavy library may be imported (the style guide's rule, kept by this test)
ALLOWED = {
    "deepspeed": {"train/engine.py"},
    "mlflow": {"tracking/runs.py", "tracking/spool.py", "tracking/registry.py"},
    "webdataset": {"data/shards.py", "data/stream.py"},
    "ray": {"cluster/", "eval/on_cluster.py", "train/backend.py", "train/checkpoint.py",
            "train/driver.py", "train/worker.py", "sweep/tune.py", "submit/submission.py"},
}  # fmt: skip


def test_heavy_libraries_are_imported_where_the_architecture_says():
    found = defaultdict(set)
    for p in PKG.rglob("*.py"):
        rel = p.relative_to(PKG).as_posix()
        for n in ast.walk(ast.parse(p.read_text())):
            names = [a.name for a in n.names] if isinstance(n, ast.Import) else (
                [n.module] if isinstance(n, ast.ImportFrom) and n.module and n.level == 0 else [])  # fmt: skip
            for name in names:
                lib = name.split(".")[0]
                if lib in ALLOWED and not any(rel.startswith(a) for a in ALLOWED[lib]):
                    found[lib].add(rel)
    assert dict(found) == {}
