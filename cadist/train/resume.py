"""Rerunning a job of the same name: what a run resuming from its checkpoint may change, and setting
an earlier run aside (`cadist train --restart`, `cadist tune --restart`). No Ray here.

A resumed run continues the same MLflow run, whose params are those of its first start, so a rerun
that would train something else (another model, learning rate, crop, seed…) is refused before
anything starts; where and how it runs (workers, GPUs, intervals, accumulation, the iteration
count) may change, and the changes are printed and recorded on the MLflow run.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from cadist.errors import CheckpointError, ConfigError
from cadist.storage.store import Storage

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


def run_uri(storage: str | Path, job: str) -> str:
    """Ray Train's run folder of `job` under a storage root (a path or s3://… / gs://… URI)."""
    return Storage(storage).uri(job)


def latest_checkpoint(run_dir: str | Path) -> tuple[int, str] | None:
    """(step, URI) of the newest complete checkpoint (`step_<n>/` with weights and DeepSpeed state)
    that Ray Train registered in the run folder `run_dir` — the one a rerun resumes from (see
    `Storage.checkpoints`)."""
    parent, _, name = str(run_dir).rstrip("/").rpartition("/")
    return Storage(parent or ".").latest_checkpoint(name)


def zero_world(ckpt: Path) -> int | None:
    """Data-parallel ranks a checkpoint's ZeRO (stage 1/2) optimizer state is split over; None for
    stage 0 (the whole state in one file, loadable by any number of workers). Every rank writes
    its `rng_rank<r>.json`: a rank whose ZeRO file is missing is a CheckpointError naming it."""
    ranks = {int(m[1]) for p in (ckpt / "state").glob("*") if (m := _ZERO_FILE.match(p.name))}
    if not ranks:
        return None
    world = max(len(list(ckpt.glob("rng_rank*.json"))), max(ranks) + 1)
    missing = sorted(set(range(world)) - ranks)
    if missing:
        names = ", ".join(f"state/zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in missing)
        raise CheckpointError(
            f"{ckpt}: written by {world} ranks, but the ZeRO optimizer state of rank(s) "
            f"{', '.join(map(str, missing))} is missing ({names}); remove this checkpoint folder to "
            f"resume from the one before, or rerun with --restart to start over"
        )
    return world


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


def check_rerun(job: dict, before: dict | None, run_dir: str | Path, source: str) -> Rerun:
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
