"""`cadist train`, `config`, `eval`, `demo`, `tune` and `report`."""

from __future__ import annotations

import shlex
from pathlib import Path

import click

from cadist.cli.app import _dry_run_options, _print_json, _set_option, _tta_options, main


# -- training -----------------------------------------------------------------------------------
@main.command("train")
@click.argument("job_file", type=click.Path(dir_okay=False))
@_set_option("a job key, e.g. --set train.iterations=1000")
@click.option(
    "--address", default=None, help="Ray cluster address; default: the job's, else a local Ray."
)
@click.option(
    "--restart",
    is_flag=True,
    help="Start over: an earlier run of this job name (checkpoints, MLflow run) is kept aside as "
    "<name>.before-<time>, and a new one begins.",
)
@_dry_run_options(
    "the job (shards, weights, rerun, MLflow, whether the Ray cluster holds the workers)"
)
def train_cmd(job_file, overrides, address, restart, dry_run, as_json):
    """Train JOB_FILE on Ray Train + DeepSpeed. Rerunning the same job name resumes it from its
    last checkpoint; settings that change what is trained are then refused (--restart)."""
    from cadist.config.schema import load_job
    from cadist.train.driver import run_training

    job = load_job(job_file, overrides)
    if dry_run:
        from cadist.train.plan import describe, plan_training

        plan = plan_training(job, job_file, address, restart=restart)
        if as_json:
            _print_json(plan)
        else:
            click.echo(describe(plan))
        return
    r = run_training(job, job_file, address, restart=restart)
    summary = {
        "job": job.name,
        "miou": r.metrics.get("val/miou"),
        "step": r.metrics.get("step"),
        "stopped": r.stopped,  # by `cadist stop`: rerun to resume
        "checkpoint": r.checkpoint,
        "mlflow_run_id": r.run_id,
    }
    _print_json(summary)
    if r.tracking_uri:
        click.echo(f"browse: mlflow ui --backend-store-uri {r.tracking_uri} --host 127.0.0.1")


@main.command("config")
@click.argument("job_file", type=click.Path(dir_okay=False))
@_set_option("a job key, e.g. --set train.iterations=1000")
@click.option(
    "--sources",
    is_flag=True,
    help="End each key's line with where it was set: the job file, --set, or default.",
)
def config_cmd(job_file, overrides, sources):
    """Print JOB_FILE as cadist runs it: the overrides applied, validated, every key (defaults
    included) — YAML that `cadist train` takes as a job file."""
    from cadist.config.schema import job_sources, job_yaml, load_job

    job = load_job(job_file, overrides)
    click.echo(job_yaml(job, job_sources(job_file, overrides) if sources else None), nl=False)


@main.command("eval")
@click.argument("job_file", type=click.Path(dir_okay=False))
@click.option(
    "--ckpt",
    required=True,
    metavar="WEIGHTS",
    help="Weights file, a cadist checkpoint folder (cadist_runs/<job>/step_…) or an MLflow URI "
    "(runs:/<run_id> = its best weights, from the job's tracking store).",
)
@_set_option("a job key, e.g. --set eval.batch_size=2")
@click.option("--device", default="auto", show_default=True)
@click.option(
    "--log",
    "log_run",
    is_flag=True,
    help="Also record the evaluation as an MLflow run in the job's experiment (for `cadist report`).",
)
@click.option(
    "--run-name",
    help="Name of that run; default: <job name>-eval[-tta][-slide] (with --vary: of the run the "
    "settings' runs are nested under, default <job name>-vary).",
)
@_tta_options
@click.option(
    "--per-image",
    is_flag=True,
    help="Also each image's mIoU, pixel accuracy and high-res fraction, worst first (with --log: "
    "eval/per_image.csv).",
)
@click.option(
    "--vary",
    multiple=True,
    metavar="KEY=V1,V2,…",
    help="Evaluate the same weights at each of these values (repeatable: every combination), e.g. "
    "--vary model.edge_threshold=0.1,0.2,0.4: each setting's mIoU, high-res fraction and GMac, "
    "and which are on the mIoU-GMac Pareto front. Keys that leave the weights alone: "
    "model.edge_threshold, trimap_width, mask_variant, mask_sampling and eval.*.",
)
@click.option(
    "--plot",
    type=click.Path(dir_okay=False),
    help="With --vary: write the trade-off figure (mIoU against backbone GMac) here.",
)
@click.option(
    "--address",
    default=None,
    help="Evaluate on this Ray cluster (auto, host:port, ray://host:10001; local: a Ray started "
    "here, e.g. over this machine's GPUs) instead of in this process: each evaluation — one per "
    "--vary setting, side by side — is a Ray task with cluster.cpus_per_worker CPUs and, with "
    "cluster.use_gpu, a GPU. The weights are sent from here; the shards must be readable there.",
)
@click.option(
    "--tasks",
    type=click.IntRange(1),
    default=1,
    show_default=True,
    help="With --address: split each evaluation's validation images over this many Ray tasks "
    "(e.g. one per GPU), their counts added up — the same figures, sooner.",
)
def eval_cmd(
    job_file, ckpt, overrides, device, log_run, run_name, scales, flip, window, stride, per_image,
    vary, plot, address, tasks,
):  # fmt: skip
    """Evaluate CKPT on the validation shards of JOB_FILE: mIoU, accuracies, per-class IoU (JSON);
    adaptive models also the high-res fraction. With --scales/--flip/--window, also each pass's
    size (and crops), high-res fraction and GMac, and the GMac per image of all passes. By default
    the job's evaluation protocol, as during training: its eval.scales, eval.flip and eval.window
    (with eval.stride, or --stride); the options override it (`--scales 1 --no-flip --window
    whole`: the paper's single-scale whole-image protocol). With --vary, the same weights at each
    combination of the given values, and which settings are on the mIoU-GMac Pareto front. With
    --address, on a Ray cluster as Ray tasks (--tasks N: N per evaluation, each a share of the
    images)."""
    import torch

    from cadist.config.schema import load_job
    from cadist.eval.evaluate import eval_protocol, evaluate_job, log_evaluation

    if tasks > 1 and not address:
        raise click.UsageError("--tasks goes with --address (Ray tasks on a cluster)")
    if address and device != "auto":
        raise click.UsageError(
            "--device goes with an evaluation in this process; with --address each Ray task "
            "uses a GPU when the job's cluster.use_gpu is true (--set cluster.use_gpu=…)"
        )
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    options = {"scales": scales, "flip": flip, "window": window, "stride": stride}
    if vary:
        if per_image:
            raise click.UsageError(
                "--per-image goes with one setting: evaluate it alone, with --set KEY=VALUE"
            )
        from cadist.eval.vary import evaluate_varied

        _print_json(
            evaluate_varied(
                job_file,
                overrides,
                ckpt,
                vary,
                options,
                device,
                log_run,
                run_name,
                plot,
                echo=lambda m: click.echo(m, err=True),
                address=address,
                tasks=tasks,
            )
        )
        return
    if plot:
        raise click.UsageError("--plot goes with --vary (the trade-off of several settings)")
    job = load_job(job_file, overrides)
    tta = eval_protocol(job, **options)
    if log_run:  # an unreachable store fails before the evaluation, not after
        from cadist.tracking.runs import check_reachable, resolve_uri

        check_reachable(resolve_uri(job.mlflow.tracking_uri))
    if address:
        from cadist.eval.on_cluster import evaluate_on_cluster
        from cadist.tracking.sources import resolve_weights

        weights = resolve_weights(ckpt, job.mlflow.tracking_uri if job.mlflow.enabled else None)
        runs = [(job, tta)]
        result = evaluate_on_cluster(runs, weights, address, job_file, per_image, shares=tasks)[0]
    else:
        result = evaluate_job(job, ckpt, device, tta, per_image)
    if log_run:
        result["mlflow_run_id"] = log_evaluation(job, ckpt, result, run_name)
    _print_json(result)


@main.command("demo")
@click.option(
    "--workdir",
    default=".",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Where data, shards, checkpoints and the MLflow store go.",
)
@_set_option("a key of jobs/demo.yaml, e.g. --set model.name=deeplabv3_ad_resnet_tiny")
@click.option(
    "--restart", is_flag=True, help="Train the demo job over (an earlier run is kept aside)."
)
def demo_cmd(workdir, overrides, restart):
    """Generate data → build shards → train jobs/demo.yaml on a local Ray (2 CPU workers, DeepSpeed)
    → evaluate → log to MLflow. Rerunning resumes (and finishes at once if already done); a variant
    (--set model.name=…) wants its own --set name=… or --restart."""
    from cadist.cli.demo import run_demo

    summary = run_demo(workdir, overrides, restart)
    click.echo(
        f"final val mIoU {summary['miou']:.4f} (best {summary['best_miou']:.4f}) after "
        f"{summary['step']} steps; chance level ≈ {summary['chance_miou']:.3f}"
    )
    click.echo(
        f"browse the run: mlflow ui --backend-store-uri {summary['tracking_uri']} --host 127.0.0.1 --port 5000"
    )
    if summary["checkpoint"]:
        ckpt = shlex.quote(summary["checkpoint"])
        click.echo(f"evaluate it: cadist eval {shlex.quote(summary['job'])} --ckpt {ckpt}")
        if summary["val_image"]:
            click.echo(
                f"predict: cadist predict --ckpt {ckpt} --image {shlex.quote(summary['val_image'])}"
            )


# -- sweeps -------------------------------------------------------------------------------------
@main.command("tune")
@click.argument("sweep_file", type=click.Path(dir_okay=False))
@_set_option(
    "a top-level sweep key (--set num_samples=4), or fix a job key for every trial "
    "(--set train.iterations=50, as the sweep's `set`)"
)
@click.option(
    "--restart",
    is_flag=True,
    help="Start the sweep afresh even if an earlier run of it exists (that run is kept aside).",
)
@_dry_run_options("the sweep (trials, domains, objectives, trials at once)")
def tune_cmd(sweep_file, overrides, restart, dry_run, as_json):
    """Run a sweep (Ray Tune): each trial is the sweep's base job with searched values, trained
    like `cadist train` and logged as an MLflow run under the sweep's run; prints the trials and
    marks the Pareto front of the objectives (e.g. mIoU against GMac). Rerunning an interrupted
    sweep resumes it: finished trials are kept, the others continue from their checkpoints."""
    from cadist.sweep.tune import run_sweep

    if dry_run:
        from cadist.sweep.plan import describe_sweep, plan_sweep

        plan = plan_sweep(sweep_file, overrides, restart=restart)
        if as_json:
            _print_json(plan)
        else:
            click.echo(describe_sweep(plan))
        return
    r = run_sweep(sweep_file, overrides, echo=click.echo, restart=restart)
    click.echo(f"results: {r['results_file']}")


# -- results ------------------------------------------------------------------------------------
#: the experiments the paper's jobs log to (jobs/deeplabv3_r101_os*.yaml, edge/learned_os8to16.yaml)
PAPER_EXPERIMENTS = ("cityscapes-dense", "cityscapes-adaptive")


@main.command("report")
@click.option(
    "--experiment",
    "experiments",
    multiple=True,
    help="MLflow experiment to read (repeatable); default: the paper jobs' cityscapes-dense and "
    "cityscapes-adaptive, whichever exist.",
)
@click.option(
    "--tracking-uri", default=None, help="MLflow store or server; default: ./mlflow.db as training."
)
@click.option(
    "--plot",
    type=click.Path(dir_okay=False),
    help="Also draw best val mIoU against backbone GMac per run, Pareto front marked (PNG).",
)
@click.option(
    "--per-class",
    is_flag=True,
    help="Also the per-class IoU of each run's best evaluation (a class per row, a run per column).",
)
@click.option(
    "--baseline",
    metavar="RUN",
    help="With --per-class: each other run's IoU with its difference to this run's.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def report_cmd(experiments, tracking_uri, plot, per_class, baseline, as_json):
    """The results table of one or more experiments: best val mIoU per run (and at which step),
    high-res fraction and backbone GMac at that evaluation, beside the released models' mIoU."""
    from cadist.errors import ConfigError
    from cadist.results.report import markdown, mixed_validation, per_class_markdown, summarise
    from cadist.tracking.runs import check_reachable, experiments_there, resolve_uri, training_runs

    uri = resolve_uri(tracking_uri)
    check_reachable(uri, read_only=True)  # ≤ 5 s; creates nothing
    runs = []
    if experiments:
        for e in experiments:
            runs += training_runs(uri, e, per_class=per_class)
    else:
        for e in PAPER_EXPERIMENTS:
            try:
                runs += training_runs(uri, e, per_class=per_class)
                experiments += (e,)
            except ConfigError:  # not created yet
                pass
        if not experiments:
            raise ConfigError(
                f"MLflow at {uri}: none of the paper jobs' experiments "
                f"({', '.join(PAPER_EXPERIMENTS)}) exists; name one with --experiment "
                f"({experiments_there(uri)})"
            )
    experiment = ", ".join(experiments)
    rows = summarise(runs)
    note = mixed_validation(rows)
    if note:
        click.echo(note, err=True)
    if baseline and not per_class:
        raise click.UsageError("--baseline goes with --per-class")
    table = per_class_markdown(rows, baseline) if per_class else None  # a wrong baseline: at once
    if plot:
        from cadist.results.plots import tradeoff_png

        x, y = "backbone GMac per image", "best val mIoU"
        points = [{"label": r["run"], x: r.get("backbone_gmac"), y: r["best_miou"]} for r in rows]
        front = tradeoff_png(points, plot, x, y, title=f"experiment {experiment}")
        click.echo(f"plot: {plot} (Pareto front: {', '.join(front) or 'none'})", err=True)
    if as_json:
        _print_json({"experiment": experiment, "experiments": list(experiments), "runs": rows})
    else:
        click.echo(markdown(rows))
        if table:
            click.echo(f"\nper-class IoU at each run's best evaluation:\n{table}")


# -- stop ---------------------------------------------------------------------------------------
@main.command("stop")
@click.argument("job")
@_set_option("a job key when JOB is a file, e.g. --set cluster.storage_path=/shared/runs")
@click.option(
    "--storage",
    default=None,
    help="With a name: the cluster.storage_path it runs under (a folder or s3://… / gs://…; "
    "default ./cadist_runs).",
)
@click.option(
    "--address",
    default=None,
    help="A Ray cluster's dashboard (e.g. http://127.0.0.1:8265): write the request there, from "
    "a small Ray job, for a storage path only the cluster sees (jobs run by `cadist submit`).",
)
@click.option(
    "--no-upload",
    is_flag=True,
    help="With --address: use the cadist installed on the cluster instead of uploading this "
    "project folder.",
)
@click.option(
    "--wait",
    "wait_s",
    type=float,
    default=None,
    metavar="SECONDS",
    help="Wait up to this long for the job or sweep to end; print where it stopped.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the request as one JSON object.")
def stop_cmd(job, overrides, storage, address, no_upload, wait_s, as_json):
    """Ask a running `cadist train` job or `cadist tune` sweep to stop cleanly: a job's workers
    write a checkpoint at the next progress report (every train.log_every steps) and end, the
    MLflow run is marked KILLED (tag cadist.stopped_at_step), and rerunning the job resumes there.
    A sweep's running trials do the same, no further trial starts, and the sweep ends with its
    results so far; rerunning `cadist tune` resumes it. JOB is the job's or sweep's YAML file or its
    name; the storage path must be one this machine sees (on a cluster: a shared file system),
    else --address writes the request on the cluster."""
    from cadist.submit.status import request_stop

    kind = None
    if Path(job).suffix in (".yaml", ".yml") and Path(job).is_file():
        if storage:
            raise click.UsageError("--storage goes with a name; a job or sweep file names its own")
        name, storage, kind = _stop_target(job, overrides)
    elif overrides:
        raise click.UsageError(f"--set goes with a job or sweep file; {job} is not one")
    else:
        name, storage = job, storage or "cadist_runs"
    if address:
        from cadist.errors import ConfigError
        from cadist.submit.submission import submit_stop

        if wait_s is not None:
            raise click.UsageError("--wait reads the storage here: it goes without --address")
        if not Path(storage).is_absolute() and "://" not in storage:
            raise ConfigError(
                f"storage {storage}: with --address it is read on the cluster, where a relative "
                f"path means another folder; give the job's cluster.storage_path as an absolute "
                f"path (as the cluster sees it)"
            )
        submit_stop(name, storage, address, None if no_upload else ".", click.echo, kind=kind)
        return
    request = request_stop(storage, name, kind)
    if "sweep" in request:
        _stop_sweep(request, storage, wait_s, as_json)
        return
    if wait_s is not None:
        from cadist.submit.status import wait_for_stop

        request["stopped_at_step"] = wait_for_stop(storage, name, wait_s)
    if as_json:
        _print_json(request)
    elif wait_s is not None:
        click.echo(
            f"job {name} stopped; its last checkpoint is step {request['stopped_at_step']}; "
            f"rerun it to resume"
        )
    else:
        click.echo(
            f"stop requested for job {name} ({request['stop_file']}): it writes a checkpoint at "
            f"its next progress report and ends; rerun it to resume"
        )


def _stop_target(path: str, overrides) -> tuple[str, str, str]:
    """(name, storage path, "job" or "sweep") of the job or sweep file `path` (one with `search:`
    is a sweep; its storage is its base job's with the sweep's fixed overrides)."""
    from cadist.config.schema import load_job, read_yaml, validate_job

    if "search" in read_yaml(Path(path), "job or sweep file", "a mapping"):
        from cadist.sweep.spec import load_sweep

        sweep, fixed, _ = load_sweep(path, overrides)
        return sweep.name, validate_job(fixed, path).cluster.storage_path, "sweep"
    job = load_job(path, overrides)
    return job.name, job.cluster.storage_path, "job"


def _stop_sweep(request: dict, storage: str, wait_s: float | None, as_json: bool) -> None:
    name = request["sweep"]
    if wait_s is not None:
        from cadist.submit.status import wait_for_sweep_stop

        request |= wait_for_sweep_stop(storage, name, wait_s)
    if as_json:
        _print_json(request)
    elif wait_s is not None:
        counts = ", ".join(f"{n} {state}" for state, n in request["trials"].items())
        click.echo(
            f"sweep {name} stopped ({counts or 'no trials'}); rerun `cadist tune` to resume"
            if request["stopped"]
            else f"sweep {name} ended before it read the request ({counts})"
        )
    else:
        click.echo(
            f"stop requested for sweep {name} ({request['stop_file']}): its running trials write a "
            f"checkpoint at their next progress report and end, no further trial starts; rerun "
            f"`cadist tune` to resume"
        )


# -- status -------------------------------------------------------------------------------------
@main.command("status")
@click.argument("storage", default="cadist_runs")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def status_cmd(storage, as_json):
    """The jobs under STORAGE (a jobs' cluster.storage_path: a folder or s3://… / gs://…; default
    ./cadist_runs): step reached,
    finished, resumable or stop requested, MLflow run, and records waiting for a tracking server
    that did not answer (a rerun sends them); then the sweeps: trials finished, stopped, failed,
    Pareto front."""
    from cadist.errors import ConfigError
    from cadist.storage.store import META, Storage
    from cadist.submit.status import jobs_in, sweep_table, sweeps_in, table

    store = Storage(storage)
    if not store.is_dir(META):
        raise ConfigError(
            f"{store.uri()}: no cadist jobs here (no .cadist/ folder); pass the "
            f"cluster.storage_path your jobs use"
        )
    rows, sweeps = jobs_in(store), sweeps_in(store)
    if as_json:
        _print_json({"storage": store.uri(), "jobs": rows, "sweeps": sweeps})
    else:
        click.echo(table(rows))
        if sweeps:
            click.echo("\n" + sweep_table(sweeps))
        waiting = [r["job"] for r in rows if r["pending_mlflow_records"]]
        if waiting:
            click.echo(
                f"records wait for MLflow in: {', '.join(waiting)}; rerun those jobs once the "
                f"server answers (they finish at once and send them)",
                err=True,
            )
