"""`cadist eval --vary`: one set of weights evaluated at several settings that leave its weights
alone — the edge mask's threshold and trimap width, the mask variant, the evaluation protocol —
giving an mIoU-against-GMac curve at inference time, without training a network per point (the
paper trains one per threshold, §6; `cadist tune` does that)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import yaml

from cadist.errors import ConfigError

# keys that change how a network runs, not its weights: the rest would not load the same weights
VARIABLE = (
    "model.edge_threshold",
    "model.trimap_width",
    "model.mask_variant",
    "model.mask_sampling",
    "model.head",  # (dense or adaptive: the same parameters)
    "eval.scales",
    "eval.flip",
    "eval.window",
    "eval.stride",
)
SUMMARY = ("miou", "pixel_accuracy", "high_res_fraction", "miou_inference",
           "backbone_gmac", "backbone_gmac_computed", "total_gmac", "ran_on")  # fmt: skip
OBJECTIVES = {"miou": "max", "backbone_gmac": "min"}


def parse_vary(specs: tuple[str, ...] | list[str]) -> dict[str, list]:
    """`--vary KEY=V1,V2,…` options → {key: [values]} (each value read as YAML, e.g. 0.1, true,
    [0.75, 1.0]; a whole list in brackets, `KEY=[[1.0],[0.75,1,1.25]]`, for list values), with one
    clear error for a malformed option, a key given twice or one that would change the weights."""
    out: dict[str, list] = {}
    for spec in specs:
        key, eq, raw = spec.partition("=")
        key = key.strip()
        if not eq or not key or not raw.strip():
            raise ConfigError(
                f"--vary {spec!r}: expected KEY=V1,V2,…, e.g. --vary model.edge_threshold=0.1,0.2,0.4"
            )
        if key not in VARIABLE:
            raise ConfigError(
                f"--vary {key}: not a key an evaluation can vary on the same weights; use one of "
                f"{', '.join(VARIABLE)} (other settings need a network trained for each value: "
                f"`cadist tune`)"
            )
        if key in out:
            raise ConfigError(f"--vary {key}: given twice; list all its values in one option")
        text = raw.strip()
        try:
            values = yaml.safe_load(text if text.startswith("[") else f"[{text}]")
        except yaml.YAMLError:
            values = None
        if not isinstance(values, list) or not values:
            raise ConfigError(
                f"--vary {spec!r}: expected values separated by commas (e.g. 0.1,0.2,0.4) or a "
                f"YAML list of them (e.g. [[1.0],[0.75,1,1.25]] for eval.scales)"
            )
        out[key] = values
    return out


def settings(vary: dict[str, list]) -> list[dict]:
    """Every combination of the varied values, in the order given ({key: value} each)."""
    keys = list(vary)
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*vary.values())]


def as_overrides(setting: dict) -> list[str]:
    """A setting as `--set` overrides (JSON is YAML: 0.1, true, [0.75, 1.0], "fixed")."""
    return [f"{k}={json.dumps(v)}" for k, v in setting.items()]


def label(setting: dict) -> str:
    """Short name of a setting, e.g. "edge_threshold=0.2, trimap_width=5"."""
    return ", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in setting.items())


def run_name(job_name: str, setting: dict) -> str:
    """MLflow run name of one setting's evaluation, e.g. "edge-eval-edge_threshold=0.2"."""
    parts = [f"{k.rsplit('.', 1)[-1]}={json.dumps(v).replace(' ', '')}" for k, v in setting.items()]
    return f"{job_name}-eval-" + "-".join(parts)


def summarise(results: list[tuple[dict, dict]]) -> list[dict]:
    """One row per (setting, `evaluate_job` result): the setting, its summary figures and whether
    it is on the Pareto front of mIoU (max) against backbone GMac (min)."""
    from cadist.results.pareto import pareto

    rows = [{"setting": s} | {k: r[k] for k in SUMMARY if k in r} for s, r in results]
    front = pareto([{"metrics": row} for row in rows], OBJECTIVES)
    return [row | {"pareto": on} for row, on in zip(rows, front, strict=True)]


def write_plot(rows: list[dict], path: str | Path, title: str) -> list[str]:
    """The trade-off figure of the rows (mIoU against backbone GMac, the front as a line; written
    whole, then renamed). Returns the labels on the front."""
    from cadist.results.plots import tradeoff_png

    keys = {tuple(r["setting"]) for r in rows}
    if len(keys) == 1 and len(next(iter(keys))) == 1:  # one key (named in the title): its values
        points = [{"label": str(next(iter(r["setting"].values())))} | r for r in rows]
    else:
        points = [{"label": label(r["setting"])} | r for r in rows]
    return tradeoff_png(points, path, "backbone_gmac", "miou", "min", "max", title=title)


def evaluate_varied(
    job_file: str,
    overrides: tuple[str, ...],
    ckpt: str,
    specs: tuple[str, ...],
    options: dict,
    device: str = "cpu",
    log_run: bool = False,
    parent_name: str | None = None,
    plot: str | None = None,
    echo=print,
    address: str | None = None,
    tasks: int = 1,
) -> dict:
    """`cadist eval JOB --ckpt CKPT --vary KEY=V1,V2,…`: every setting checked first (each as
    `--set` overrides of the job, and `options`: the `--scales/--flip/--window/--stride` given),
    then evaluated in turn — or, with `address`, as Ray tasks on that cluster side by side
    (`cluster_eval`, `tasks` per setting). With `log_run` each setting is an eval run nested under one
    `<job>-vary` run that holds the results and the trade-off figure. Returns {"job", "ckpt",
    "vary", "results": one row per setting (its figures, `pareto`, its run), "pareto": the front's
    settings by increasing GMac, "plot", "mlflow_run_id"}."""
    from cadist.config.jobfile import load_job
    from cadist.eval.evaluate import eval_protocol
    from cadist.eval.tta import input_multiple

    vary = parse_vary(specs)
    for key in vary:
        option = key.split(".", 1)[1]
        if key.startswith("eval.") and options.get(option) is not None:
            raise ConfigError(
                f"--vary {key} and --{option}: the option would set every setting's {key}; drop one"
            )
    base = load_job(job_file, overrides)
    plan = []
    for setting in settings(vary):  # all checked before the first evaluation
        job = load_job(job_file, [*overrides, *as_overrides(setting)])
        tta = eval_protocol(job, **options)
        if tta.window is not None:
            multiple = input_multiple(job.model.build_kwargs())
            if tta.window.height % multiple or tta.window.width % multiple:
                raise ConfigError(
                    f"--vary {label(setting)}: window {tta.window.height}x{tta.window.width}: "
                    f"{job.model.name} takes inputs whose sides are multiples of {multiple}"
                )
        plan.append((setting, job, tta))
    uri = parent = tracker = None
    if log_run:
        from cadist import __version__
        from cadist.tracking.runs import Tracker, check_reachable, new_run, resolve_uri

        uri = resolve_uri(base.mlflow.tracking_uri)
        check_reachable(uri)
        tags = {"cadist.task": "eval-vary", "cadist.vary_job": base.name,
                "cadist.weights_source": str(ckpt), "cadist.version": __version__}  # fmt: skip
        parent = new_run(uri, base.mlflow.experiment, parent_name or f"{base.name}-vary", tags)
        tracker = Tracker(uri, parent)
        tracker.log_params(
            {"eval.ckpt": str(ckpt)} | {f"vary.{k}": json.dumps(v) for k, v in vary.items()}
        )
    try:
        out = _evaluate_all(plan, base, ckpt, device, parent, echo, address, job_file, tasks)
    except BaseException:
        if tracker is not None:  # not left RUNNING
            tracker.finish("FAILED")
        raise
    title = f"{base.name}: " + ", ".join(vary)
    out["vary"] = vary
    if plot:
        write_plot(out["results"], plot, title)
        out["plot"] = str(plot)
    if tracker is not None:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            figure = Path(plot) if plot else Path(tmp) / "tradeoff.png"
            if not plot:
                write_plot(out["results"], figure, title)
            tracker.log_artifact(figure, "vary")
        tracker.log_dict(out, "vary/results.json")
        tracker.finish()
    return out


def _evaluate_all(
    plan: list, base, ckpt: str, device: str, parent: str | None, echo, address=None, source="",
    tasks: int = 1,
) -> dict:  # fmt: skip
    """Each (setting, job, protocol) of `plan` evaluated in turn, or with `address` as Ray tasks
    on that cluster (then logged here, in order, under `parent` if given): {"job", "ckpt",
    "results", "pareto", "plot": None, "mlflow_run_id": parent}."""
    from cadist.eval.evaluate import evaluate_job, images_to_evaluate, log_evaluation
    from cadist.progress import Bar
    from cadist.tracking.sources import resolve_weights

    weights = resolve_weights(ckpt, base.mlflow.tracking_uri if base.mlflow.enabled else None)
    counts = [images_to_evaluate(job) for _, job, _ in plan]
    bar = Bar(f"eval {base.name} ({len(plan)} settings)",
              None if None in counts else sum(counts), "img")  # fmt: skip

    def progress(i: int, result: dict) -> None:
        gmac = result.get("backbone_gmac")
        bar.say(f"[{i + 1}/{len(plan)}] {label(plan[i][0])}: mIoU {result['miou']:.4f}"
             + (f", backbone {gmac:.3f} GMac" if gmac is not None else "")
             + (f", high-res {result['high_res_fraction']:.3f}" if "high_res_fraction" in result else ""))  # fmt: skip

    def record(i: int, result: dict) -> tuple[dict, dict]:
        setting, job, _ = plan[i]
        if parent:
            name = run_name(base.name, setting)
            result["mlflow_run_id"] = log_evaluation(job, ckpt, result, name, parent)
        return setting, result

    try:
        if address:  # side by side on the cluster, then logged here in order
            from cadist.eval.on_cluster import evaluate_on_cluster

            runs = [(job, tta) for _, job, tta in plan]
            evaluated = evaluate_on_cluster(runs, weights, address, source, echo=progress,
                                            shares=tasks, bar=bar)  # fmt: skip
            results = [record(i, result) for i, result in enumerate(evaluated)]
        else:  # each logged as it ends: a later failure keeps the settings before it
            results = []
            for i, (setting, job, tta) in enumerate(plan):
                bar.note = label(setting)
                results.append(record(i, evaluate_job(job, weights, device, tta, progress=bar.add)))
                progress(i, results[-1][1])
    finally:
        bar.close()
    rows = summarise(results)
    for row, (_, result) in zip(rows, results, strict=True):
        if "mlflow_run_id" in result:
            row["mlflow_run_id"] = result["mlflow_run_id"]
    front = sorted((r for r in rows if r["pareto"]), key=lambda r: r["backbone_gmac"])
    return {"job": base.name, "ckpt": str(ckpt), "results": rows,
            "pareto": [r["setting"] for r in front], "plot": None, "mlflow_run_id": parent}  # fmt: skip
