"""Entry point of a submitted job on the cluster (`python -m cadist.submit.remote`): the resolved job YAML
(or a sweep and its base job, as JSON; or a stop request) arrives in the job's environment
(`CADIST_JOB_YAML`, `CADIST_SWEEP_JSON`, `CADIST_STOP_JSON`), never on a command line."""

from __future__ import annotations

import json
import os
import sys

import yaml

from cadist.config.schema import JobConfig
from cadist.errors import CadistError
from cadist.submit.submission import JOB_ENV, RESTART_ENV, SOURCE_ENV, STOP_ENV, SWEEP_ENV


def main() -> int:
    if os.environ.get(STOP_ENV):
        return _stop(json.loads(os.environ[STOP_ENV]))
    job_text, sweep_text = os.environ.get(JOB_ENV), os.environ.get(SWEEP_ENV)
    if not (job_text or sweep_text):
        print(
            f"error: neither {JOB_ENV} nor {SWEEP_ENV} is set; submit jobs and sweeps with "
            "`cadist submit`",
            file=sys.stderr,
        )
        return 2
    source = os.environ.get(SOURCE_ENV, "<submitted job>")
    restart = os.environ.get(RESTART_ENV) == "1"
    try:
        if sweep_text:
            return _sweep(json.loads(sweep_text), source, restart)
        job = JobConfig.model_validate(yaml.safe_load(job_text))
        from cadist.train.driver import run_training

        # the cluster this job runs on
        r = run_training(job, source, address="auto", restart=restart)
    except CadistError as exn:
        print(f"error: {exn}", file=sys.stderr)
        return 2
    print(f"job {job.name}: {r.metrics}")
    print(f"checkpoint {r.checkpoint}; MLflow run {r.run_id} at {r.tracking_uri}")
    return 0


def _stop(blob: dict) -> int:
    from cadist.submit.status import request_stop

    try:
        request = request_stop(blob["storage"], blob["job"], blob.get("kind"))
    except CadistError as exn:
        print(f"error: {exn}", file=sys.stderr)
        return 2
    what = "sweep" if "sweep" in request else "job"
    print(f"stop requested for {what} {blob['job']}: {json.dumps(request)}")
    return 0


def _sweep(blob: dict, source: str, restart: bool) -> int:
    from cadist.sweep.spec import SweepConfig
    from cadist.sweep.tune import run_loaded_sweep

    sweep = SweepConfig.model_validate(blob["sweep"])
    r = run_loaded_sweep(sweep, blob["job"], source, print, restart, address="auto")
    print(f"sweep {sweep.name}: results {r['results_file']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
