"""A run that loses its object storage mid-training (the S3 server goes away, as an outage) stops
with one clear error after retrying, and — once the storage answers again — rerunning the same job
resumes from its last registered checkpoint in the same MLflow run: nothing is lost. SeaweedFS
keeps its data on disk, so the outage ends with the bucket as it was."""

import os
import time
from pathlib import Path

import pytest
import ray
from mlflow.tracking import MlflowClient

from cadist.config.jobfile import load_job
from cadist.storage.store import Storage
from cadist.storage.uri import StorageError, forget_filesystems
from cadist.train.driver import run_training

from ..conftest import SeaweedServer, own_state_api, tiny_shards, train_in_thread

pytestmark = pytest.mark.slow
JOB = Path(__file__).resolve().parents[2] / "jobs" / "demo.yaml"


def test_a_run_that_loses_its_storage_stops_then_resumes_without_loss(tmp_path, monkeypatch):
    weed = SeaweedServer(tmp_path / "seaweed").start(bucket="runs")
    for k, v in weed.env.items():  # before Ray starts: its nodes' credentials
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("CADIST_STORAGE_RETRIES", "2")
    monkeypatch.setenv("CADIST_STORAGE_TIMEOUT_S", "3")
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    monkeypatch.setenv("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")  # (as for cadist's local Ray)
    forget_filesystems()
    train, val = tiny_shards(tmp_path, seed=5, out="s3://runs/shards")
    overrides = {
        "name": "outage", "data.train_shards": train, "data.val_shards": val,
        "data.crop_size": 64, "data.num_workers": 0, "train.batch_size": 2,
        "train.iterations": 2000, "train.log_every": 5, "train.checkpoint_every": 5,
        "eval.interval": 2000, "eval.log_images": 0, "cluster.num_workers": 1,
        "cluster.max_failures": 0, "cluster.storage_path": "s3://runs/runs",
        "mlflow.tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "mlflow.experiment": "outage",
    }  # fmt: skip
    job = load_job(JOB, [f"{k}={v}" for k, v in overrides.items()])
    store = Storage("s3://runs/runs")
    ray.init(address="local", num_cpus=2, dashboard_port=own_state_api(monkeypatch),
             runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu"}})  # fmt: skip
    try:
        t, box = train_in_thread(job)
        deadline = time.time() + 240
        while store.latest_checkpoint("outage") is None and time.time() < deadline:
            assert t.is_alive(), box
            time.sleep(0.3)
        before = store.latest_checkpoint("outage")
        assert before is not None, "no checkpoint was registered"
        weed.stop()  # the outage
        t.join(300)
        assert not t.is_alive(), "training hung after the storage went away"
        err = box.get("error")
        assert isinstance(err, StorageError), box
        assert str(err).startswith("training stopped: s3://runs/") and (
            f"the storage endpoint {weed.endpoint} does not answer (retried with backoff)"
            in str(err)
            and "training resumes from its last checkpoint" in str(err)
        ), str(err)

        weed.start()  # the storage answers again, with everything it held
        forget_filesystems()
        last = store.latest_checkpoint("outage")
        assert last[0] >= before[0]
        again = load_job(
            JOB, [f"{k}={v}" for k, v in (overrides | {"train.iterations": last[0] + 5}).items()]
        )
        r = run_training(again, "itest")
        assert r.metrics["step"] == last[0] + 5
        client = MlflowClient(overrides["mlflow.tracking_uri"])
        resumed = client.get_metric_history(r.run_id, "train/resumed_from_step")
        assert resumed[-1].value == last[0]  # from the newest registered checkpoint: no loss
        (run,) = client.search_runs([client.get_experiment_by_name("outage").experiment_id])
        assert run.info.run_id == r.run_id and run.info.status == "FINISHED"  # the same run
    finally:
        ray.shutdown()
        weed.stop()
        forget_filesystems()
        os.environ.pop("CADIST_STORAGE_RETRIES", None)
