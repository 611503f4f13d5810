"""Weights from anywhere a user has them: files, checkpoint folders and MLflow runs (a real SQLite
store); cadist exports carry their model section, so `predict`/`macs` need no --model."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from cadist.cli import main
from cadist.config.schema import ModelConfig
from cadist.errors import CheckpointError
from cadist.nets.build import build_model
from cadist.nets.weights import save_weights
from cadist.tracking.runs import Tracker, new_run
from cadist.tracking.sources import resolve_weights

MODEL = "deeplabv3_batch_ap_resnet_tiny"


@pytest.fixture()
def logged(tmp_path, monkeypatch):
    """An edge model trained with non-default mask settings, exported as training does, logged to
    an MLflow run's checkpoints/; the store is the default one of the working directory."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    torch.manual_seed(0)
    net = build_model(MODEL).eval()
    cfg = ModelConfig(name=MODEL, edge_threshold=0.3, trimap_width=3, mask_variant="corrected")
    path = save_weights(
        net, tmp_path / "best.pt", model=MODEL, model_config=cfg.model_dump(), step=7
    )
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = new_run(uri, "ckpts", "edge", {})
    tracker = Tracker(uri, run)
    tracker.log_artifact(path, "checkpoints")
    tracker.finish()
    img = np.zeros((64, 128, 3), np.uint8)
    img[10:50, 20:100] = 200
    img[25:35, 40:60] = 40
    Image.fromarray(img).save(tmp_path / "x.png")
    return tmp_path, run


def _mask(tmp_path, out, *args):
    r = CliRunner().invoke(
        main,
        ["predict", *args, "--image", str(tmp_path / "x.png"), "--out", str(tmp_path / out),
         "--save-mask", "--device", "cpu"],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    return np.load(tmp_path / out / "x_mask.npy")


def test_predict_and_macs_from_an_mlflow_run_use_its_recorded_settings(logged):
    tmp_path, run = logged
    from_run = _mask(tmp_path, "a", "--ckpt", f"runs:/{run}")
    explicit = _mask(
        tmp_path, "b", "--ckpt", str(tmp_path / "best.pt"), "--model", MODEL,
        "--edge-threshold", "0.3", "--trimap-width", "3", "--mask-variant", "corrected",
    )  # fmt: skip
    assert np.array_equal(from_run, explicit)
    # the generic defaults (τ 0.15, w 11, reference mask) would give another mask
    plain = torch.load(tmp_path / "best.pt", weights_only=True)["state_dict"]
    torch.save(plain, tmp_path / "plain.pt")
    default = _mask(tmp_path, "c", "--ckpt", str(tmp_path / "plain.pt"), "--model", MODEL)
    assert not np.array_equal(default, explicit)
    # an explicit option still wins over the recorded one
    wide = _mask(
        tmp_path, "d", "--ckpt", f"runs:/{run}/checkpoints/best.pt", "--trimap-width", "11"
    )
    assert not np.array_equal(wide, from_run)
    r = CliRunner().invoke(
        main, ["macs", "--ckpt", f"runs:/{run}", "--image", str(tmp_path / "x.png"), "--json"]
    )
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["high_res_fraction"] == pytest.approx(1 - from_run.mean())


def test_bad_weight_sources_are_one_clear_error(logged):
    tmp_path, run = logged
    with pytest.raises(
        CheckpointError,
        match=r"runs:/0123abcd/checkpoints/best\.pt: cannot be fetched from the MLflow store sqlite:///",
    ):
        resolve_weights("runs:/0123abcd")
    with pytest.raises(CheckpointError, match=r"cannot be fetched"):
        resolve_weights(f"runs:/{run}/checkpoints/nope.pt")
    (tmp_path / "folder").mkdir()
    with pytest.raises(CheckpointError, match=r"folder: a folder without model\.pt"):
        resolve_weights(tmp_path / "folder")
    save_weights(build_model("deeplabv3_resnet_tiny", 16), tmp_path / "folder" / "model.pt")
    assert resolve_weights(tmp_path / "folder") == tmp_path / "folder" / "model.pt"
    torch.save({}, tmp_path / "empty.pt")
    r = CliRunner().invoke(
        main, ["predict", "--ckpt", str(tmp_path / "empty.pt"), "--image", "x.png", "--out", "o"]
    )
    assert r.exit_code != 0
    assert (
        "--model is needed: " + str(tmp_path / "empty.pt") + " does not record its model"
        in r.output
    )


def test_an_older_training_checkpoint_takes_its_model_from_the_run_s_job(logged):
    """Checkpoints written before they recorded their model (weights and step only): the model
    section comes from the job the run resolved beside them (<storage>/.cadist/<job>.yaml)."""
    tmp_path, _ = logged
    torch.manual_seed(0)
    step = tmp_path / "runs" / "edge-job" / "step_00000040"
    save_weights(build_model(MODEL).eval(), step / "model.pt", step=40)
    (tmp_path / "runs" / ".cadist").mkdir()
    job = {"name": "edge-job", "model": {"name": MODEL, "edge_threshold": 0.3,
           "trimap_width": 3, "mask_variant": "corrected"}}  # fmt: skip
    (tmp_path / "runs" / ".cadist" / "edge-job.yaml").write_text(json.dumps(job))
    explicit = _mask(
        tmp_path, "b", "--ckpt", str(tmp_path / "best.pt"), "--model", MODEL,
        "--edge-threshold", "0.3", "--trimap-width", "3", "--mask-variant", "corrected",
    )  # fmt: skip
    assert np.array_equal(_mask(tmp_path, "s", "--ckpt", str(step)), explicit)
    # without that job file, it is a foreign weights file: --model is needed
    (tmp_path / "runs" / ".cadist" / "edge-job.yaml").unlink()
    r = CliRunner().invoke(main, ["predict", "--ckpt", str(step), "--image", "x.png", "--out", "o"])
    assert r.exit_code != 0 and "does not record its model" in r.output


def test_an_edge_model_starts_from_the_dense_os8_weights_of_its_backbone(tmp_path):
    """method §4.4: the edge model keeps the dense names and shapes, so the dense OS8 model's
    weights load unchanged (its output at an all-OS8 mask is the dense model's); the dense OS16
    model's, or another backbone's, are refused with the model they hold."""
    from cadist.nets.weights import load_weights

    torch.manual_seed(0)
    dense = build_model("deeplabv3_resnet_tiny", num_classes=19, output_stride=8).eval()
    save_weights(dense, tmp_path / "os8.pt", model="deeplabv3_resnet_tiny", output_stride=8)
    save_weights(dense, tmp_path / "os16.pt", model="deeplabv3_resnet_tiny", output_stride=16)
    edge = build_model("deeplabv3_batch_ap_resnet_tiny", num_classes=19).eval()
    load_weights(edge, tmp_path / "os8.pt", expect_name="deeplabv3_batch_ap_resnet_tiny")
    for k, v in dense.state_dict().items():
        assert torch.equal(edge.state_dict()[k], v), k
    with pytest.raises(
        CheckpointError, match="holds weights of deeplabv3_resnet_tiny .output stride 16"
    ):
        load_weights(edge, tmp_path / "os16.pt", expect_name="deeplabv3_batch_ap_resnet_tiny")
    with pytest.raises(CheckpointError, match="not deeplabv3_batch_ap_resnet50"):
        load_weights(edge, tmp_path / "os8.pt", expect_name="deeplabv3_batch_ap_resnet50")
