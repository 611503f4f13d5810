"""Rerunning a job of the same name: what a run resuming from its checkpoint may change, and setting
an earlier run aside (`cadist train --restart`, `cadist tune --restart`). No Ray here.

A resumed run continues the same MLflow run, whose params are those of its first start, so a rerun
that would train something else (another model, learning rate, crop, seed…) is refused before
anything starts; where and how it runs (workers, GPUs, intervals, accumulation, the iteration
count) may change, and the changes are printed and recorded on the MLflow run.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from cadist.errors import ConfigError

#: job keys (or key prefixes, ending in ".") a resumed run may change
RESUMABLE = (
    "cluster.",
    "data.train_shards",
    "data.val_shards",
    "data.num_workers",
    "data.skip_bad",
    "data.allow_pipe",
    "train.iterations",
    "train.log_every",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "eval.",
    "deepspeed.bf16",
    "deepspeed.gradient_accumulation_steps",
    "mlflow.",
)
_ZERO_FILE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_\d+_optim_states\.pt$")


#: cadist's files for a job, beside Ray's run folder `<storage>/<job>/`: in `<storage>/.cadist/`
META = ".cadist"
_SUFFIX = {
    "job": ".yaml",  # the job as its last start resolved it
    "mlflow": ".mlflow.json",  # its MLflow run (run id, tracking URI)
    "spool": ".mlflow-spool",  # records waiting for a tracking server, one folder per run
    "init-weights": ".init-weights.pt",  # model.weights fetched from MLflow
    "stop": ".stop.json",  # `cadist stop`: checkpoint at the next progress report and end
}


def job_file(storage: str | Path, name: str, kind: str) -> Path:
    """Where cadist keeps file `kind` ("job", "mlflow", "spool", "init-weights", "stop") of job
    `name`."""
    return Path(storage) / META / f"{name}{_SUFFIX[kind]}"


#: a sweep's files in `<storage>/.cadist/`, beside Tune's experiment folder `<storage>/sweep-<name>/`
_SWEEP_SUFFIX = {
    "state": ".state.json",  # the settings it started with (a rerun with others is refused)
    "mlflow": ".mlflow.json",  # its parent MLflow run
    "results": ".results.json",  # written when it ends (or stops on request)
    "pareto": ".pareto.png",  # the trade-off figure, for two objectives
    "stop": ".stop.json",  # `cadist stop SWEEP`: trials checkpoint and end, none starts
}


def sweep_file(storage: str | Path, name: str, kind: str) -> Path:
    """Where cadist keeps file `kind` ("state", "mlflow", "results", "pareto", "stop") of sweep
    `name`."""
    return Path(storage) / META / f"sweep-{name}{_SWEEP_SUFFIX[kind]}"


def changed_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts (either side may lack them)."""
    keys = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += changed_keys(a, b, f"{prefix}{k}.")
        elif a != b:
            keys.append(f"{prefix}{k}")
    return keys


def set_aside(paths: list[Path]) -> list[Path]:
    """Rename an earlier run's files out of the way (`<name>.before-<time>`; nothing is deleted)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    moved = []
    for p in paths:
        if p.exists():
            dest = p.with_name(f"{p.name}.before-{stamp}")
            os.replace(p, dest)
            moved.append(dest)
    return moved


def latest_checkpoint(run_dir: Path) -> tuple[int, Path] | None:
    """The newest complete cadist checkpoint (`step_<n>/` with weights and DeepSpeed state) that
    Ray Train registered — the one a rerun resumes from. A worker writes the folder before Ray
    Train registers it, so a crash can leave a newer, complete but unregistered one behind (and a
    rerun overwrites it); without Ray Train's record (`checkpoint_manager_snapshot.json`) every
    complete folder counts."""
    found = [
        (int(p.name[5:]), p)
        for p in run_dir.glob("step_*")
        if p.name[5:].isdigit() and (p / "model.pt").is_file() and (p / "state").is_dir()
    ]
    registered = _registered(run_dir)
    if registered is not None:
        found = [(step, p) for step, p in found if p.name in registered]
    return max(found) if found else None


def _registered(run_dir: Path) -> set[str] | None:
    """The checkpoint folders Ray Train's checkpoint manager holds for the run (its snapshot,
    rewritten whenever one is registered), or None where there is none or it cannot be read."""
    try:
        snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
        return {r["checkpoint_dir_name"] for r in snapshot["checkpoint_results"]}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def zero_world(ckpt: Path) -> int | None:
    """Data-parallel ranks a checkpoint's ZeRO (stage 1/2) optimizer state is split over; None for
    stage 0 (the whole state in one file, loadable by any number of workers)."""
    ranks = {int(m[1]) for p in (ckpt / "state").glob("*") if (m := _ZERO_FILE.match(p.name))}
    return len(ranks) or None


def _value(tree: dict, key: str):
    for part in key.split("."):
        tree = tree.get(part, {}) if isinstance(tree, dict) else {}
    return tree if tree != {} else None


@dataclass
class Rerun:
    """What a (re)start of a job will do: `step` of the checkpoint it resumes from (None: starts
    at step 0) and the changed job keys as (key, before, now)."""

    step: int | None = None
    changes: list[tuple[str, object, object]] = field(default_factory=list)

    def describe(self) -> str:
        return ", ".join(f"{k} {a} → {b}" for k, a, b in self.changes)


def check_rerun(job: dict, before: dict | None, run_dir: Path, source: str) -> Rerun:
    """Compare a job (resolved, as a dict) with the one its earlier start wrote (`before`; None on
    a first start). Raises ConfigError for a resume that changes what is trained. Another number
    of workers is a change like any other: ZeRO 1/2 optimizer state is re-split on loading
    (`engine.load_resharded`)."""
    latest = latest_checkpoint(run_dir)
    if before is None:
        return Rerun(step=latest[0] if latest else None)
    changes = [(k, _value(before, k), _value(job, k)) for k in changed_keys(before, job)]
    if latest is None:  # nothing to resume: the job starts over with its new settings
        return Rerun(changes=changes)
    step, ckpt = latest
    name = job.get("name")
    fixed = [(k, a, b) for k, a, b in changes if not k.startswith(RESUMABLE)]
    if fixed:
        listed = ", ".join(f"{k} {a} → {b}" for k, a, b in fixed[:6])
        raise ConfigError(
            f"{source}: job {name} would resume from its checkpoint at step {step} ({ckpt}), "
            f"which was trained with other settings ({listed}); a resumed run cannot change "
            f"these: undo them to resume, give the job a new name, or pass --restart to start "
            f"over (the earlier run is kept aside)"
        )
    return Rerun(step=step, changes=changes)
