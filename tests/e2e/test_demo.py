"""The demo as a user runs it: `cadist demo` in a fresh folder (shortened with --set)."""

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow


def test_cadist_demo_end_to_end(tmp_path):
    cadist = Path(sys.executable).parent / "cadist"
    r = subprocess.run(
        [
            str(cadist),
            "demo",
            "--workdir",
            str(tmp_path),
            "--set",
            "train.iterations=100",
            "--set",
            "eval.interval=100",
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    m = re.search(r"final val mIoU ([0-9.]+) .* chance level ≈ ([0-9.]+)", r.stdout)
    assert m, r.stdout
    miou, chance = float(m.group(1)), float(m.group(2))
    assert miou > 2 * chance, (miou, chance)  # clearly above chance after 100 CPU steps
    assert f"mlflow ui --backend-store-uri sqlite:///{tmp_path}/mlflow.db" in r.stdout
    # the console: each progress line once (print in a Ray Train worker showed twice), and none of
    # Ray Train's per-report lines below cluster.log_level (WARNING)
    console = r.stdout + r.stderr
    assert console.count("[cadist] step 50/100 loss") == 1, console[-3000:]
    assert "Reporting training result" not in console
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("cadist-demo").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.metrics["val/miou"] == pytest.approx(miou, abs=1e-4)
    for sub in (
        "data/synth/leftImg8bit/train",
        "shards/demo/train-manifest.json",
        "cadist_runs/demo/step_00000100",
    ):
        assert (tmp_path / sub).exists(), sub
    # the next steps the demo prints work as printed: eval reproduces the final mIoU, predict
    # writes the class map of a validation image
    lines = {
        ln.split(": ", 1)[0]: ln.split(": ", 1)[1] for ln in r.stdout.splitlines() if ": " in ln
    }
    ev = subprocess.run(
        [str(cadist), *shlex.split(lines["evaluate it"])[1:]],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert ev.returncode == 0, ev.stderr[-3000:]
    assert json.loads(ev.stdout)["miou"] == pytest.approx(miou, abs=1e-4)
    pr = subprocess.run(
        [str(cadist), *shlex.split(lines["predict"])[1:]],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert pr.returncode == 0, pr.stderr[-3000:]
    assert len(list((tmp_path / "predictions").glob("*_pred.png"))) == 1
