"""Sweeps through Ray Tune on a real local Ray: trials are ordinary cadist jobs (Ray Train +
DeepSpeed), nested MLflow runs under the sweep's run, a multi-objective Pareto front."""

from pathlib import Path

import pytest
import ray
import yaml
from mlflow.tracking import MlflowClient

from cadist.tune import run_sweep

from ..conftest import tiny_shards

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_local():
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


def test_sweep_runs_trials_as_jobs_and_finds_the_pareto_front(tmp_path, ray_local, monkeypatch):
    # the default MLflow store (./mlflow.db) and storage path are relative to where `cadist tune`
    # runs, not to the trial actors' working directories
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    train, val = tiny_shards(tmp_path, seed=5)
    sweep = {
        "name": "itest_sweep",
        "job": str(ROOT / "jobs" / "demo.yaml"),
        "set": {
            "model.name": "deeplabv3_batch_ap_resnet_tiny",
            "data.train_shards": str(train),
            "data.val_shards": str(val),
            "data.crop_size": 64,
            "data.num_workers": 0,
            "train.iterations": 4,
            "train.batch_size": 2,
            "train.log_every": 2,
            "train.checkpoint_every": 4,
            "eval.interval": 4,
            "eval.log_images": 0,
            "cluster.num_workers": 1,
            "cluster.storage_path": "runs",
            "deepspeed.zero_stage": 0,
            "mlflow.experiment": "sweeps",
        },
        "search": {
            "model.edge_threshold": {"loguniform": [0.02, 2.0]},
            "model.trimap_width": {"choice": [1, 21]},
        },
        "objectives": {"val/miou": "max", "macs/backbone_gmac": "min"},
        "num_samples": 3,
        "max_concurrent": 1,
        "seed": 3,
    }
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    lines = []
    r = run_sweep(tmp_path / "sweep.yaml", echo=lines.append)
    trials = r["trials"]
    assert len(trials) == 3 and all(t["error"] is None for t in trials), trials
    for t in trials:
        assert 0.02 <= t["params"]["model.edge_threshold"] <= 2.0
        assert t["params"]["model.trimap_width"] in (1, 21)
        assert 0.0 <= t["metrics"]["val/miou"] <= 1.0 and t["metrics"]["macs/backbone_gmac"] > 0
    # the front: exactly the trials no other trial beats in both objectives
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
    assert Path(r["results_file"]).is_file()
    table = lines[0].splitlines()  # header + one line per trial, front marked with *
    assert table[0].endswith("pareto") and len(table) == 4
    assert sum(line.endswith("*") for line in table[1:]) == len(on)
    # every trial is an MLflow run under the sweep's run, with its own values as params
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("sweeps").experiment_id
    (parent,) = client.search_runs([exp], "tags.`cadist.sweep` = 'itest_sweep' and "
                                          "attributes.run_name = 'itest_sweep'")  # fmt: skip
    children = client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(children) == 3
    by_id = {c.info.run_id: c for c in children}
    for t in trials:
        c = by_id[t["mlflow_run_id"]]
        assert float(c.data.params["model.edge_threshold"]) == pytest.approx(
            t["params"]["model.edge_threshold"]
        )
        assert c.data.metrics["val/miou"] == pytest.approx(t["metrics"]["val/miou"])
    arts = [a.path for a in client.list_artifacts(parent.info.run_id, "sweep")]
    assert "sweep/sweep-itest_sweep.results.json" in arts
