"""Sweeps through Ray Tune on a real local Ray: trials are ordinary cadist jobs (Ray Train +
DeepSpeed), nested MLflow runs under the sweep's run, a multi-objective Pareto front."""

import json
import os
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from cadist.sweep.files import ENDED

from ..conftest import registered_checkpoint, tiny_shards

ROOT = Path(__file__).resolve().parents[2]
SEED = 6  # the random searcher's seed in the ASHA test: lr_head 0.2, then 1e-9
pytestmark = pytest.mark.slow


def _fixed(train, val, iterations: int, log_every: int, storage: str = "runs") -> dict:
    """The sweeps' fixed overrides: the tiny edge model on generated shards, one CPU worker,
    checkpoints every 4 steps, one evaluation at the end."""
    return {
        "model.name": "deeplabv3_batch_ap_resnet_tiny",
        "data.train_shards": str(train),
        "data.val_shards": str(val),
        "data.crop_size": 64,
        "data.num_workers": 0,
        "train.iterations": iterations,
        "train.batch_size": 2,
        "train.log_every": log_every,
        "train.checkpoint_every": 4,
        "eval.interval": iterations,
        "eval.log_images": 0,
        "cluster.num_workers": 1,
        "cluster.storage_path": storage,
        "deepspeed.zero_stage": 0,
        "mlflow.experiment": "sweeps",
    }


def _check_pareto_front(trials: list[dict], table: list[str]) -> None:
    """The front is exactly the trials no other trial beats in both objectives; the printed table
    (header + one line per trial) marks them with *."""
    on = [t for t in trials if t["pareto"]]
    assert on
    for t in on:
        m = t["metrics"]
        assert not any(
            o["metrics"]["val/miou"] >= m["val/miou"]
            and o["metrics"]["macs/backbone_gmac"] <= m["macs/backbone_gmac"]
            and o is not t
            and (o["metrics"]["val/miou"], o["metrics"]["macs/backbone_gmac"])
            != (m["val/miou"], m["macs/backbone_gmac"])
            for o in trials
        )
    for t in trials:
        if not t["pareto"]:  # beaten by some trial of the front
            m = t["metrics"]
            assert any(
                o["metrics"]["val/miou"] >= m["val/miou"]
                and o["metrics"]["macs/backbone_gmac"] <= m["macs/backbone_gmac"]
                for o in on
            )
    assert table[0].endswith("pareto") and len(table) == len(trials) + 1
    assert sum(line.endswith("*") for line in table[1:]) == len(on)


def _presigned_weights(tmp_path, bucket: str, model: str) -> tuple[str, list[str]]:
    """Start weights of `model` in `bucket` behind a presigned (SigV4) URL; returns the URL and
    its secrets (signature, credential)."""
    from urllib.parse import parse_qs, urlsplit

    import boto3
    import botocore.config
    import torch

    from cadist.config.jobfile import load_job
    from cadist.nets.build import build_model
    from cadist.nets.weights import save_weights

    from ..conftest import s3_server

    job = load_job(ROOT / "jobs" / "demo.yaml", [f"model.name={model}"])
    torch.manual_seed(3)
    save_weights(build_model(**job.model.build_kwargs()), tmp_path / "init.pt", model=model)
    c = boto3.client("s3", endpoint_url=s3_server().endpoint, region_name="us-east-1",
                     config=botocore.config.Config(signature_version="s3v4"))  # fmt: skip
    c.upload_file(str(tmp_path / "init.pt"), bucket, "weights/init.pt")
    url = c.generate_presigned_url(
        "get_object", Params={"Bucket": bucket, "Key": "weights/init.pt"}, ExpiresIn=3600
    )
    q = parse_qs(urlsplit(url).query)
    return url, [q["X-Amz-Signature"][0], q["X-Amz-Credential"][0]]


def _s3_bytes(server, bucket: str, key: str) -> bytes:
    import boto3

    c = boto3.client("s3", endpoint_url=server.endpoint, region_name="us-east-1")
    return c.get_object(Bucket=bucket, Key=key)["Body"].read()


def _sweep_dirs(runs, name: str) -> list[str]:
    """The trial run folders of sweep `name` under `runs` (a folder or a Storage), by name."""
    from cadist.storage.store import Storage

    store = runs if isinstance(runs, Storage) else Storage(runs)
    return [n for n in store.list("", f"{name}-*") if ".before-" not in n and store.is_dir(n)]


def test_killed_then_stopped_sweep_resumes_keeping_finished_trials(tmp_path, monkeypatch):
    """`cadist tune` killed (SIGKILL to its whole process group, Ray included) while the second
    trial trains; the rerun keeps the first trial and continues the second from its checkpoint in
    the same MLflow run, until `cadist stop` ends it (and the sweep) at its next progress report;
    the next rerun finishes it from there. A changed sweep file is refused unless --restart. The
    finished sweep: its trials as MLflow runs under the sweep's run (the default store, ./mlflow.db
    where `cadist tune` runs), each with its own values as params, and the Pareto front of the two
    objectives. Its storage path is on object storage (a real S3 API server): Tune's experiment,
    the trials' checkpoints and cadist's sweep state all resume from there."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from click.testing import CliRunner

    from cadist.cli import main
    from cadist.storage.store import Storage
    from cadist.submit.status import sweeps_in
    from cadist.sweep.outcome import _run_of

    from ..conftest import s3_server

    ITERATIONS = 48  # noqa: N806
    started = time.time()
    train, val = tiny_shards(tmp_path, seed=6)
    bucket = s3_server().bucket()
    runs = Storage(f"s3://{bucket}/runs")
    # the trials start from weights behind a presigned URL: its signature and credential are
    # secrets that must appear nowhere the sweep writes (checked at the end)
    weights_url, secrets = _presigned_weights(tmp_path, bucket, "deeplabv3_batch_ap_resnet_tiny")
    sweep = {
        "name": "itest_resume",
        "job": str(ROOT / "jobs" / "demo.yaml"),
        # long enough that the killed trial has progress reports left once resumed (the kill
        # lands once Ray Train registered a checkpoint: step 4 to 20 seen)
        "set": _fixed(train, val, iterations=ITERATIONS, log_every=4, storage=runs.uri())
        | {"model.weights": weights_url},
        "search": {
            "model.edge_threshold": {"loguniform": [0.02, 2.0]},
            "model.trimap_width": {"choice": [1, 21]},
        },
        "objectives": {"val/miou": "max", "macs/backbone_gmac": "min"},
        "num_samples": 3,
        "seed": 1,
    }
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env["PYTHONPATH"] = str(ROOT)
    cmd = [sys.executable, "-m", "cadist", "tune", "sweep.yaml"]
    log = open(tmp_path / "first.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    deadline = time.time() + 300
    try:
        order = []  # trial run folders in the order they appear (trial ids are random)
        while time.time() < deadline:  # until Ray Train registered a checkpoint of the 2nd trial
            order += [d for d in _sweep_dirs(runs, "itest_resume") if d not in order]
            if len(order) == 2 and registered_checkpoint(runs.uri(order[1])):
                break
            assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            time.sleep(0.5)
        else:
            pytest.fail(
                "the second trial never checkpointed:\n"
                + (tmp_path / "first.log").read_text()[-3000:]
            )
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    jobs_before = set(_sweep_dirs(runs, "itest_resume"))
    assert not runs.exists(".cadist/sweep-itest_resume.results.json")

    # a changed sweep is refused with the keys that changed
    changed = dict(sweep, num_samples=4)
    (tmp_path / "changed.yaml").write_text(yaml.safe_dump(changed))
    monkeypatch.chdir(tmp_path)  # (in this process: the refusal comes before Ray starts)
    bad = CliRunner().invoke(main, ["tune", "changed.yaml"])
    assert bad.exit_code == 2, bad.output
    assert "sweep.num_samples" in bad.output and "--restart" in bad.output, bad.output

    # the rerun resumes the killed trial; `cadist stop SWEEP_FILE --wait` ends it at its next
    # progress report (with a checkpoint there), and the sweep with it
    resolved = f".cadist/{order[1]}.yaml"  # rewritten when its driver starts it
    before = runs.info(resolved)[0].mtime_ns
    log = open(tmp_path / "second.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        deadline = time.time() + 300
        while runs.info(resolved)[0].mtime_ns == before:
            assert proc.poll() is None, (tmp_path / "second.log").read_text()[-3000:]
            assert time.time() < deadline, "the killed trial never restarted"
            time.sleep(0.5)
        stop = subprocess.run(
            [*cmd[:3], "stop", "sweep.yaml", "--wait", "300"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400,
        )  # fmt: skip
        assert proc.wait(timeout=120) == 0, (tmp_path / "second.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    second_log = (tmp_path / "second.log").read_text()
    assert stop.returncode == 0, stop.stdout + stop.stderr + second_log[-3000:]
    assert "sweep itest_resume stopped (" in stop.stdout, stop.stdout
    for count in ("1 finished", "1 stopped", "1 not started"):  # the third waited its turn
        assert count in stop.stdout, stop.stdout
    assert "sweep itest_resume stopped on request: 1 trial(s) checkpointed and ended" in second_log
    result = runs.read_json(".cadist/sweep-itest_resume.results.json")
    assert result["stopped"] is True
    states = {t["job"]: (t["state"], t["step"]) for t in result["trials"] if t["job"]}
    assert [t["state"] for t in result["trials"] if not t["job"]] == ["not started"]
    stopped_at = states[order[1]][1]
    assert states == {
        order[0]: ("finished", ITERATIONS),
        order[1]: ("stopped", stopped_at),
    }
    assert stopped_at < ITERATIONS and stopped_at % 4 == 0  # at a progress report
    assert runs.latest_checkpoint(order[1])[0] == stopped_at
    assert not runs.exists(".cadist/sweep-itest_resume.stop.json")
    assert [s["state"] for s in sweeps_in(runs)] == ["stopped"]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    trial_run = client.get_run(_run_of(runs, order[1]))
    assert trial_run.info.status == "KILLED"
    assert trial_run.data.tags["cadist.stopped_at_step"] == str(stopped_at)
    exp = client.get_experiment_by_name("sweeps").experiment_id
    parents = client.search_runs([exp], "attributes.run_name = 'itest_resume'")
    assert [p.info.status for p in parents] == ["KILLED"]

    again = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "resuming sweep itest_resume" in again.stdout
    result = runs.read_json(".cadist/sweep-itest_resume.results.json")
    assert result["stopped"] is False
    trials = result["trials"]
    assert len(trials) == 3 and all(t["error"] is None for t in trials), trials
    # the same two trials (none started anew), and the third that had not started
    assert jobs_before < {t["job"] for t in trials} and len(jobs_before) == 2
    assert set(_sweep_dirs(runs, "itest_resume")) == {t["job"] for t in trials}
    parents = client.search_runs([exp], "attributes.run_name = 'itest_resume'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parents[0].info.run_id}'")
    assert sorted(c.info.run_id for c in children) == sorted(t["mlflow_run_id"] for t in trials)
    by_job = {c.data.tags["cadist.job"]: c for c in children}
    second = by_job[order[1]]  # the trial that was killed
    resumed = client.get_metric_history(second.info.run_id, "train/resumed_from_step")
    # continued from its checkpoints, not from step 0: after the kill, then after the stop
    assert len(resumed) >= 2 and 4 <= resumed[-2].value < stopped_at, resumed
    assert resumed[-1].value == stopped_at, resumed
    assert all(c.info.status == "FINISHED" for c in children)
    assert all(t["metrics"]["val/miou"] > 0 for t in trials)
    for t in trials:  # values from the searched domains, recorded as the trial run's params
        assert 0.02 <= t["params"]["model.edge_threshold"] <= 2.0
        assert t["params"]["model.trimap_width"] in (1, 21)
        assert 0.0 <= t["metrics"]["val/miou"] <= 1.0 and t["metrics"]["macs/backbone_gmac"] > 0
        c = next(c for c in children if c.info.run_id == t["mlflow_run_id"])
        assert float(c.data.params["model.edge_threshold"]) == pytest.approx(
            t["params"]["model.edge_threshold"]
        )
        assert c.data.metrics["val/miou"] == pytest.approx(t["metrics"]["val/miou"])
    out = again.stdout.splitlines()
    head = next(i for i, ln in enumerate(out) if ln.startswith("model.edge_threshold  model.trim"))
    table = out[head : head + 4]
    _check_pareto_front(trials, table)
    arts = [a.path for a in client.list_artifacts(parents[0].info.run_id, "sweep")]
    assert "sweep/sweep-itest_resume.results.json" in arts
    assert "sweep/sweep-itest_resume.pareto.png" in arts
    assert runs.is_file(".cadist/sweep-itest_resume.pareto.png")
    assert list(tmp_path.glob("runs")) == []  # nothing of the sweep on this machine's disk

    # --restart sets the earlier run aside (the step `cadist tune --restart` takes before Tune
    # starts; a whole fresh sweep would only repeat the runs above)
    from ray import tune

    from cadist.sweep.tune import _resume_or_start, load_sweep, would_resume

    loaded, fixed, _ = load_sweep(tmp_path / "sweep.yaml", ())
    said = []
    assert _resume_or_start(runs, loaded, fixed, "sweep.yaml", True, said.append) is False
    aside = runs.list("", "sweep-itest_resume.before-*")
    assert len(runs.list(".cadist", "sweep-itest_resume.results.json.before-*")) == 1
    assert len(aside) == 1 and said == [
        f"restarting sweep itest_resume: the earlier run is kept as {runs.uri(aside[0])}"
    ]
    path, fs = runs.ray_storage()
    assert tune.Tuner.can_restore(f"{path}/{aside[0]}", storage_filesystem=fs)  # whole
    assert not would_resume(runs, loaded, fixed, "sweep.yaml")
    assert runs.read_json(".cadist/sweep-itest_resume.state.json")["sweep"]["num_samples"] == 3
    # the presigned URL's secrets: not in the bucket (Tune's experiment state, trial checkpoints
    # and exports, cadist's sweep and run state), MLflow, the logs or Ray's session logs
    state = runs.read_json(".cadist/sweep-itest_resume.state.json")
    assert "X-Amz-Signature=***" in state["job"]["model"]["weights"]
    assert "X-Amz-Signature=***" in children[0].data.params["model.weights"]
    c = s3_server()
    leaked = [
        k for k in c.keys(bucket) if any(x.encode() in _s3_bytes(c, bucket, k) for x in secrets)
    ]
    assert leaked == []
    # (every Ray session the three `cadist tune` runs started, not just the latest on the machine)
    sessions = [d for d in Path("/tmp/ray").glob("session_2*") if d.stat().st_ctime >= started - 1]
    assert len(sessions) >= 3, sessions
    for where in (tmp_path, *sessions):
        hits = [str(p) for p in where.rglob("*") if p.is_file() and not p.is_symlink()
                and p.name not in ("sweep.yaml", "changed.yaml")  # the user's own files
                and any(x.encode() in p.read_bytes() for x in secrets)]  # fmt: skip
        assert hits == [], hits


def test_asha_stops_trailing_trials_and_marks_their_runs(tmp_path):
    """One objective with scheduler asha (through the CLI: its local Ray has the dashboard whose
    state API Ray Train needs to release a stopped trial's workers): every evaluation reaches
    Tune; trials whose head cannot learn (learning rate 1e-9, backbone frozen alike) trail at the
    first rung and are stopped — MLflow run KILLED, flagged in the results — the others finish.
    (`cadist tune` runs on a host of its own where hosts can be made — conftest.ON_A_HOST — its
    folder shared: its local Ray then runs beside the Ray tests' and cannot meet them.)"""
    import sys

    from ..hosts.harness import own_host, run_on

    train, val = tiny_shards(tmp_path, seed=8)
    sweep = {
        "name": "itest_asha",
        "job": str(ROOT / "jobs" / "demo.yaml"),
        "set": _fixed(train, val, iterations=20, log_every=5)
        | {"model.name": "deeplabv3_resnet_tiny", "eval.interval": 5, "train.checkpoint_every": 10,
           "train.lr_backbone": 1e-9, "mlflow.tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
        "search": {"train.lr_head": {"choice": [0.2, 1e-9]}},
        "objectives": {"val/miou": "max"},
        "num_samples": 2,
        "max_concurrent": 1,  # in the searcher's order: the 1e-9 trial meets the rung recorded
        "searcher": "random",
        "scheduler": "asha",
        "grace_steps": 10,
        "reduction_factor": 2,
        "seed": SEED,
    }  # fmt: skip
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"PYTHONPATH": str(ROOT)}
    with own_host("asha", (tmp_path,)) as host:  # (env: where it runs here)
        r = run_on(host, [sys.executable, "-m", "cadist", "tune", "sweep.yaml"], tmp_path, 900, env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    trials = json.loads(
        (tmp_path / "runs" / ".cadist" / "sweep-itest_asha.results.json").read_text()
    )["trials"]
    print(json.dumps(trials, indent=1))
    assert len(trials) == 2 and all(t["error"] is None for t in trials), trials
    stopped = [t for t in trials if t["stopped_early"]]
    done = [t for t in trials if not t["stopped_early"]]
    assert stopped and done
    for t in stopped:
        assert t["step"] < 20 and t["params"]["train.lr_head"] == 1e-9
    assert all(t["step"] == 20 for t in done)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    for t in trials:
        status = client.get_run(t["mlflow_run_id"]).info.status
        assert status == ("KILLED" if t["stopped_early"] else "FINISHED"), (t, status)
    assert r.stdout.count("stopped at step") == len(stopped)
    # Tune's record of the trials it ended — the finished one and the one ASHA stopped — tells
    # the latter from a trial an interruption cuts short
    ended = json.loads((tmp_path / "runs" / "sweep-itest_asha" / ENDED).read_text())
    assert sorted(ended) == sorted(t["job"].removeprefix("itest_asha-") for t in trials)
