"""Running jobs on a Ray cluster: the cluster file (`ray_cluster.yaml`, Ray's cluster-launcher format)
and job submission through Ray's Jobs API.

`cadist submit` validates the job (or sweep) here, then submits a constant entry point
(`python -m cadist.submit.remote`) with the job YAML (or the sweep and its base job as JSON) in the job's
environment — no shell command is ever built from the job or its values — and the project folder
as the job's working directory.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from cadist.config.schema import JobConfig
from cadist.errors import CadistError, ClusterError, ConfigError
from cadist.redact import has_secret
from cadist.storage.uri import location_env
from cadist.sweep.spec import SweepConfig

ENTRYPOINT = "python -m cadist.submit.remote"
JOB_ENV = "CADIST_JOB_YAML"
SWEEP_ENV = "CADIST_SWEEP_JSON"
SOURCE_ENV = "CADIST_JOB_SOURCE"
RESTART_ENV = "CADIST_RESTART"
STOP_ENV = "CADIST_STOP_JSON"  # `cadist stop --address`: {"job", "storage"}
#: never uploaded with the project (environments, data, outputs)
UPLOAD_EXCLUDES = [
    ".venv/",
    ".git/",
    "shards/*/",
    "data/",
    "cadist_runs/",
    "mlruns/",
    "*.db",
    "bench-out/",
    "**/__pycache__/",
    "*.tar",
    "*.pth",
    "*.pt",
]


def _no_credentials(tree: dict, source: str) -> None:
    """A submitted job is stored by Ray (its runtime_env, the dashboard): no credentials in it."""
    keys = has_secret(tree)
    if keys:
        raise ConfigError(
            f"{source}: {', '.join(keys)} carries a credential (a URL's user:password, a presigned "
            f"URL's signature, or a secret value), and a submitted job is stored by Ray where "
            f"everyone with the dashboard reads it; give the cluster the access instead: put the "
            f"file on the storage path (read with the nodes' instance role / service account) or "
            f"in the nodes' own environment (netrc, AWS profile), and name it without the "
            f"credential (see docs/security.md)"
        )


def submission_env(job: JobConfig, source: str, restart: bool = False) -> dict[str, str]:
    _no_credentials(job.model_dump(), source)
    return {JOB_ENV: job.to_yaml(), SOURCE_ENV: source, RESTART_ENV: "1" if restart else ""}


def sweep_submission_env(
    sweep: SweepConfig, fixed: dict, source: str, restart: bool = False
) -> dict[str, str]:
    _no_credentials({"sweep": sweep.model_dump(), "job": fixed}, source)
    blob = json.dumps({"sweep": sweep.model_dump(), "job": fixed})
    return {SWEEP_ENV: blob, SOURCE_ENV: source, RESTART_ENV: "1" if restart else ""}


def submit_job(
    job: JobConfig,
    source: str,
    address: str,
    working_dir: str | Path | None = ".",
    wait: bool = True,
    echo: Callable[[str], None] = print,
    timeout_s: float | None = None,
    restart: bool = False,
) -> tuple[str, str]:
    """Submit `job` to the Ray cluster whose dashboard is at `address`; with `wait`, follow its
    logs and return (submission id, final status). `working_dir=None`: use the cadist installed
    on the cluster instead of uploading this project; `restart`: as `cadist train --restart`."""
    what = _Submission(
        f"cadist-{job.name}",
        submission_env(job, source, restart),
        {"cadist_job": job.name, "cadist_source": source},
        (job.mlflow.tracking_uri or "") if job.mlflow.enabled else None,
    )
    return _submit(what, address, working_dir, wait, echo, timeout_s)


def submit_sweep(
    sweep: SweepConfig,
    fixed: dict,
    source: str,
    address: str,
    working_dir: str | Path | None = ".",
    wait: bool = True,
    echo: Callable[[str], None] = print,
    timeout_s: float | None = None,
    restart: bool = False,
) -> tuple[str, str]:
    """Submit a sweep (`load_sweep`'s sweep and base job tree): `cadist tune` run on the cluster,
    whose driver outlives this machine's connection; otherwise as `submit_job`."""
    mlflow = fixed.get("mlflow", {})
    what = _Submission(
        f"cadist-sweep-{sweep.name}",
        sweep_submission_env(sweep, fixed, source, restart),
        {"cadist_sweep": sweep.name, "cadist_source": source},
        (mlflow.get("tracking_uri") or "") if mlflow.get("enabled", True) else None,
    )
    return _submit(what, address, working_dir, wait, echo, timeout_s)


def submit_stop(
    name: str,
    storage: str,
    address: str,
    working_dir: str | Path | None = ".",
    echo: Callable[[str], None] = print,
    timeout_s: float | None = None,
    kind: str | None = None,
) -> tuple[str, str]:
    """`cadist stop --address`: ask job or sweep `name` (`kind` "job", "sweep" or None: whichever
    has the name) under `storage` (a path on the cluster) to stop, from a small Ray job on the
    cluster, for storage this machine does not see. Follows it; returns (submission id, final
    status), or one error with its log's command."""
    what = _Submission(
        f"cadist-stop-{name}",
        {STOP_ENV: json.dumps({"job": name, "storage": storage, "kind": kind})},
        {"cadist_stop": name},
        None,
    )
    return _submit(what, address, working_dir, True, echo, timeout_s)


@dataclass
class _Submission:
    prefix: str  # of the submission id
    env: dict[str, str]
    metadata: dict[str, str]
    tracking_uri: str | None  # None: MLflow off; "": the default store


def _submit(
    what: _Submission,
    address: str,
    working_dir: str | Path | None,
    wait: bool,
    echo: Callable[[str], None],
    timeout_s: float | None,
) -> tuple[str, str]:
    from ray.job_submission import JobStatus

    uri = what.tracking_uri
    if uri is not None and not uri.startswith(("http://", "https://", "databricks")):
        echo(
            f"warning: mlflow.tracking_uri {uri or '(default ./mlflow.db)'} is a file on the "
            "cluster (in the job's working directory if relative); set it to an MLflow server "
            "the cluster reaches to browse the run from here"
        )
    # where object storage is (endpoint, region; never credentials, which are the nodes' own)
    runtime_env: dict = {"env_vars": location_env() | what.env}
    if working_dir is not None:
        root = Path(working_dir).resolve()
        if not (root / "cadist" / "__init__.py").is_file():
            raise ConfigError(
                f"{root}: not a cadist project folder (no cadist/ package) to upload; run from the "
                "project root or pass --no-upload to use the cadist installed on the cluster"
            )
        runtime_env |= {"working_dir": str(root), "excludes": UPLOAD_EXCLUDES}
    client = _client(address)
    sid = _submit_when_ready(
        client,
        echo,
        entrypoint=ENTRYPOINT,
        runtime_env=runtime_env,
        submission_id=f"{what.prefix}-{time.strftime('%Y%m%d-%H%M%S')}",
        metadata=what.metadata,
    )
    echo(f"submitted {sid} to {address}")
    if not wait:
        return sid, str(client.get_job_status(sid))
    asyncio.run(_follow(client, sid, echo, timeout_s))
    status = client.get_job_status(sid)
    if status != JobStatus.SUCCEEDED:
        # Ray's reason: its first line ("…failed with exit code 2", "…supervisor actor died")
        why = (client.get_job_info(sid).message or "").strip().split("\n")[0]
        why = why.split(", last available logs")[0].rstrip(":. ")
        raise CadistError(
            f"job {sid} ended {status}"
            + (f" ({why})" if why else "")
            + f"; its log: `ray job logs {sid} --address {address}`"
        )
    return sid, str(status)


#: how long a submission waits for the head's job agent (it starts after the dashboard, so a
#: cluster just brought up answers "No available agent to submit job" for a while)
AGENT_WAIT_S = 60.0


def _submit_when_ready(client, echo: Callable[[str], None], **submission) -> str:
    """`client.submit_job(**submission)`, retried while the cluster's job agent is not up yet."""
    deadline = time.monotonic() + AGENT_WAIT_S
    said = False
    while True:
        try:
            return client.submit_job(**submission)
        except RuntimeError as exn:
            if "No available agent" not in str(exn) or time.monotonic() > deadline:
                raise
            if not said:
                echo("waiting for the cluster's job agent to start…")
                said = True
            time.sleep(1.0)


def ray_token() -> tuple[str, str] | None:
    """(token, where it came from) the way Ray looks for it: $RAY_AUTH_TOKEN, the file
    $RAY_AUTH_TOKEN_PATH names, ~/.ray/auth_token; None where there is none."""
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return os.environ["RAY_AUTH_TOKEN"].strip(), "$RAY_AUTH_TOKEN"
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    try:
        token = path.read_text().strip()
    except OSError:
        return None
    return (token, str(path)) if token else None


def _client(address: str):
    """Ray's job client for the dashboard at `address`, sending the cluster's auth token. One
    probe first (≤ 10 s): an address that is no URL, nothing answering, a missing or refused token
    are each one error that says what to do."""
    import urllib.error
    import urllib.request

    from ray.job_submission import JobSubmissionClient

    pr = urlparse(address)
    if pr.scheme not in ("http", "https") or not pr.hostname:
        raise ConfigError(
            f"--address {address!r}: expected the Ray dashboard's URL, e.g. http://127.0.0.1:8265 "
            f"(`ray dashboard ray_cluster.yaml` forwards it there)"
        )
    found = ray_token()
    headers = {"Authorization": f"Bearer {found[0]}"} if found else {}
    url = address.rstrip("/") + "/api/jobs/"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10):
            pass
    except urllib.error.HTTPError as exn:
        fix = (
            "copy the head's ~/.ray/auth_token to this machine's ~/.ray/auth_token (or set "
            "RAY_AUTH_TOKEN; `ray get-auth-token` on the head prints it)"
        )
        if exn.code == 401:
            raise ClusterError(
                f"Ray job API at {address} requires the cluster's auth token and none was found "
                f"here ($RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token): {fix}"
            ) from None
        if exn.code == 403:
            raise ClusterError(
                f"Ray job API at {address} refused the auth token from {found[0] and found[1]}: "
                f"it is not this cluster's; {fix}"
            ) from None
        raise ClusterError(
            f"Ray job API at {address}: HTTP {exn.code} ({exn.reason}) — is this a Ray dashboard?"
        ) from None
    except (urllib.error.URLError, OSError) as exn:
        raise ClusterError(
            f"Ray job API at {address} does not answer ({getattr(exn, 'reason', exn)}); is the "
            "cluster up and the dashboard forwarded (`ray dashboard ray_cluster.yaml`)?"
        ) from None
    try:
        return JobSubmissionClient(address, headers=headers)
    except Exception as exn:
        raise ClusterError(
            f"Ray job API at {address}: {type(exn).__name__}: {str(exn).splitlines()[0]}; is the "
            "cluster up and the dashboard forwarded (`ray dashboard ray_cluster.yaml`)?"
        ) from None


def job_logs(sid: str, address: str, follow: bool, echo: Callable[[str], None]) -> str:
    """Print the log of submission `sid` (`cadist logs`; with `follow`, until it ends) and return
    its status. An id the cluster does not know is one error naming the ids it has."""
    client = _client(address)
    known = [j.submission_id for j in client.list_jobs() if j.submission_id]
    if sid not in known:
        listed = ", ".join(sorted(k for k in known if k.startswith("cadist-"))[-5:]) or "none"
        raise ConfigError(
            f"{address}: no submission {sid!r} (cadist's latest: {listed}); pass an id that "
            f"`cadist submit` printed"
        )
    if follow:
        asyncio.run(_follow(client, sid, echo, None))
    else:
        for line in client.get_job_logs(sid).splitlines():
            echo(line)
    return str(client.get_job_status(sid))


async def _follow(client, sid: str, echo, timeout_s: float | None) -> None:
    seen = 0

    async def tail():
        nonlocal seen
        async for chunk in client.tail_job_logs(sid):
            for line in chunk.splitlines():
                echo(line)
                seen += 1

    await asyncio.wait_for(tail(), timeout_s)
    # the log stream can close before the driver's last lines reached it: the stored log has them
    for line in client.get_job_logs(sid).splitlines()[seen:]:
        echo(line)
