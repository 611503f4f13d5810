"""Registered cadist models as MLflow pyfunc models: loaded by `mlflow.pyfunc.load_model` from the
registry, and served by a real `mlflow models serve` on 127.0.0.1 — both predicting what cadist's
own prediction path predicts."""

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from cadist.data.images import load_rgb
from cadist.data.synthetic import write_tree
from cadist.eval.predict import predict_logits
from cadist.nets.build import build_model
from cadist.nets.fold import fold_batchnorm
from cadist.nets.weights import save_weights
from cadist.tracking.registry import register_best

from ..conftest import free_port

MODEL = "deeplabv3_batch_ap_resnet_tiny"  # content-adaptive (edge mask), so the mask options count


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """A cadist export with non-default mask options, logged as a run's best weights and registered
    (version 1 of `served`); yields (tracking URI, the export, two generated RGB images)."""
    root = tmp_path_factory.mktemp("serving")
    torch.manual_seed(0)
    net = build_model(MODEL, trimap_width=3, edge_threshold=0.05)
    with torch.no_grad():  # BatchNorm statistics that are not the identity, so folding matters
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    config = {"name": MODEL, "trimap_width": 3, "edge_threshold": 0.05}
    best = save_weights(net, root / "best.pt", model=MODEL, model_config=config, step=7, miou=0.25)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("serving", artifact_location=(root / "artifacts").as_uri())
    run_id = client.create_run(exp).info.run_id
    client.log_artifact(run_id, str(best), "checkpoints")
    assert register_best(uri, run_id, "served") == "1"
    write_tree(root / "cs", num_train=0, num_val=2, height=64, width=128, seed=2)
    images = [load_rgb(p) for p in sorted((root / "cs").glob("leftImg8bit/val/*/*.png"))]
    yield uri, best, np.stack(images)


def _cadist_prediction(best: Path, images: np.ndarray) -> np.ndarray:
    """cadist's own path: the model built with the recorded options, weights, BN folded."""
    torch.manual_seed(0)
    net = build_model(MODEL, trimap_width=3, edge_threshold=0.05)
    net.load_state_dict(torch.load(best, weights_only=True)["state_dict"])
    net = fold_batchnorm(net)
    return np.stack([predict_logits(net, im).argmax(0).numpy().astype(np.uint8) for im in images])


def test_a_registered_version_loads_as_a_pyfunc_model(registered, monkeypatch):
    import mlflow

    uri, best, images = registered
    # through the environment only: a process-wide mlflow.set_registry_uri would leak into other
    # tests' clients
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", uri)
    model = mlflow.pyfunc.load_model("models:/served/1")
    got = model.predict(images)
    assert got.dtype == np.uint8 and got.shape == (2, 64, 128)
    want = _cadist_prediction(best, images)
    assert (got == want).all()
    assert len(np.unique(want)) > 1  # not a constant map
    # the version's model folder still resolves as weights for `cadist predict/eval --ckpt`
    from cadist.tracking.sources import resolve_weights

    w = resolve_weights("models:/served/1", uri)
    assert w.name == "model.pt" and w.read_bytes() == best.read_bytes()
    with pytest.raises(Exception, match=r"does not match expected shape \(-1, -1, -1, 3\)"):
        model.predict(images[..., :2])  # MLflow checks the signature
    from cadist.errors import DataError
    from cadist.serving import SegmentationModel

    direct = SegmentationModel(best)
    assert (direct.predict(images[0].astype(np.int64)) == want[:1]).all()  # as JSON delivers them
    with pytest.raises(
        DataError, match=r"expected RGB images shaped \(B, H, W, 3\) or \(H, W, 3\)"
    ):
        direct.predict(images[..., :2])
    with pytest.raises(DataError, match="pixel values must lie in 0–255"):
        direct.predict(images.astype(np.int64) * 2)


@pytest.mark.slow
def test_mlflow_models_serve_answers_with_cadist_predictions(registered, tmp_path):
    uri, best, images = registered
    port = free_port()
    bindir = Path(sys.executable).parent  # mlflow, and the uvicorn it starts, of this environment
    env = dict(os.environ, MLFLOW_TRACKING_URI=uri, MLFLOW_REGISTRY_URI=uri)
    env["PATH"] = f"{bindir}{os.pathsep}{env.get('PATH', '')}"
    mlflow_cli = bindir / "mlflow"
    server = subprocess.Popen(
        [str(mlflow_cli), "models", "serve", "-m", "models:/served/1", "--env-manager", "local",
         "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=open(tmp_path / "serve.log", "wb"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-2000:]
            assert time.time() < deadline, "mlflow models serve did not come up"
            time.sleep(0.5)
        body = json.dumps({"inputs": images.tolist()}).encode()
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            data=body,
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=60) as r:
            got = np.asarray(json.loads(r.read())["predictions"], dtype=np.uint8)
        assert got.shape == (2, 64, 128)
        assert (got == _cadist_prediction(best, images)).all()
    finally:
        server.terminate()
        server.wait(30)
