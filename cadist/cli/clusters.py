"""`cadist submit`, `cadist cluster check`: Ray clusters."""

from __future__ import annotations

import click

from cadist.cli.app import _set_option, main


# -- clusters -----------------------------------------------------------------------------------
@main.command("submit")
@click.argument("job_file", type=click.Path(dir_okay=False))
@_set_option(
    "a job key, e.g. --set train.iterations=1000 (for a sweep: fixed for every trial, or a "
    "top-level sweep key such as num_samples=4)"
)
@click.option(
    "--address",
    default="http://127.0.0.1:8265",
    show_default=True,
    envvar="RAY_API_SERVER_ADDRESS",
    help="The cluster's Ray dashboard (`ray dashboard ray_cluster.yaml` forwards it here).",
)
@click.option(
    "--no-upload",
    is_flag=True,
    help="Use the cadist installed on the cluster instead of uploading this project folder.",
)
@click.option("--no-wait", is_flag=True, help="Return after submitting instead of following it.")
@click.option(
    "--restart",
    is_flag=True,
    help="Start over instead of resuming an earlier run of this job or sweep (kept aside).",
)
def submit_cmd(job_file, overrides, address, no_upload, no_wait, restart):
    """Run JOB_FILE on a Ray cluster through Ray's Jobs API (validated here first). A sweep file
    (one with `search:`) runs `cadist tune` on the cluster, its driver included.

    Paths in the job (shards, storage, MLflow) are read on the cluster: use shared storage, URLs
    or an MLflow server the cluster can reach."""
    from pathlib import Path

    from cadist.config.jobfile import load_job, read_yaml
    from cadist.submit.submission import submit_job, submit_sweep

    where = {"working_dir": None if no_upload else ".", "wait": not no_wait, "echo": click.echo}
    tree = read_yaml(Path(job_file), "job or sweep file", "a mapping")
    if "search" in tree:  # a sweep file
        from cadist.sweep.spec import load_sweep

        sweep, fixed, _ = load_sweep(job_file, overrides)
        submit_sweep(sweep, fixed, str(job_file), address, restart=restart, **where)
        return
    job = load_job(job_file, overrides)
    submit_job(job, str(job_file), address, restart=restart, **where)


@main.command("logs")
@click.argument("name")
@click.option(
    "--address",
    default=None,
    envvar="RAY_API_SERVER_ADDRESS",
    help="The cluster's Ray dashboard, as for `cadist submit` (NAME: a submission id; default "
    "http://127.0.0.1:8265).",
)
@click.option(
    "--storage",
    default=None,
    help="The job's cluster.storage_path (NAME: a job name): the log its driver keeps there, "
    "readable from any machine. Default: ./cadist_runs where it holds job NAME.",
)
@click.option("--follow", "-f", is_flag=True, help="Follow the log until the job ends.")
def logs_cmd(name, address, storage, follow):
    """Print the log of job NAME (its driver's log on the storage path) or of a job `cadist
    submit` started (NAME: the SUBMISSION_ID it printed; Ray's Jobs API), then its state."""
    from cadist.storage.store import Storage
    from cadist.storage.uri import job_key

    if address is None and (storage or Storage("cadist_runs").is_file(job_key(name, "log"))):
        from cadist.submit.status import job_log

        state = job_log(Storage(storage or "cadist_runs"), name, follow, click.echo)
        click.echo(f"{name}: {state}", err=True)
        return
    from cadist.submit.submission import job_logs

    status = job_logs(name, address or "http://127.0.0.1:8265", follow, click.echo)
    click.echo(f"{name}: {status}", err=True)


@main.group("cluster")
def cluster_group():
    """The Ray cluster file (`ray_cluster.yaml`)."""


@cluster_group.command("check")
@click.argument("cluster_file", default="ray_cluster.yaml", type=click.Path(dir_okay=False))
def cluster_check_cmd(cluster_file):
    """Validate a Ray cluster-launcher YAML offline (schema, Ray's defaults, cadist's checks)."""
    from cadist.cluster.clusterfile import check_cluster_file

    r = check_cluster_file(cluster_file)
    click.echo(
        f"{cluster_file}: cluster {r['cluster_name']!r}, provider {r['provider']}, head "
        f"{r['head_node_type']}, up to {r['max_workers']} workers"
    )
    for name, t in r["node_types"].items():
        res = ", ".join(f"{k} {v}" for k, v in t["resources"].items()) or "detected at start"
        click.echo(f"  {name}: resources {res}; workers {t['min_workers']}..{t['max_workers']}")
    for w in r["warnings"]:
        click.echo(f"warning: {w}")
