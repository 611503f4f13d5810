"""Training does not wait on a tracking server that stops answering: SpooledTracker against a real
`mlflow server` that is killed and started again."""

import time

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from cadist.tracking.runs import Tracker, new_run
from cadist.tracking.spool import SpooledTracker, system_metrics
from tests.conftest import MlflowServer

RETRY = 20.0  # seconds between tries while the server is down


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory):
    """One server for the module (a start takes 10-20 s here); each test gets it answering."""
    s = MlflowServer(tmp_path_factory.mktemp("mlflow"))
    yield s
    s.stop()


@pytest.fixture()
def server(shared_server, monkeypatch):
    for k, v in {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",
    }.items():
        monkeypatch.setenv(k, v)
    if shared_server.proc is None:  # the first test, or one that ended while it was down
        shared_server.start()
    return shared_server


def test_records_wait_in_the_spool_while_the_server_is_down(tmp_path, server):
    run = new_run(server.uri, "spool", "outage", {})
    said = []
    t = SpooledTracker(server.uri, run, tmp_path / "spool", echo=said.append, retry_s=RETRY)
    t.log_metrics({"train/loss": 1.0}, 1)
    assert not (tmp_path / "spool").exists()  # sent at once while the server answers

    server.stop()
    (tmp_path / "best.pt").write_bytes(b"weights")
    t.log_metrics({"train/loss": 0.5, "val/miou": 0.25}, 2)
    t.log_text("a,b\n", "eval/iou_last.csv")
    t.log_image(np.full((4, 6, 3), 200, np.uint8), "predictions/step_2/x.png")
    t.log_artifact(tmp_path / "best.pt", "checkpoints")
    t.log_metrics({"train/loss": 0.25}, 3)
    failed_at = time.monotonic()  # one failed try, then straight to the spool (no waiting)
    (tmp_path / "best.pt").unlink()  # the worker's temporary file is gone: the copy is spooled
    assert t.pending_count() == 5
    assert len(said) == 1 and "does not answer at step 2" in said[0]
    assert t.flush() is False  # within retry_s: not even tried

    server.start()
    time.sleep(max(0.0, failed_at + RETRY - time.monotonic()))
    t.log_metrics({"train/loss": 0.125}, 4)  # the first call after retry_s sends the spool first
    assert not (tmp_path / "spool").exists()
    assert "answers again: sent the 5 records kept since step 2" in said[-1]

    c = MlflowClient(server.uri)
    loss = [(m.step, m.value) for m in c.get_metric_history(run, "train/loss")]
    assert sorted(loss) == [(1, 1.0), (2, 0.5), (3, 0.25), (4, 0.125)]
    assert c.get_run(run).data.metrics["val/miou"] == 0.25
    arts = {a.path for p in ("", "eval", "predictions/step_2", "checkpoints")
            for a in c.list_artifacts(run, p)}  # fmt: skip
    assert {"eval/iou_last.csv", "predictions/step_2/x.png", "checkpoints/best.pt"} <= arts
    got = c.download_artifacts(run, "checkpoints/best.pt", str(tmp_path))
    assert open(got, "rb").read() == b"weights"
    img = c.download_artifacts(run, "predictions/step_2/x.png", str(tmp_path))
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(img)), np.full((4, 6, 3), 200, np.uint8))


def test_a_rejected_request_is_not_spooled(tmp_path, server):
    run = new_run(server.uri, "spool", "rejected", {})
    Tracker(server.uri, run).finish()
    t = SpooledTracker(server.uri, "0" * 32, tmp_path / "spool")  # no such run: a 404, not down
    with pytest.raises(Exception, match="(?i)run"):
        t.log_metrics({"train/loss": 1.0}, 1)
    assert not (tmp_path / "spool").exists()


def test_the_driver_ends_with_one_error_while_records_still_wait(tmp_path, server):
    """Training finished but the server is down at the end: one error naming the waiting records
    and what to do; once the server answers, the same finishing step sends them and ends the run."""
    from cadist.config.jobfile import load_job
    from cadist.errors import TrackingError
    from cadist.train.driver import _finish_tracking
    from tests.unit.test_resume import JOBS

    job = load_job(f"{JOBS}/demo.yaml", ["name=ends-down"])
    run = new_run(server.uri, "spool", "ends-down", {})
    spool = tmp_path / "spool"
    SpooledTracker(server.uri, run, spool)._append(
        {"op": "metrics", "metrics": {"val/miou": 0.5}, "step": 40, "ts": 1}
    )
    server.stop()
    with pytest.raises(TrackingError, match=r"training finished .* 1 records wait in .*rerun"):
        _finish_tracking(job, server.uri, run, Tracker(server.uri, run), spool, "ck/step_40")
    server.start()
    _finish_tracking(job, server.uri, run, Tracker(server.uri, run), spool, "ck/step_40")
    c = MlflowClient(server.uri)
    assert c.get_run(run).info.status == "FINISHED" and not spool.exists()
    assert [(m.step, m.value) for m in c.get_metric_history(run, "val/miou")] == [(40, 0.5)]


def test_system_metrics_sampling_comes_back_after_an_outage(tmp_path, server):
    """MLflow's sampler stops for good when the server does not answer; cadist's starts it again
    once the server answers, its steps continuing after the last one sent."""

    def steps():
        hist = MlflowClient(server.uri).get_metric_history(
            run, "system/node0/cpu_utilization_percentage"
        )
        return [m.step for m in hist]

    def wait_for(cond, what, timeout=60.0):
        deadline = time.monotonic() + timeout
        while not cond():
            assert time.monotonic() < deadline, what
            time.sleep(0.2)

    run = new_run(server.uri, "spool", "sysmet", {})
    sampler = system_metrics(server.uri, run, "node0", interval_s=0.3, retry_s=1.0)
    try:
        wait_for(lambda: len(steps()) >= 2, "no system metrics while the server answers")
        server.stop()
        wait_for(sampler._stopped, "MLflow's sampler did not stop while the server was down")
        server.start()
        before = max(steps())
        wait_for(lambda: max(steps()) >= before + 2, "sampling did not come back")
        assert sampler.restarts == 1
    finally:
        sampler.finish()
    got = steps()
    assert len(got) == len(set(got)), f"a step logged twice: {sorted(got)}"
    assert min(got) == 0 and max(got) >= before + 2  # the restart did not begin again at 0
    assert all(
        0 <= v <= 100
        for v in [
            m.value
            for m in MlflowClient(server.uri).get_metric_history(
                run, "system/node0/cpu_utilization_percentage"
            )
        ]
    )


def test_s3_artifact_root_and_a_spool_on_s3(tmp_path, monkeypatch):
    """MLflow with its artifacts on object storage (`mlflow server --artifacts-destination
    s3://…`, a real S3 API server) and a run's spool on the storage path in the same bucket: the
    best weights land in the bucket through the server and come back by `runs:/` URI; while the
    server is down the records wait as objects under the spool, and are sent (and removed) once
    it answers."""
    from cadist.storage.store import Storage
    from cadist.tracking.sources import resolve_weights
    from tests.conftest import s3_server

    s3 = s3_server()
    bucket = s3.bucket()
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", s3.endpoint)  # read by the server's S3 client
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    server = MlflowServer(tmp_path, artifacts=f"s3://{bucket}/mlartifacts").start()
    try:
        run = new_run(server.uri, "s3", "on-s3", {})
        spool = f"s3://{bucket}/runs/.cadist/on-s3.mlflow-spool/{run}"
        t = SpooledTracker(server.uri, run, spool, echo=lambda m: None, retry_s=0.0)
        (tmp_path / "best.pt").write_bytes(b"weights-1")
        t.log_metrics({"val/miou": 0.25}, 10)
        t.log_artifact(tmp_path / "best.pt", "checkpoints")
        stored = s3.keys(bucket, "mlartifacts/")
        assert [k for k in stored if k.endswith(f"{run}/artifacts/checkpoints/best.pt")], stored
        assert resolve_weights(f"runs:/{run}", server.uri).read_bytes() == b"weights-1"
        assert s3.keys(bucket, "runs/") == []  # nothing spooled while the server answers

        server.stop()
        (tmp_path / "best.pt").write_bytes(b"weights-2")
        t.log_metrics({"val/miou": 0.5}, 20)
        t.log_artifact(tmp_path / "best.pt", "checkpoints")
        assert t.pending_count() == 2
        waiting = s3.keys(bucket, "runs/")
        assert len([k for k in waiting if "/q/" in k]) == 2
        assert [k for k in waiting if k.endswith("/best.pt")]
        # another process (a restarted worker, the driver) finds the same spool on S3
        assert SpooledTracker(server.uri, run, spool).pending_count() == 2

        server.start()
        assert t.flush(force=True) is True
        assert s3.keys(bucket, "runs/") == [] and not Storage(spool).is_dir()
        c = MlflowClient(server.uri)
        assert [(m.step, m.value) for m in c.get_metric_history(run, "val/miou")] == [
            (10, 0.25), (20, 0.5)]  # fmt: skip
        assert resolve_weights(f"runs:/{run}", server.uri).read_bytes() == b"weights-2"
    finally:
        server.stop()
