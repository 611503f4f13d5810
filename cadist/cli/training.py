"""`cadist train`, `config`, `eval`, `demo`, `tune` and `report`."""

from __future__ import annotations

import shlex

import click

from cadist.cli.app import _dry_run_options, _print_json, _set_option, main


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
    from cadist.config.jobfile import load_job
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
    from cadist.config.jobfile import job_sources, job_yaml, load_job

    job = load_job(job_file, overrides)
    click.echo(job_yaml(job, job_sources(job_file, overrides) if sources else None), nl=False)


@main.command("demo")
@click.option(
    "--workdir",
    default=".",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Where data, shards, checkpoints and the MLflow store go.",
)
@_set_option("a job key for every training stage and sweep trial, e.g. --set train.iterations=20")
@click.option(
    "--quick",
    is_flag=True,
    help="Only the short dense run of jobs/demo.yaml (a smoke test: data, shards, one training).",
)
@click.option("--restart", is_flag=True, help="Run every stage over (earlier runs are kept aside).")
def demo_cmd(workdir, overrides, quick, restart):
    """The whole product on generated data, on this machine: street scenes → WebDataset shards →
    a dense OS8 and a content-adaptive OS 8→16 network on 2 Ray workers with DeepSpeed → a Ray
    Tune sweep of the edge mask → the mIoU-against-GMac table and Pareto figure in MLflow.
    Rerunning skips the stages that are done and resumes the one that was interrupted."""
    from cadist.cli.demo import closing_lines, run_demo

    summary = run_demo(workdir, overrides, restart, quick=quick)
    if not quick:
        for line in closing_lines(summary):
            click.echo(line)
        return
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
