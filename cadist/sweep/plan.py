"""`cadist tune --dry-run`: a sweep checked as a real start would check it, and what it would run."""

from __future__ import annotations

import json
from pathlib import Path

from cadist.cluster.paths import absolute_paths
from cadist.cluster.ray import check_resources, describe_nodes
from cadist.storage.store import Storage
from cadist.train.checks import check_data, check_eval, check_weights
from cadist.train.plan import (
    eval_text,
    macs_text,
    plan_epochs,
    plan_evaluation,
    plan_macs,
    plan_nodes,
    plan_shards,
    plural,
)


def plan_sweep(
    path: str | Path,
    overrides: tuple[str, ...] = (),
    address: str | None = None,
    restart: bool = False,
) -> dict:
    """`cadist tune --dry-run`: the sweep's checks (its file, every searched value against the job
    schema, shards, weights, a changed sweep's refusal, the tracking server, whether one trial
    fits) and what it would run — trials, searched domains, objectives, trials at once, each
    trial's batch and GMac — with nothing started or written."""
    from cadist.cluster.ray import trial_slots
    from cadist.config.jobfile import validate_job
    from cadist.sweep.spec import load_sweep
    from cadist.sweep.tune import would_resume

    source = str(path)
    sweep, fixed, job_path = load_sweep(path, overrides)
    base = absolute_paths(validate_job(json.loads(json.dumps(fixed)), source))
    check_data(base, source)
    check_weights(base, source)
    check_eval(base, source)
    store = Storage(base.cluster.storage_path)
    store.check()
    fixed = json.loads(json.dumps(base.model_dump()))
    resumes = not restart and would_resume(store, sweep, fixed, source)
    mlflow = None
    if base.mlflow.enabled:
        from cadist.tracking.runs import check_reachable, resolve_uri

        uri = resolve_uri(base.mlflow.tracking_uri)
        check_reachable(uri)
        mlflow = {"tracking_uri": uri, "experiment": base.mlflow.experiment}
    nodes, where = plan_nodes(base, address, source)
    warning = check_resources(base, source, nodes)  # one trial must fit
    images = plan_shards(base.data.train_shards)["samples"]
    return {
        "sweep": sweep.name,
        "source": source,
        "job": str(job_path),
        "trials": sweep.num_samples,
        "search": sweep.search,
        "fixed": sweep.set,
        "objectives": sweep.objectives,
        "searcher": sweep.searcher,
        "seed": sweep.seed,
        "scheduler": sweep.scheduler,
        "resumes": resumes,
        "at_once": trial_slots(base, nodes, sweep.max_concurrent),
        "max_concurrent": sweep.max_concurrent,
        "cluster": {"where": where, "holds": describe_nodes(nodes), "warning": warning},
        "trial": {
            "model": base.model.name,
            "iterations": base.train.iterations,
            "batch": base.train.batch_size,
            "workers": base.cluster.num_workers,
            "epochs": plan_epochs(base, images),
        },
        "storage": store.uri(),
        "mlflow": mlflow,
        "macs": plan_macs(base),
        "eval": plan_evaluation(base),
    }


def describe_sweep(plan: dict) -> str:
    """A sweep plan as a few lines for the console."""
    t, c = plan["trial"], plan["cluster"]
    sched = (
        "ASHA stops trailing trials" if plan["scheduler"] == "asha" else "every trial to the end"
    )
    lines = [
        f"sweep {plan['sweep']} ({plan['source']}): {plan['trials']} trials of {plan['job']}, "
        f"{plan['searcher']} search (seed {plan['seed']}), {sched}",
        "  "
        + ("resumes its earlier run: finished trials are kept" if plan["resumes"] else "a new run"),
    ]
    for key, dom in plan["search"].items():
        kind, args = next(iter(dom.items()))
        lines.append(f"  search {key}: {kind} {args}")
    if plan["fixed"]:
        lines.append("  fixed: " + ", ".join(f"{k}={v}" for k, v in plan["fixed"].items()))
    lines.append("  objectives: " + ", ".join(f"{k} ({d})" for k, d in plan["objectives"].items()))
    epochs = f" ≈ {t['epochs']} epochs" if t["epochs"] is not None else ""
    lines.append(
        f"  each trial: {t['model']}, {t['iterations']} steps of {t['batch']} images on "
        f"{plural(t['workers'], 'worker')}{epochs}"
    )
    lines.append(
        f"  at once: {plan['at_once']} trial(s) on {c['where']} ({c['holds']}; max_concurrent "
        f"{plan['max_concurrent']})"
    )
    if c["warning"]:
        lines.append(f"  {c['warning']}")
    if plan["mlflow"]:
        ml = plan["mlflow"]
        lines.append(f"  MLflow: {ml['tracking_uri']}, experiment {ml['experiment']}")
    mac = plan["macs"]
    if mac and "backbone_gmac_at_p0" in mac:
        lines.append(macs_text(mac, "base job's settings"))
    lines.append(eval_text(plan["eval"], mac and mac["input_hw"]).replace("  ", "  each trial ", 1))
    lines.append("nothing was started; `cadist tune` with the same arguments runs it")
    return "\n".join(lines)
