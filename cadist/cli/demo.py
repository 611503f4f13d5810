"""`cadist demo`: the whole product on generated data, on this machine — a dense OS8 and a
content-adaptive OS 8→16 network (with the method's dense head and with the adaptive head) trained
on Ray Train + DeepSpeed, a Ray Tune sweep of the edge mask, and the mIoU-against-GMac trade-off
as a table and a Pareto figure in MLflow. What each stage produced is kept in
`<workdir>/demo-state.json`: a rerun skips the stages that are done.
`--quick` is the single short dense run of earlier versions."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from urllib.parse import quote

import click

from cadist.config.jobfile import load_job
from cadist.data.shards import build_shards, manifest_path
from cadist.data.synthetic import write_tree
from cadist.errors import ConfigError
from cadist.results.report import ADAPTIVE_HEAD
from cadist.storage.store import Storage
from cadist.storage.uri import job_key

ROOT = Path(__file__).resolve().parents[2]
DEMO_JOB = ROOT / "jobs" / "demo.yaml"
DEMO_SWEEP = ROOT / "jobs" / "sweep_edge_demo.yaml"
EXPERIMENT = "cadist-demo"
STATE = "demo-state.json"

#: the training stages: job name and the keys of jobs/demo.yaml they change. Every network, dense,
#: edge and the sweep's trials, trains the same steps from the same start (seed, initialisation).
DENSE = {"name": "demo-dense-os8", "model.output_stride": 8, "train.iterations": 120,
         "eval.interval": 60}  # fmt: skip
EDGE = {"name": "demo-edge", "model.name": "deeplabv3_batch_ap_resnet_tiny",
        "model.edge_threshold": 0.15, "model.trimap_width": 11, "train.iterations": 120,
        "eval.interval": 60}  # fmt: skip
#: the same edge-mask model with the adaptive head (ASPP and classifier on the mixed-resolution
#: elements, beyond the paper): the same masks, from the same start
EDGE_HEAD = EDGE | {"name": "demo-edge-ahead", "model.head": "adaptive"}
STAGES = 8


def _heading(n: int, text: str, echo, total: int = STAGES) -> None:
    echo(click.style(f"[{n}/{total}] {text}", bold=True))


def run_demo(
    workdir: str | Path,
    overrides: tuple[str, ...] = (),
    restart: bool = False,
    quick: bool = False,
    echo=click.echo,
) -> dict:
    """The demo in `workdir` (data, shards, runs, ./mlflow.db); `overrides`: job keys set in every
    training stage and trial (e.g. train.iterations=20). Returns what the closing lines print."""
    for f in (DEMO_JOB, DEMO_SWEEP):
        if not f.is_file():
            raise ConfigError(
                f"{f}: the demo's job files are missing; run from a cadist checkout installed "
                f"with `pip install -e .`"
            )
    work = Path(workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    state_file = work / STATE
    state = {} if restart or quick else _read_state(state_file)  # (a damaged one: before anything)
    data, shards = _data_and_shards(work, echo, 4 if quick else STAGES)
    uri = f"sqlite:///{work / 'mlflow.db'}"
    base = {
        "data.train_shards": manifest_path(shards, "train"),
        "data.val_shards": manifest_path(shards, "val"),
        "cluster.storage_path": work / "cadist_runs",
        "mlflow.tracking_uri": uri,
    }
    if quick:
        return _quick(work, data, base, overrides, restart, echo)

    def done(stage: str, settings) -> dict | None:
        """The stage's record if it finished with these settings and its MLflow run is there."""
        rec = state.get(stage)
        if not rec or rec.get("settings") != json.loads(json.dumps(settings, default=str)):
            return None
        return rec if _finished(uri, rec.get("run_id")) else None

    def record(stage: str, settings, **rec) -> dict:
        state[stage] = rec | {"settings": json.loads(json.dumps(settings, default=str))}
        tmp = state_file.with_name(f".{STATE}.tmp")
        tmp.write_text(json.dumps(state, indent=1))
        tmp.replace(state_file)  # (never half-written)
        return state[stage]

    def train_stage(n: int, stage: str, job: dict, heading: str) -> dict:
        settings = {"job": job, "set": list(overrides)}
        rec = done(stage, settings)
        _heading(n, heading, echo)
        if rec:
            echo(f"  done before: MLflow run {rec['run_id']} (--restart runs it again)")
            return rec
        r = _train(base, job, overrides, restart)
        return record(stage, settings, run_id=r.run_id, checkpoint=str(r.checkpoint or ""))

    # 3. dense OS8
    dense = train_stage(3, "dense", DENSE,
                        f"dense {_model(DENSE)} at OS8 on 2 Ray workers with DeepSpeed")  # fmt: skip
    weights = f"runs:/{dense['run_id']}"

    # 4. the dense weights at OS16: the other reference point (same weights, half the resolution)
    settings = {"weights": weights, "set": list(overrides)}
    os16 = done("dense-os16", settings)
    _heading(4, "the dense weights evaluated at OS16 (the cheaper dense reference)", echo)
    if os16:
        echo(f"  done before: MLflow run {os16['run_id']}")
    else:
        os16 = record("dense-os16", settings, run_id=_eval_os16(base, overrides, weights))

    # 5. the edge-mask adaptive model, from the same start
    edge = train_stage(5, "edge", EDGE, f"content-adaptive {EDGE['model.name']} (edge mask, "
                       f"OS 8→16), same start")  # fmt: skip

    # 6. the same with the adaptive head: the same masks, the head on the elements too
    train_stage(6, "edge-head", EDGE_HEAD, "the same edge-mask model with the adaptive head "
                "(ASPP and classifier on the mixed-resolution elements), same start")  # fmt: skip

    # 7. the Ray Tune sweep of the edge mask
    sets = _sweep_sets(base, overrides)
    settings = {"sweep": DEMO_SWEEP.read_text(), "set": sets}
    sweep = done("sweep", settings)
    _heading(7, f"Ray Tune sweep {DEMO_SWEEP.name}: edge threshold × trimap width", echo)
    if sweep:
        echo(f"  done before: MLflow run {sweep['run_id']}")
    else:
        from cadist.sweep.tune import run_sweep

        r = run_sweep(DEMO_SWEEP, tuple(sets), echo=lambda s: echo(f"  {s}"), restart=restart)
        unfinished = [t for t in r["trials"] if t["state"] != "finished"]
        if r["stopped"] or unfinished:
            raise ConfigError(
                f"sweep {r['sweep']}: {len(unfinished)} trial(s) did not finish "
                f"({', '.join(sorted({t['state'] for t in unfinished}))}); rerun `cadist demo` to "
                f"resume it"
            )
        trials = [t["mlflow_run_id"] for t in r["trials"]]
        sweep = record("sweep", settings, run_id=r["parent_run_id"], trials=trials)

    # 8. the report: table and Pareto figure, logged to MLflow
    _heading(8, f"report of experiment {EXPERIMENT}: mIoU against GMac", echo)
    report = _report(work, uri, state.get("report", {}).get("run_id"), echo)
    record("report", None, run_id=report["run_id"])
    return report | {
        "tracking_uri": uri,
        "checkpoint": edge["checkpoint"] or None,
        "job": Storage(str(base["cluster.storage_path"])).uri(job_key(EDGE["name"], "job")),
        "val_image": _val_image(data),
    }


def _val_image(data: Path) -> str:
    return str(next(iter(sorted((data / "leftImg8bit" / "val").glob("*/*.png"))), ""))


def _read_state(path: Path) -> dict:
    """What earlier runs of the demo recorded (nothing yet: {}); a damaged file is one error."""
    if not path.is_file():
        return {}
    try:
        state = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exn:
        state = exn
    if not isinstance(state, dict):
        raise ConfigError(
            f"{path}: expected the demo's JSON record of its stages, found something else "
            f"({state if isinstance(state, Exception) else type(state).__name__}); delete it to "
            f"run every stage again (finished trainings end at once), or pass --restart"
        )
    return state


def _model(job: dict) -> str:
    return job.get("model.name", "deeplabv3_resnet_tiny")


def _sets(values: dict) -> list[str]:
    return [f"{k}={v}" for k, v in values.items()]


def _data_and_shards(work: Path, echo, total: int) -> tuple[Path, Path]:
    data, shards = work / "data" / "synth", work / "shards" / "demo"
    if not (data / "gtFine").is_dir():
        _heading(1, f"generating street scenes in {data}", echo, total)
        write_tree(
            data, num_train=64, num_val=16, height=256, width=512, seed=0, workers=2, progress=True
        )
    else:
        _heading(1, f"using the scenes in {data}", echo, total)
    _heading(2, f"WebDataset shards in {shards}", echo, total)
    for split, per_shard in (("train", 8), ("val", 4)):
        if not manifest_path(shards, split).exists():
            build_shards(data, split, shards, samples_per_shard=per_shard, workers=2)
    return data, shards


def _train(base: dict, stage: dict, overrides: tuple[str, ...], restart: bool):
    from cadist.train.driver import run_training

    job = load_job(
        DEMO_JOB, _sets(base | stage | {"mlflow.experiment": EXPERIMENT}) + list(overrides)
    )
    return run_training(job, str(DEMO_JOB), restart=restart)


def _eval_os16(base: dict, overrides: tuple[str, ...], weights: str) -> str:
    """The dense OS8 model's best weights evaluated at output stride 16, logged as an evaluation
    run (job demo-dense-os16) that `cadist report` lists; returns its run id."""
    from cadist.eval.evaluate import evaluate_job, images_to_evaluate, log_evaluation
    from cadist.progress import Bar

    sets = base | DENSE | {"name": "demo-dense-os16", "model.output_stride": 16,
                           "mlflow.experiment": EXPERIMENT}  # fmt: skip
    job = load_job(DEMO_JOB, _sets(sets) + list(overrides))
    bar = Bar(f"eval {job.name}", images_to_evaluate(job), "img")
    try:
        result = evaluate_job(job, weights, progress=bar.add)
    finally:
        bar.close()
    return log_evaluation(job, weights, result, run_name="demo-dense-os16")


def _sweep_sets(base: dict, overrides: tuple[str, ...]) -> list[str]:
    """The sweep's overrides: where the demo's data, runs and MLflow store are, and the user's
    --set keys (those the sweep does not search)."""
    from cadist.config.jobfile import parse_overrides
    from cadist.sweep.spec import load_sweep

    searched = set(load_sweep(DEMO_SWEEP)[0].search)
    sets = [f"set.{k}={v}" for k, v in base.items()]
    return sets + [f"set.{k}={v}" for k, v in parse_overrides(overrides) if k not in searched]


def _finished(uri: str, run_id: str | None) -> bool:
    from cadist.tracking.runs import run_status

    return run_status(uri, run_id) == "FINISHED"


def _report(work: Path, uri: str, report_run: str | None, echo) -> dict:
    """Print the demo experiment's table; draw mIoU against total GMac (adaptive runs, their Pareto
    front; the dense runs as reference points) and log table and figure to the `demo-report` run
    (again on a rerun). Returns the run, the figure, the best trade-off and the compare view."""
    from cadist.results.plots import tradeoff_png
    from cadist.results.report import markdown, summarise
    from cadist.tracking.runs import Tracker, experiment_id, new_run, run_status, training_runs

    runs = training_runs(uri, EXPERIMENT)
    rows = [r for r in summarise(runs) if r["best_miou"] is not None]
    ids = {r["name"]: r["run_id"] for r in runs}
    dense = [r for r in rows if r["mask"] == "dense"]
    adaptive = [r for r in rows if r["mask"] != "dense"]
    x, y = "total_gmac", "miou"  # the whole model: the adaptive head saves there too

    def point(r):
        return {"label": _short(r), x: r.get(x), y: r["best_miou"]}

    png = work / "report" / "demo_pareto.png"
    front = tradeoff_png([point(r) for r in adaptive], png, x, y,
                         title=f"{EXPERIMENT}: val mIoU against GMac per image (whole model)",
                         references=[point(r) for r in dense])  # fmt: skip
    for r in rows:
        r["pareto"] = "*" if r in adaptive and _short(r) in front else ""
    cols = [("run", "run"), ("model", "model"), ("mask", "mask"), ("best_miou", "val mIoU"),
            ("backbone_gmac", "backbone GMac"), ("total_gmac", "total GMac"),
            ("high_res_fraction", "high-res p"),
            ("images_per_s", "val images/s"), ("pareto", "front")]  # fmt: skip
    table = markdown(rows, cols)
    echo(table)
    if run_status(uri, report_run) is None:
        report_run = new_run(uri, EXPERIMENT, "demo-report", {"cadist.task": "report"})
    tracker = Tracker(uri, report_run)
    tracker.log_text(table + "\n", "report/table.md")
    tracker.log_artifact(png, "report")
    tracker.finish()
    best = _best_trade_off(dense, adaptive)
    exp_id = experiment_id(uri, EXPERIMENT)
    # MLflow 3's UI: the runs view ("Model training"; without the parameter a fresh browser
    # opens the GenAI traces view) and the compare view of every scored run
    runs_view = f"http://127.0.0.1:5000/#/experiments/{exp_id}/runs?workflowType=machine_learning"
    compare = (
        "http://127.0.0.1:5000/#/compare-runs?runs="
        + quote(json.dumps([ids[r["run"]] for r in rows if r["run"] in ids]))
        + "&experiments="
        + quote(json.dumps([exp_id]))
    )
    return {"run_id": report_run, "figure": str(png), "best": best, "compare_url": compare,
            "runs_url": runs_view,
            "rows": rows, "table": table}  # fmt: skip


def _short(row: dict) -> str:
    if row["mask"] == "dense":
        return row["model"].split()[-1].replace("OS", "dense OS")
    label = row["mask"].replace("edges ", "").replace(", trimap ", " w")
    return label + (" + head" if row["model"].endswith(ADAPTIVE_HEAD) else "")


def _best_trade_off(dense: list[dict], adaptive: list[dict]) -> str | None:
    """One line: the adaptive run with the best mIoU among those whose whole model is cheaper than
    dense OS8's, against dense OS8."""
    g = "total_gmac"
    os8 = next((r for r in dense if r["model"].endswith("OS8") and r.get(g)), None)
    cheaper = [r for r in adaptive if r.get(g) and (os8 is None or r[g] < os8[g])]
    if not cheaper:
        return None
    b = max(cheaper, key=lambda r: (r["best_miou"], -r[g]))
    line = f"{b['run']} ({_short(b)}): val mIoU {b['best_miou']:.4f} at {b[g]:.2f} GMac"
    if os8:
        line += (
            f" — {b[g] / os8[g]:.0%} of dense OS8's {os8[g]:.2f}, mIoU "
            f"{b['best_miou'] - os8['best_miou']:+.4f} against its {os8['best_miou']:.4f}"
        )
    return line


def _quick(work: Path, data: Path, base: dict, overrides, restart: bool, echo) -> dict:
    """The single short run: jobs/demo.yaml (dense, OS16) as it is."""
    from cadist.tracking.runs import metric_history, run_metrics
    from cadist.train.driver import run_training

    job = load_job(DEMO_JOB, _sets(base) + list(overrides))
    _heading(3, f"training {job.model.name} for {job.train.iterations} steps on "
             f"{job.cluster.num_workers} Ray workers with DeepSpeed "
             f"(ZeRO-{job.deepspeed.zero_stage})", echo, 4)  # fmt: skip
    result = run_training(job, str(DEMO_JOB), restart=restart)
    _heading(4, "evaluated on the validation shards; logged to MLflow", echo, 4)
    uri = base["mlflow.tracking_uri"]
    hist = metric_history(uri, result.run_id, "val/miou")  # [(step, value)]
    step, value = max(hist)
    return {
        "miou": value,
        "best_miou": max(v for _, v in hist),
        "step": step,
        "run_id": result.run_id,
        "tracking_uri": uri,
        "chance_miou": chance_miou(run_metrics(uri, result.run_id)),
        "checkpoint": str(result.checkpoint) if result.checkpoint else None,
        "job": Storage(job.cluster.storage_path).uri(job_key(job.name, "job")),
        "val_image": _val_image(data),
    }


def chance_miou(metrics: dict) -> float:
    """mIoU of predicting every pixel as one class: the 1/C level a trained model must beat."""
    # With 19 classes and several present, a constant prediction scores ≤ 1/#present classes.
    iou = [m for m in metrics if m.startswith("val/iou/")]
    return 1.0 / max(1, len(iou))


def closing_lines(summary: dict) -> list[str]:
    """What to look at next, as the demo ends."""
    uri = summary["tracking_uri"]
    lines = []
    if summary.get("best"):
        lines.append(f"best trade-off: {summary['best']}")
    lines += [
        f"Pareto figure: {summary['figure']} (in MLflow: run demo-report, report/demo_pareto.png)",
        f"browse the runs: mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000",
        f"the runs there: {summary['runs_url']}",
        f"compare them there: {summary['compare_url']}",
        f"the table again: cadist report --experiment {EXPERIMENT} --tracking-uri {shlex.quote(uri)}",
    ]
    if summary.get("checkpoint"):  # the edge model: evaluate it again, predict an image
        ckpt = shlex.quote(summary["checkpoint"])
        lines.append(f"evaluate it: cadist eval {shlex.quote(summary['job'])} --ckpt {ckpt}")
        if summary.get("val_image"):
            image = shlex.quote(summary["val_image"])
            lines.append(f"predict: cadist predict --ckpt {ckpt} --image {image} --save-mask")
    return lines
