"""A node lost for good on a (simulated) two-node Ray cluster: the run ends with one clear error
within about two start timeouts instead of waiting forever, and rerunning the same job on a
cluster that has the nodes again would resume from the last checkpoint; an elastic job goes on
with the workers left, grows back when a node returns, and stops cleanly on `cadist stop` — with
its storage and shards on object storage (a real S3 API server) and every node in a working
directory of its own, as on a cloud cluster whose nodes share no disk."""

import json
import os
import time
from pathlib import Path

import pytest
import ray
from mlflow.tracking import MlflowClient
from ray.cluster_utils import Cluster

from cadist.config.jobfile import load_job
from cadist.errors import ClusterError
from cadist.storage.store import Storage
from cadist.submit.status import request_stop, wait_for_stop
from cadist.train.plan import plan_training
from cadist.train.resume import latest_checkpoint

from ..conftest import (
    own_state_api,
    registered_checkpoint,
    s3_server,
    tiny_shards,
    train_in_thread,
)

pytestmark = pytest.mark.slow
JOB = Path(__file__).resolve().parents[2] / "jobs" / "demo.yaml"


def _overrides(tmp_path, name: str, seed: int, storage=None, **extra) -> dict:
    """A two-worker tiny job on generated shards, checkpoints every 10 steps; shards and runs
    under `storage` (e.g. s3://bucket), else in `tmp_path`."""
    out = f"{storage}/shards" if storage else None
    train, val = tiny_shards(tmp_path, num_train=8, seed=seed, out=out)
    return {
        "name": name,
        "data.train_shards": str(train),
        "data.val_shards": str(val),
        "data.crop_size": 64,
        "data.num_workers": 0,
        "train.batch_size": 2,
        "train.checkpoint_every": 10,
        "eval.log_images": 0,
        "cluster.num_workers": 2,
        "cluster.storage_path": f"{storage}/runs" if storage else str(tmp_path / "runs"),
        "mlflow.tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
    } | extra


def _lose_a_node_while_training(tmp_path, cluster, node, job, after_loss=None, before_loss=None):
    """Train `job` in a thread, remove `node` once a checkpoint is registered (and
    `before_loss()` returned) from the main thread, as Ray requires, call `after_loss()` (main
    thread) and wait for the run to end; returns {"result"} or {"error"}, and "ended_after_s"
    (seconds from the loss to the end)."""
    t, box = train_in_thread(job)
    run_dir = Storage(job.cluster.storage_path).uri(job.name)
    deadline = time.time() + 240
    while not registered_checkpoint(run_dir) and time.time() < deadline and t.is_alive():
        time.sleep(0.2)
    assert registered_checkpoint(run_dir), box
    if before_loss is not None:
        before_loss()
    cluster.remove_node(node)
    lost = time.time()
    if after_loss is not None:
        after_loss()
    t.join(timeout=300)
    assert not t.is_alive(), "training hung after the node was lost"
    box["ended_after_s"] = time.time() - lost
    return box


def _two_nodes(workdirs, mp):
    """A head and a worker node, each node's processes (raylet, workers) started in a folder of
    its own (`head`, `node1`, … under `workdirs`), as nodes that share no disk."""

    def start(name, fn):
        here = os.getcwd()
        (workdirs / name).mkdir(parents=True, exist_ok=True)
        os.chdir(workdirs / name)
        try:
            return fn()
        finally:
            os.chdir(here)

    head = {"num_cpus": 1, "include_dashboard": True, "dashboard_port": own_state_api(mp)}
    cluster = start("head", lambda: Cluster(initialize_head=True, head_node_args=head))
    node = start("node1", lambda: cluster.add_node(num_cpus=1))
    ray.init(address=cluster.address, runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu"}})
    cluster.start_in = start
    cluster.workdirs = workdirs
    cluster.worker_node = node  # the node a test may lose (the one added last)
    return cluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """One two-node cluster for the module's tests: each loses its worker node and adds one back
    (as `cluster.worker_node`) for the next."""
    mp = pytest.MonkeyPatch()
    mp.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    mp.setenv("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")  # (simulated nodes are never preempted)
    s3_server()  # before the nodes start: they take the S3 credentials from the environment
    c = _two_nodes(tmp_path_factory.mktemp("nodes"), mp)
    try:
        yield c
    finally:
        ray.shutdown()
        c.shutdown()
        mp.undo()


def test_lost_node_is_an_error_and_a_rerun_would_resume(tmp_path, cluster):
    overrides = _overrides(
        tmp_path, "itest-nodeloss", seed=7,
        **{"train.iterations": 400, "train.log_every": 10, "eval.interval": 400,
           "cluster.max_failures": 1, "cluster.start_timeout_s": 8, "deepspeed.zero_stage": 0,
           "mlflow.experiment": "nodeloss"},
    )  # fmt: skip
    job = load_job(JOB, [f"{k}={v}" for k, v in overrides.items()])
    box = _lose_a_node_while_training(tmp_path, cluster, cluster.worker_node, job)
    err = box.get("error")
    assert isinstance(err, ClusterError), box
    assert "could not start its 2 workers within cluster.start_timeout_s 8 s" in str(err)
    assert "1 CPUs and 0 GPUs on 1 node" in str(err) and "resumes from its last checkpoint" in str(
        err
    )
    assert box["ended_after_s"] < 120
    run_id = json.loads((tmp_path / "runs" / ".cadist" / "itest-nodeloss.mlflow.json").read_text())[
        "run_id"
    ]
    client = MlflowClient(overrides["mlflow.tracking_uri"])
    assert client.get_run(run_id).info.status == "FAILED"

    # the node is back: rerunning the job would resume from its last registered checkpoint in
    # the same MLflow run (the rerun's checks, as `cadist train --dry-run`; a real rerun of a
    # resumed job: test_train_ray.py)
    cluster.worker_node = cluster.start_in("node2", lambda: cluster.add_node(num_cpus=1))
    plan = plan_training(job, "itest", address=cluster.address)
    assert plan["start"]["fresh"] is False and plan["start"]["resume_step"] >= 10, plan["start"]
    assert plan["mlflow"]["continues_run"] == run_id
    assert plan["cluster"]["warning"] is None, plan["cluster"]


def test_elastic_job_goes_on_with_the_workers_left_and_grows_back_then_stops_on_request(
    tmp_path, monkeypatch, cluster
):
    """cluster.min_workers 1 … num_workers 2 with ZeRO-2: the node of one worker is lost; Ray Train
    restarts the group from the last checkpoint on the one worker left (the optimizer state split
    for two ranks re-split for one); a node joins again and the group grows back to two workers
    (the state re-split for two) within cluster.elastic_resize_s. Then `cadist stop`: both ranks
    checkpoint at the same step and end, the MLflow run is KILLED, and a rerun would resume there.
    (The job asks for many steps, so the growth happens however slow the machine; the stop ends it.)"""
    bucket = f"s3://{s3_server().bucket()}"
    driver_dir = tmp_path / "driver"
    driver_dir.mkdir()
    monkeypatch.chdir(driver_dir)
    overrides = _overrides(
        tmp_path, "itest-elastic", seed=9, storage=bucket,
        **{"train.iterations": 5000, "train.log_every": 5, "eval.interval": 5000,
           "cluster.min_workers": 1, "cluster.max_failures": 2, "cluster.elastic_resize_s": 2,
           # Ray Train's first restart may still count the lost node and wait this long for it
           "cluster.start_timeout_s": 20,
           "deepspeed.zero_stage": 2, "mlflow.experiment": "elastic"},
    )  # fmt: skip
    job = load_job(JOB, [f"{k}={v}" for k, v in overrides.items()])
    client = MlflowClient(overrides["mlflow.tracking_uri"])
    storage = overrides["cluster.storage_path"]
    store = Storage(storage)

    def workers_seen():
        run_id = store.read_json(".cadist/itest-elastic.mlflow.json")["run_id"]
        hist = client.get_metric_history(run_id, "train/workers")
        return [int(m.value) for m in sorted(hist, key=lambda m: m.timestamp)]

    def wait_for(counts, seconds):
        deadline = time.time() + seconds
        while time.time() < deadline and counts != _changes(workers_seen()):
            time.sleep(0.2)

    def started_with_two():  # (else say so now, not after waiting out the waits below)
        deadline = time.time() + 60
        while not workers_seen() and time.time() < deadline:
            time.sleep(0.2)
        if workers_seen()[:1] != [2]:
            request_stop(storage, job.name)  # (the run ends at its next report)
            pytest.fail(f"the elastic job started with workers {workers_seen()}, not 2")

    def node_returns_then_stop():
        wait_for([2, 1], 180)
        cluster.worker_node = cluster.start_in("node3", lambda: cluster.add_node(num_cpus=1))
        wait_for([2, 1, 2], 240)
        request_stop(storage, job.name)  # also if it never grew: the assertions below tell
        box["stopped_at"] = wait_for_stop(storage, job.name, 300)  # `cadist stop --wait`

    # the previous test's run may still hold a CPU while Ray tears it down: an elastic job would
    # start with the one worker that fits (and grow), not the two this test is about
    deadline = time.time() + 120
    while ray.available_resources().get("CPU", 0) < 2 and time.time() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("CPU", 0) >= 2, ray.available_resources()
    box = {}
    box |= _lose_a_node_while_training(
        tmp_path, cluster, cluster.worker_node, job, node_returns_then_stop, started_with_two
    )
    assert "error" not in box, box
    r = box["result"]
    step = r.metrics["step"]
    assert box["stopped_at"] == step  # the stop waited for the job's last checkpoint
    assert r.stopped and "stopped" not in r.metrics and 10 < step < 5000, r.metrics
    run = client.get_run(r.run_id)
    assert run.info.status == "KILLED" and run.data.tags["cadist.stopped_at_step"] == str(step)
    workers = [
        (m.step, int(m.value))
        for m in sorted(
            client.get_metric_history(r.run_id, "train/workers"), key=lambda m: m.timestamp
        )
    ]
    assert _changes([w for _, w in workers]) == [2, 1, 2], workers
    assert workers[-1] == (step, 2), workers  # both ranks stopped at the step they agreed on
    resumed = [
        m.value
        for m in sorted(
            client.get_metric_history(r.run_id, "train/resumed_from_step"),
            key=lambda m: m.timestamp,
        )
    ]
    # (the second from the same step as the first where the group grew back before its next
    # checkpoint: a busy machine)
    assert len(resumed) == 2 and resumed[0] >= 10 and resumed[1] >= resumed[0], resumed
    loss = [m.value for m in client.get_metric_history(r.run_id, "train/loss")]
    assert all(v == v and v < 10 for v in loss)  # finite: the re-split state trained on
    assert latest_checkpoint(f"{storage}/{job.name}")[0] == step
    assert not store.exists(".cadist/itest-elastic.stop.json")
    # nothing on any node's disk, nor the driver's: all of it is on S3
    assert store.latest_checkpoint(job.name) == (step, f"{storage}/{job.name}/step_{step:08d}")
    assert store.is_file(".cadist/itest-elastic.yaml")
    left = [p for p in cluster.workdirs.rglob("*")] + list(driver_dir.iterdir())
    assert not [p for p in left if p.is_file()], left
    assert "last.pt" not in {
        a.path.split("/")[-1] for a in client.list_artifacts(r.run_id, "checkpoints")
    }
    plan = plan_training(job, "itest", address=cluster.address)
    assert plan["start"]["resume_step"] == step and plan["mlflow"]["continues_run"] == r.run_id


def _changes(values: list) -> list:
    """`values` without repeats in a row: [2, 2, 1, 1, 2] → [2, 1, 2]."""
    return [v for i, v in enumerate(values) if i == 0 or v != values[i - 1]]
