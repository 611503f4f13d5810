"""`cadist status` and `cadist stop`: the jobs and sweeps a storage path holds, and asking one to end."""

from __future__ import annotations

from pathlib import Path

import click

from cadist.cli.app import _print_json, _set_option, main


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
    from cadist.config.jobfile import load_job, read_yaml, validate_job

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
    from cadist.storage.store import Storage
    from cadist.storage.uri import META
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
