"""`cadist eval` and `cadist report`: weights scored on a job's validation shards (here or on a Ray
cluster, at several settings with --vary), and the results table of MLflow experiments."""

from __future__ import annotations

import click

from cadist.cli.app import _print_json, _set_option, _tta_options, main


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
@click.option(
    "--head",
    type=click.Choice(["dense", "adaptive"]),
    help="Adaptive models: the head on the dense map (the method's) or on the mixed-resolution "
    "elements (same weights); default: the job's model.head.",
)
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
    "model.edge_threshold, trimap_width, mask_variant, mask_sampling, head and eval.*.",
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
    job_file, ckpt, overrides, head, device, log_run, run_name, scales, flip, window, stride, per_image,
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

    from cadist.config.jobfile import load_job
    from cadist.eval.evaluate import eval_protocol, evaluate_job, log_evaluation

    if head:  # as --set model.head=…, after the other keys
        overrides = (*overrides, f"model.head={head}")
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
    from cadist.eval.evaluate import images_to_evaluate
    from cadist.progress import Bar

    bar, result = Bar(f"eval {job.name}", images_to_evaluate(job), "img"), None
    try:
        if address:
            from cadist.eval.on_cluster import evaluate_on_cluster
            from cadist.tracking.sources import resolve_weights

            weights = resolve_weights(ckpt, job.mlflow.tracking_uri if job.mlflow.enabled else None)
            runs = [(job, tta)]
            result = evaluate_on_cluster(runs, weights, address, job_file, per_image, shares=tasks,
                                         bar=bar)[0]  # fmt: skip
        else:
            result = evaluate_job(job, ckpt, device, tta, per_image, progress=bar.add)
    finally:
        bar.close(f"mIoU {result['miou']:.4f}" if result else None)
    if log_run:
        result["mlflow_run_id"] = log_evaluation(job, ckpt, result, run_name)
    _print_json(result)


@main.command("report")
@click.option(
    "--experiment",
    "experiments",
    multiple=True,
    help="MLflow experiment to read (repeatable); default: every experiment with cadist runs, the "
    "paper jobs' cityscapes-dense and cityscapes-adaptive first.",
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
    from cadist.tracking.runs import (
        check_reachable,
        experiments_there,
        experiments_with_training_runs,
        resolve_uri,
        training_runs,
    )

    uri = resolve_uri(tracking_uri)
    check_reachable(uri, read_only=True)  # ≤ 5 s; creates nothing
    runs = []
    if experiments:
        for e in experiments:
            runs += training_runs(uri, e, per_class=per_class)
    else:  # the paper jobs' experiments first, then every other one with cadist runs
        there = experiments_with_training_runs(uri)
        for e in [e for e in PAPER_EXPERIMENTS if e in there] + [
            e for e in there if e not in PAPER_EXPERIMENTS
        ]:
            runs += training_runs(uri, e, per_class=per_class)
            experiments += (e,)
        if not experiments:
            raise ConfigError(
                f"MLflow at {uri}: no experiment holds cadist runs yet ({experiments_there(uri)});"
                f" train or evaluate with --log first, or name one with --experiment"
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


# -- results ------------------------------------------------------------------------------------
#: the experiments the paper's jobs log to (jobs/deeplabv3_r101_os*.yaml, edge/learned_os8to16.yaml)
PAPER_EXPERIMENTS = ("cityscapes-dense", "cityscapes-adaptive")
