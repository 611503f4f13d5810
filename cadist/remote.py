"""Entry point of a submitted job on the cluster (`python -m cadist.remote`): the resolved job YAML
arrives in the job's environment (`CADIST_JOB_YAML`), never on a command line."""

from __future__ import annotations

import os
import sys

import yaml

from cadist.cluster import JOB_ENV, SOURCE_ENV
from cadist.config import JobConfig
from cadist.errors import CadistError


def main() -> int:
    text = os.environ.get(JOB_ENV)
    if not text:
        print(f"error: {JOB_ENV} is not set; submit jobs with `cadist submit`", file=sys.stderr)
        return 2
    source = os.environ.get(SOURCE_ENV, "<submitted job>")
    try:
        job = JobConfig.model_validate(yaml.safe_load(text))
        from cadist.train.driver import run_training

        r = run_training(job, source, address="auto")  # the cluster this job runs on
    except CadistError as exn:
        print(f"error: {exn}", file=sys.stderr)
        return 2
    print(f"job {job.name}: {r.metrics}")
    print(f"checkpoint {r.checkpoint}; MLflow run {r.run_id} at {r.tracking_uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
