"""Sweep files: the format (a base job, fixed overrides, searched job keys with their domains, one
or two objectives), their validation against the job schema before anything runs, the job of one
trial, and the Pareto front of the results. No Ray here; `cadist.sweep.tune` runs sweeps on Ray Tune."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from cadist.config.jobfile import parse_overrides, read_yaml, validate_job
from cadist.config.schema import JobConfig
from cadist.errors import ConfigError

#: metrics a trial reports; macs/* and the mask statistics only for content-adaptive models
METRICS = {
    "val/miou": False,
    "val/pixel_accuracy": False,
    "val/mean_class_accuracy": False,
    "val/miou_inference": True,
    "val/high_res_fraction": True,
    "macs/backbone_gmac": True,
    "macs/backbone_gmac_computed": True,
    "macs/total_gmac": True,
}
DOMAINS = ("uniform", "loguniform", "choice", "randint", "quniform")


class SweepConfig(BaseModel):
    model_config = ConfigDict(
        extra="forbid", frozen=True, allow_inf_nan=False, use_attribute_docstrings=True
    )

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    """Sweep name: the Tune experiment, the MLflow parent run, and the prefix of the trials' jobs."""
    job: str
    """The base job file, relative to the sweep file."""
    set: dict[str, Any] = {}
    """Overrides applied to every trial (dotted job keys)."""
    search: dict[str, dict[str, list]]
    """Dotted job key → one domain: {uniform|loguniform: [low, high]}, {choice: [values…]},
    {randint: [low, high]} (both ends included), {quniform: [low, high, step]}."""
    objectives: dict[str, Literal["max", "min"]] = {"val/miou": "max"}
    """One or two reported metrics and their direction (two: a Pareto front)."""
    num_samples: int = Field(8, ge=1)
    """Trials in all (searcher grid: every combination of the `choice` values once, which is
    the default there)."""
    max_concurrent: int = Field(1, ge=1)
    """Trials running at once (each takes its job's cluster.num_workers × cpus_per_worker)."""
    searcher: Literal["optuna", "random", "grid"] = "optuna"
    """How trials' values are chosen: Optuna (Ray Tune's OptunaSearch; both objectives with two),
    random draws, or grid: every combination of the searched keys' `choice` values (Ray Tune's
    grid search)."""
    seed: int = 0
    """Seed of the searcher: the same sweep file draws the same values."""
    scheduler: Literal["fifo", "asha"] = "fifo"
    """fifo: every trial trains to the end. asha: Async Successive Halving — a trial whose objective
    at an evaluation trails the others' at the same step is stopped early (one objective only)."""
    grace_steps: int | None = Field(None, ge=1)
    """asha: steps every trial trains before it may be stopped; None: two evaluations
    (2 × the base job's eval.interval)."""
    reduction_factor: float = Field(3, gt=1)
    """asha: about 1/reduction_factor of the trials reaching each rung go on to the next."""

    @model_validator(mode="before")
    @classmethod
    def _grid_trials(cls, data):
        """searcher grid: every searched key a `choice`, num_samples = the combinations."""
        if not isinstance(data, dict) or data.get("searcher") != "grid":
            return data
        search = data.get("search") if isinstance(data.get("search"), dict) else {}
        combos = 1
        for key, dom in search.items():
            if not isinstance(dom, dict) or list(dom) != ["choice"] or not dom["choice"]:
                raise ValueError(
                    f"searcher grid: {key}: expected {{choice: [values…]}} (a grid takes each "
                    f"value), got {dom}; use searcher random or optuna for ranges"
                )
            combos *= len(dom["choice"])
        if data.get("num_samples", combos) != combos:
            raise ValueError(
                f"searcher grid: num_samples {data['num_samples']} but the grid has {combos} "
                f"combinations; drop num_samples (a grid runs each combination once)"
            )
        return {**data, "num_samples": combos}

    @model_validator(mode="after")
    def _asha_needs_one_objective(self) -> SweepConfig:
        if self.scheduler == "asha" and len(self.objectives) != 1:
            raise ValueError(
                "scheduler asha stops trials on one metric; name one objective (e.g. "
                "{val/miou: max}), or use scheduler fifo for a Pareto front of two"
            )
        return self

    @field_validator("search")
    @classmethod
    def _domains(cls, v: dict) -> dict:
        if not v:
            raise ValueError("empty: name at least one job key to search")
        for key, dom in v.items():
            if len(dom) != 1 or next(iter(dom)) not in DOMAINS:
                raise ValueError(f"{key}: expected one of {', '.join(DOMAINS)}, got {dom}")
            kind, args = next(iter(dom.items()))
            need = {"uniform": 2, "loguniform": 2, "randint": 2, "quniform": 3}.get(kind)
            if need and len(args) != need:
                raise ValueError(f"{key}: {kind} takes {need} numbers, got {args}")
            if kind == "choice" and not args:
                raise ValueError(f"{key}: choice needs at least one value")
            if kind == "loguniform" and not 0 < args[0] < args[1]:
                raise ValueError(f"{key}: loguniform needs 0 < low < high, got {args}")
        return v

    @field_validator("objectives")
    @classmethod
    def _objectives(cls, v: dict) -> dict:
        if not 1 <= len(v) <= 2:
            raise ValueError("name one or two objectives")
        for m in v:
            if m not in METRICS:
                raise ValueError(f"{m}: not a reported metric; choose from {', '.join(METRICS)}")
        return v


def _values(dom: dict[str, list]) -> list:
    """Representative values of a domain (both ends), to validate the key before any trial."""
    kind, args = next(iter(dom.items()))
    return list(args) if kind == "choice" else list(args[:2])


def load_sweep(path: str | Path, overrides: tuple[str, ...] = ()) -> tuple[SweepConfig, dict, str]:
    """(sweep, base job tree with the fixed overrides, base job path) — every searched key checked
    against the job schema with the ends of its domain; errors name the sweep file and key."""
    path = Path(path)
    tree = read_yaml(path, "sweep file", "a mapping (name, job, search, objectives, …)")
    for key, value in parse_overrides(overrides):
        if "." not in key:  # a top-level key of the sweep (num_samples=…, name=…)
            tree[key] = value
            continue
        job_key = key.removeprefix("set.")  # a job key fixed for every trial
        if job_key in (tree.get("search") or {}):
            raise ConfigError(
                f"{path}: --set {key}: {job_key} is searched by the sweep; fix it by removing it "
                f"from search, or narrow its domain there"
            )
        if not isinstance(tree.get("set") or {}, dict):
            raise ConfigError(f"{path}: set: expected a mapping of job keys to values")
        tree["set"] = {**(tree.get("set") or {}), job_key: value}
    try:
        sweep = SweepConfig.model_validate(tree)
    except ValidationError as exn:
        err = exn.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        where = f"{loc}: " if loc else ""
        raise ConfigError(f"{path}: {where}{err['msg'].removeprefix('Value error, ')}") from None
    job_path = (path.parent / sweep.job).resolve()
    if not job_path.is_file():
        raise ConfigError(f"{path}: job: {job_path} does not exist")
    base = read_yaml(job_path, "job file", "a mapping of sections (name, model, data, …)")
    fixed = json.loads(json.dumps(base))
    for key, value in sweep.set.items():
        _put(fixed, key, value)
    job = validate_job(json.loads(json.dumps(fixed)), f"{path}: set")
    for key, dom in sweep.search.items():
        for value in _values(dom):
            trial = json.loads(json.dumps(fixed))
            _put(trial, key, value)
            validate_job(trial, f"{path}: search.{key}: value {value!r} fails the job schema at")
    adaptive = job.model.name.startswith(("deeplabv3_batch_ap_", "deeplabv3_ad_"))
    for m in sweep.objectives:
        if METRICS[m] and not adaptive:
            raise ConfigError(
                f"{path}: objectives: {m} is reported only by content-adaptive models, and "
                f"{job.model.name} is dense; use val/miou or sweep an adaptive model"
            )
    return sweep, fixed, str(job_path)


def _put(tree: dict, dotted: str, value: Any) -> None:
    node = tree
    parts = dotted.split(".")
    for k in parts[:-1]:
        node = node.setdefault(k, {})
    node[parts[-1]] = value


def trial_job(fixed: dict, params: dict, name: str, source: str) -> JobConfig:
    tree = json.loads(json.dumps(fixed))
    for key, value in params.items():
        _put(tree, key, value)
    tree["name"] = name
    return validate_job(tree, source)
