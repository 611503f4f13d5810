"""Test-time augmentation (`cadist eval --scales … --flip`): the passes, the averaged
probabilities against a hand-written reference, adaptive masks per pass, the CLI and its MLflow
run (SQLite store)."""

import json

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from cadist.cli import main
from cadist.config.passes import Augmentation, Pass, Window
from cadist.eval.loop import evaluate
from cadist.eval.tta import (
    crop_boxes,
    high_res_fraction,
    plan_passes,
    predict_augmented,
    size_multiple,
)
from cadist.nets.build import build_model

from ..conftest import tiny_shards


def _model(name="deeplabv3_resnet_tiny", **kw):
    torch.manual_seed(0)
    return build_model(name, num_classes=19, **kw).eval()


def test_passes_round_each_scale_to_the_models_multiple():
    # 100×200: 0.5 → 50×100 → 64×96; 1 → 96×192 (100/32 = 3.1); 1.5 → 160×288 (150/32 = 4.7)
    assert plan_passes(100, 200, (0.5, 1.0, 1.5), False, 32) == [
        Pass(64, 96, False), Pass(96, 192, False), Pass(160, 288, False)
    ]  # fmt: skip
    # a tiny scale still runs at one multiple; flip doubles every scale, mirrored after plain
    assert plan_passes(64, 128, (0.1,), True, 32) == [Pass(32, 32, False), Pass(32, 32, True)]
    assert plan_passes(64, 128, (1.0,), False, 32) == [Pass(64, 128, False)]
    assert size_multiple(_model()) == 32
    edge = _model("deeplabv3_batch_ap_resnet_tiny", mask_variant="reference")
    assert size_multiple(edge) == 32  # 4×4 blocks of 8-pixel cells; OS16 level = 2×2 cells


def test_scales_parse_with_one_clear_error():
    assert Augmentation.parse("0.75, 1,1.25", True) == Augmentation((0.75, 1.0, 1.25), True)
    assert Augmentation.parse("1", False).plain and not Augmentation.parse("1", True).plain
    for bad in ("", "a,1", "0,1", "-1", "nan"):
        with pytest.raises(Exception, match="expected factors > 0 separated by commas"):
            Augmentation.parse(bad, False)


def test_augmented_probabilities_equal_the_hand_written_mean():
    model = _model()
    torch.manual_seed(1)
    x = torch.randn(2, 3, 64, 96)
    passes = plan_passes(64, 96, (0.5, 1.0), True, 32)
    probs, masks, fractions = predict_augmented(model, x, passes)
    assert masks == [None] * 4 and fractions == [None] * 4  # a dense model has no mask
    ref = torch.zeros(2, 19, 64, 96)
    with torch.no_grad():
        for h, w in ((32, 64), (64, 96)):  # 0.5 → 32×48 → rounded to 32×64
            xs = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
            for mirrored in (False, True):
                out = model(xs.flip(-1)) if mirrored else model(xs)
                out = out.flip(-1) if mirrored else out
                out = F.interpolate(out, size=(64, 96), mode="bilinear", align_corners=False)
                ref += out.softmax(1) / 4
    assert torch.allclose(probs, ref, atol=1e-6)
    assert torch.allclose(probs.sum(1), torch.ones(2, 64, 96), atol=1e-5)
    # the single-scale, unmirrored pass is the plain prediction
    plain, _, _ = predict_augmented(model, x, [Pass(64, 96, False)])
    with torch.no_grad():
        assert torch.equal(plain.argmax(1), model(x).argmax(1))


def test_adaptive_passes_build_each_mask_from_the_resized_image():
    model = _model("deeplabv3_batch_ap_resnet_tiny", edge_threshold=0.05, trimap_width=3)
    torch.manual_seed(2)
    x = torch.rand(2, 3, 64, 128) * 2 - 1
    x[1, :, :, 64:] = 0.0  # flat right half: more of the second image stays coarse
    passes = plan_passes(64, 128, (0.5, 1.0), True, 32)
    probs, masks, fractions = predict_augmented(model, x, passes)
    for p, f, m in zip(passes, fractions, masks, strict=True):
        xs = F.interpolate(x, size=(p.height, p.width), mode="bilinear", align_corners=False)
        with torch.no_grad():
            model(xs.flip(-1) if p.flip else xs)
        assert torch.equal(m, model.last_mask) and m.shape == (2, p.height // 8, p.width // 8)
        assert torch.allclose(f, (m == 0).float().mean(dim=(1, 2))) and f.shape == (2,)
    assert float(fractions[2][1]) < float(fractions[2][0])  # full scale: the flat half is coarse
    # a batch of two equals each image alone
    one, _, _ = predict_augmented(model, x[1:], passes)
    assert torch.allclose(probs[1:], one, atol=1e-5)


def test_evaluate_with_augmentation_counts_every_pass():
    model = _model("deeplabv3_batch_ap_resnet_tiny")
    torch.manual_seed(3)
    batches = [
        {"image": torch.rand(1, 3, 64, 128) * 2 - 1, "label": torch.randint(0, 19, (1, 64, 128)),
         "key": [f"k{i}"]}
        for i in range(3)
    ]  # fmt: skip
    cm_plain, _, extra_plain = evaluate(model, batches, torch.device("cpu"))
    cm_one, _, extra_one = evaluate(model, batches, torch.device("cpu"), tta=Augmentation())
    assert torch.equal(cm_plain.mat, cm_one.mat)
    assert extra_one["high_res_sum"] == pytest.approx(extra_plain["high_res_sum"])
    cm, _, extra = evaluate(model, batches, torch.device("cpu"), tta=Augmentation((0.5, 1.0), True))
    assert list(extra["passes"]) == plan_passes(64, 128, (0.5, 1.0), True, 32)
    assert all(n == 3 for n, _ in extra["passes"].values())
    sums = [s for _, s in extra["passes"].values()]
    assert extra["high_res_sum"] == pytest.approx(sum(sums) / 4)
    assert int(cm.mat.sum()) == int(cm_plain.mat.sum()) == 3 * 64 * 128


def test_sliding_windows_follow_mmsegmentations_grid_with_clear_errors():
    # 64×128 in 64×64 crops every 32 px: three crops along the width, the last one at the edge
    assert crop_boxes(64, 128, 64, 64, 32, 32) == [
        (0, 64, 0, 64),
        (0, 64, 32, 96),
        (0, 64, 64, 128),
    ]
    # 100 rows in 64-row crops every 43: 0-64, then 43-107 moved back to 36-100
    assert [b[:2] for b in crop_boxes(100, 64, 64, 64, 43, 43)] == [(0, 64), (36, 100)]
    assert crop_boxes(64, 128, 64, 128, 10, 10) == [(0, 64, 0, 128)]  # a window of the image
    assert Window.parse("512x1024") == Window(512, 1024, 341, 683)  # mmseg's Cityscapes stride
    assert Augmentation.parse("1", False, "64x64", "32x48").window == Window(64, 64, 32, 48)
    assert not Augmentation.parse("1", False, "64x64").plain
    # each pass knows its crop size and count; a pass smaller than the window is one crop
    win = Window(64, 64, 32, 32)
    assert plan_passes(64, 128, (0.5, 1.0), False, 32, win) == [
        Pass(32, 64, False, (32, 64), 1), Pass(64, 128, False, (64, 64), 3)
    ]  # fmt: skip
    for window, stride, message in (
        ("512", None, "--window '512': expected HEIGHTxWIDTH in pixels"),
        ("0x64", None, "--window '0x64': expected HEIGHTxWIDTH"),
        ("64x64", "a", "--stride 'a': expected HEIGHTxWIDTH"),
        ("64x64", "65x32", "--stride 65x32: larger than the window 64x64"),
        (None, "32x32", "--stride 32x32: goes with --window"),
    ):
        with pytest.raises(Exception, match=message):
            Augmentation.parse("1", False, window, stride)
    with pytest.raises(Exception, match="multiples of 32; use e.g. --window 64x64"):
        plan_passes(64, 128, (1.0,), False, 32, Window(48, 40, 16, 16))


def test_sliding_window_equals_the_hand_written_average_of_crops():
    model = _model()
    torch.manual_seed(5)
    x = torch.randn(2, 3, 64, 128)
    win = Window(64, 64, 32, 32)
    passes = plan_passes(64, 128, (1.0,), True, 32, win)
    probs, masks, _ = predict_augmented(model, x, passes, win)
    assert masks == [None, None]
    ref = torch.zeros(2, 19, 64, 128)
    with torch.no_grad():
        for mirrored in (False, True):
            xs = x.flip(-1) if mirrored else x
            total, count = torch.zeros(2, 19, 64, 128), torch.zeros(64, 128)
            for x0 in (0, 32, 64):
                total[..., x0 : x0 + 64] += model(xs[..., x0 : x0 + 64])
                count[:, x0 : x0 + 64] += 1
            logits = total / count
            ref += (logits.flip(-1) if mirrored else logits).softmax(1) / 2
    assert torch.allclose(probs, ref, atol=1e-6)
    # a window as large as the image is the plain prediction
    whole = Window(64, 128, 64, 128)
    one, _, _ = predict_augmented(model, x, plan_passes(64, 128, (1.0,), False, 32, whole), whole)
    with torch.no_grad():
        assert torch.allclose(one, model(x).softmax(1), atol=1e-6)


def test_adaptive_sliding_window_builds_a_mask_per_crop():
    model = _model("deeplabv3_batch_ap_resnet_tiny", edge_threshold=0.05, trimap_width=3)
    torch.manual_seed(6)
    x = torch.rand(1, 3, 64, 128) * 2 - 1
    x[..., 64:] = 0.0  # the right crop is flat: it stays coarse
    win = Window(64, 64, 64, 64)
    passes = plan_passes(64, 128, (1.0,), False, 32, win)
    _, (mask,), (fraction,) = predict_augmented(model, x, passes, win)
    crops = []
    with torch.no_grad():
        for x0 in (0, 64):
            model(x[..., x0 : x0 + 64])
            crops.append(model.last_mask)
    assert torch.equal(mask, torch.cat(crops, dim=-1)) and mask.shape == (1, 8, 16)
    want = (high_res_fraction(crops[0]) + high_res_fraction(crops[1])) / 2
    assert torch.allclose(fraction, want) and float(high_res_fraction(crops[1])) == 0.0
    assert float(high_res_fraction(crops[0])) > 0.0


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    root = tmp_path_factory.mktemp("tta")
    train, val = tiny_shards(root, num_train=2, num_val=2, seed=4)
    path = root / "weights.pt"
    torch.save(_model("deeplabv3_batch_ap_resnet_tiny").state_dict(), path)
    return root, val, path


def _eval(root, val, path, *more):
    from pathlib import Path

    job = Path(__file__).resolve().parents[2] / "jobs" / "demo.yaml"
    args = ["eval", str(job), "--ckpt", str(path), "--device", "cpu",
            "--set", "model.name=deeplabv3_batch_ap_resnet_tiny", "--set", f"data.val_shards={val}",
            "--set", "data.num_workers=0",
            "--set", f"mlflow.tracking_uri=sqlite:///{root / 'mlflow.db'}", *more]  # fmt: skip
    return CliRunner().invoke(main, args)


def test_cli_eval_with_scales_and_flip_reports_and_logs_every_pass(weights):
    from cadist.nets.stats import mac_line

    root, val, path = weights
    plain = _eval(root, val, path)
    assert plain.exit_code == 0, plain.output
    plain = json.loads(plain.stdout)
    assert "tta" not in plain
    r = _eval(root, val, path, "--scales", "0.5,1", "--flip", "--log")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    tta = out["tta"]
    assert (tta["scales"], tta["flip"]) == ([0.5, 1.0], True)
    sizes = [(p["height"], p["width"], p["flip"]) for p in tta["passes"]]
    assert sizes == [(32, 64, False), (32, 64, True), (64, 128, False), (64, 128, True)]
    assert all(p["images"] == 2 for p in tta["passes"])
    # each pass's GMac is the method's count at its size and high-res fraction; the total sums them
    for p in tta["passes"]:
        line = mac_line("deeplabv3_batch_ap_resnet_tiny", "os8to16", p["height"], p["width"])
        assert p["backbone_gmac"] == pytest.approx(line.backbone(p["high_res_fraction"]))
    assert tta["backbone_gmac"] == pytest.approx(sum(p["backbone_gmac"] for p in tta["passes"]))
    full = mac_line("deeplabv3_batch_ap_resnet_tiny", "os8to16", 64, 128)
    assert tta["backbone_gmac"] > 2 * full.backbone(0.0)
    assert out["pixels"] == plain["pixels"] and 0.0 <= out["miou"] <= 1.0
    # the MLflow run: apart from plain evaluations by name and tag, the GMac of all passes
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    run = client.get_run(out["mlflow_run_id"])
    assert run.info.run_name == "demo-eval-tta"
    assert (run.data.params["eval.scales"], run.data.params["eval.flip"]) == ("0.5,1.0", "True")
    assert run.data.tags["cadist.tta"] == "scales 0.5,1.0, flip True"
    assert run.data.metrics["macs/backbone_gmac"] == pytest.approx(tta["backbone_gmac"])
    assert run.data.metrics["val/miou"] == pytest.approx(out["miou"])
    # `cadist report` labels it as augmented and leaves the paper's single-scale figure out
    rep = CliRunner().invoke(main, ["report", "--experiment", "cadist-demo",
                                    "--tracking-uri", f"sqlite:///{root / 'mlflow.db'}", "--json"])  # fmt: skip
    assert rep.exit_code == 0, rep.output
    (row,) = [r for r in json.loads(rep.stdout)["runs"] if r["run"] == "demo-eval-tta"]
    assert row["model"] == "deeplabv3_batch_ap_resnet_tiny + TTA 0.5,1.0 flip"
    assert row["backbone_gmac"] == pytest.approx(tta["backbone_gmac"]) and row["paper_miou"] is None
    bad = _eval(root, val, path, "--scales", "1,x")
    assert bad.exit_code != 0 and "--scales '1,x': expected factors > 0" in bad.output


def test_cli_eval_with_a_sliding_window_counts_every_crop(weights):
    from cadist.nets.stats import mac_line

    root, val, path = weights
    r = _eval(root, val, path, "--window", "32x64", "--stride", "32x32", "--log")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    (p,) = out["tta"]["passes"]
    # 64×128 in 32×64 crops every 32 px: 2 rows × 3 columns
    assert (p["height"], p["width"], p["window"], p["windows"]) == (64, 128, [32, 64], 6)
    line = mac_line("deeplabv3_batch_ap_resnet_tiny", "os8to16", 32, 64)
    assert p["backbone_gmac"] == pytest.approx(6 * line.backbone(p["high_res_fraction"]))
    assert out["tta"]["window"] == "32x64/32x32" and out["high_res_fraction"] == pytest.approx(
        p["high_res_fraction"]
    )
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    run = client.get_run(out["mlflow_run_id"])
    assert (run.data.params["eval.window"], run.data.params["eval.stride"]) == ("32x64", "32x32")
    rep = CliRunner().invoke(main, ["report", "--experiment", "cadist-demo",
                                    "--tracking-uri", f"sqlite:///{root / 'mlflow.db'}", "--json"])  # fmt: skip
    (row,) = [r for r in json.loads(rep.stdout)["runs"] if r["run"] == "demo-eval-slide"]
    assert row["model"] == "deeplabv3_batch_ap_resnet_tiny + slide 32x64/32x32"
    bad = _eval(root, val, path, "--window", "48x64")
    assert bad.exit_code != 0 and "multiples of 32; use e.g. --window 64x64" in bad.output


def test_cli_predict_with_scales_and_flip_writes_probabilities_and_each_scales_mask(weights):
    import numpy as np
    from PIL import Image

    from cadist.data.cityscapes import PALETTE
    from cadist.data.transforms import normalized_input
    from cadist.nets.fold import fold_batchnorm
    from cadist.nets.weights import load_weights

    root, _, path = weights
    (image,) = sorted((root / "cs" / "leftImg8bit" / "val").rglob("*.png"))[:1]
    out = root / "pred"
    args = ["predict", "--model", "deeplabv3_batch_ap_resnet_tiny", "--ckpt", str(path),
            "--image", str(image), "--out", str(out), "--device", "cpu", "--save-logits",
            "--save-mask", "--scales", "0.5,1", "--flip"]  # fmt: skip
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    stem = image.stem
    probs = np.load(out / f"{stem}_probs.npy")
    assert probs.dtype == np.float32 and probs.shape == (19, 64, 128)
    assert np.allclose(probs.sum(0), 1.0, atol=1e-5)
    pred = np.asarray(Image.open(out / f"{stem}_pred.png"))
    assert np.array_equal(pred, PALETTE[probs.argmax(0)])
    # the same mean as the library call on the same (BN-folded) network
    net = _model("deeplabv3_batch_ap_resnet_tiny")
    load_weights(net, path)
    net = fold_batchnorm(net)
    x = normalized_input(np.asarray(Image.open(image).convert("RGB")))[None]
    ref, masks, _ = predict_augmented(net, x, plan_passes(64, 128, (0.5, 1.0), True, 32))
    assert np.allclose(probs, ref[0].numpy(), atol=1e-5)
    for (h, w), m in (((32, 64), masks[0]), ((64, 128), masks[2])):
        saved = np.load(out / f"{stem}_mask_{h}x{w}.npy")
        assert saved.dtype == np.uint8 and saved.shape == (h // 8, w // 8)
        assert np.array_equal(saved, m[0].numpy())
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"{stem}_{k}" for k in ("pred.png", "overlay.png", "probs.npy", "mask_32x64.npy",
                                "mask_64x128.npy")
    )  # fmt: skip
    # a sliding window: the crops' masks put together at the finest grid, the same mean
    r = CliRunner().invoke(main, [*args[:-3], "--window", "64x64", "--out", str(root / "slide")])
    assert r.exit_code == 0, r.output
    win = Window.parse("64x64")  # stride 43x43: three overlapping crops along the width
    ref, masks, _ = predict_augmented(net, x, plan_passes(64, 128, (1.0,), False, 32, win), win)
    probs = np.load(root / "slide" / f"{stem}_probs.npy")
    assert np.allclose(probs, ref[0].numpy(), atol=1e-5)
    saved = np.load(root / "slide" / f"{stem}_mask_64x128.npy")
    assert saved.shape == (8, 16) and np.array_equal(saved, masks[0][0].numpy())


def test_per_image_figures_equal_each_image_evaluated_alone(weights):
    import csv
    import io

    from cadist.eval.miou import ConfusionMatrix

    model = _model("deeplabv3_batch_ap_resnet_tiny", edge_threshold=0.05, trimap_width=3)
    torch.manual_seed(4)
    x = torch.rand(2, 3, 64, 128) * 2 - 1
    x[1, :, :, 64:] = 0.0
    y = torch.randint(0, 19, (2, 64, 128))
    y[1, :32] = 255  # ignored pixels do not count
    batches = [{"image": x, "label": y, "key": ["a", "b"]}]
    for tta in (None, Augmentation((0.5, 1.0), True)):
        records = []
        cm, _, extra = evaluate(model, batches, torch.device("cpu"), tta=tta, per_image=records)
        assert [r["key"] for r in records] == ["a", "b"]
        with torch.no_grad():
            pred = model(x).argmax(1) if tta is None else None
        for i, r in enumerate(records):
            if pred is not None:  # the plain prediction: the same figures as the image alone
                one = ConfusionMatrix(19)
                one.update(pred[i], y[i])
                assert r["miou"] == pytest.approx(one.miou()) and r["pixels"] == int(one.mat.sum())
                with torch.no_grad():
                    model(x[i : i + 1])  # the image alone: its own mask
                want = float((model.last_mask == 0).float().mean())
                assert r["high_res_fraction"] == pytest.approx(want)
        assert [r["pixels"] for r in records] == [64 * 128, 32 * 128]
        assert sum(r["pixels"] for r in records) == int(cm.mat.sum())
        assert sum(r["high_res_fraction"] for r in records) == pytest.approx(extra["high_res_sum"])

    # the CLI: worst first, and the same records as eval/per_image.csv of the logged run
    root, val, path = weights
    r = _eval(root, val, path, "--per-image", "--log", "--run-name", "per-image")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    rows = out["per_image"]
    assert len(rows) == out["images"] == 2
    assert rows[0]["miou"] <= rows[1]["miou"]
    assert sum(row["pixels"] for row in rows) == out["pixels"]
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    got = client.download_artifacts(out["mlflow_run_id"], "eval/per_image.csv", str(root))
    table = list(csv.DictReader(io.StringIO(open(got).read())))
    assert [t["key"] for t in table] == [row["key"] for row in rows]
    for t, row in zip(table, rows, strict=True):
        assert float(t["miou"]) == pytest.approx(row["miou"], abs=5e-5)
        assert float(t["high_res_fraction"]) == pytest.approx(row["high_res_fraction"], abs=5e-5)
    assert "miou_inference" not in table[0]
    # learned-mask models' records carry both networks: two more columns
    from cadist.eval.evaluate import per_image_csv

    learned = [dict(rows[0], miou_inference=0.25, high_res_fraction_train=0.5)]
    head, line = per_image_csv(learned).splitlines()
    assert head.endswith(",high_res_fraction,miou_inference,high_res_fraction_train")
    assert line.endswith(",0.2500,0.5000")


def test_a_job_s_eval_protocol_is_checked_up_front_and_is_cadist_eval_s_default(weights):
    """`eval.window`/`eval.stride`/`eval.scales`/`eval.flip` in a job: one clear error for a bad
    value, for a stride alone and — before any worker starts — for crops the model cannot take;
    `cadist eval` of that job evaluates the same way unless its options say otherwise, and logs
    what it ran; `cadist report` labels such runs."""
    from pathlib import Path

    from mlflow.tracking import MlflowClient

    from cadist.config.jobfile import load_job
    from cadist.errors import ConfigError
    from cadist.results.report import _augmentation
    from cadist.train.checks import check_eval

    demo = Path(__file__).resolve().parents[2] / "jobs" / "demo.yaml"
    for sets, said in (
        (["eval.window=64by128"], "eval.window .64by128.: expected HEIGHTxWIDTH in pixels"),
        (["eval.stride=32x32"], "eval.stride 32x32: goes with eval.window"),
        (["eval.window=32x64", "eval.stride=48x48"], "eval.stride 48x48: larger than the window"),
        (["eval.scales=0.5,x"], "eval.scales .0.5,x.: expected factors > 0 separated by commas"),
        (["eval.scales=[0.5, -1]"], r"eval.scales \[0.5, -1\]: expected factors > 0"),
        (["eval.scales=[]"], r"eval.scales \[\]: expected factors > 0"),
    ):
        with pytest.raises(ConfigError, match=said):
            load_job(demo, sets)
    job = load_job(demo, ["model.name=deeplabv3_batch_ap_resnet_tiny", "eval.window=48x64"])
    with pytest.raises(ConfigError, match=r"eval.window 48x64: deeplabv3_batch_ap_resnet_tiny takes "
                       r"inputs whose sides are multiples of 32; use e.g. eval.window=64x64"):  # fmt: skip
        check_eval(job, "demo.yaml")
    check_eval(load_job(demo, ["eval.window=64x64"]), "demo.yaml")  # fits: no error
    # scales as a comma list (as --scales) or a YAML list; the paper's protocol is no augmentation
    assert load_job(demo, ["eval.scales=0.75,1,1.25"]).eval.scales == [0.75, 1.0, 1.25]
    assert load_job(demo, ["eval.scales=[0.5, 1]"]).flat()["eval.scales"] == "0.5,1.0"
    assert load_job(demo, ["eval.scales=1"]).eval.augmentation() is None
    assert load_job(demo, ["eval.flip=true"]).eval.augmentation().flip

    root, val, path = weights
    explicit = json.loads(_eval(root, val, path, "--window", "32x64", "--stride", "32x32").stdout)
    r = _eval(root, val, path, "--set", "eval.window=32x64", "--set", "eval.stride=32x32")
    assert r.exit_code == 0, r.output
    by_job = json.loads(r.stdout)
    assert by_job["tta"]["window"] == "32x64/32x32" and by_job["miou"] == explicit["miou"]
    plain = json.loads(_eval(root, val, path).stdout)
    whole = _eval(root, val, path, "--set", "eval.window=32x64", "--window", "whole", "--log")
    assert whole.exit_code == 0, whole.output
    assert "tta" not in json.loads(whole.stdout)
    assert json.loads(whole.stdout)["miou"] == plain["miou"]
    # the job's scales and flip are the default too; --scales 1 --no-flip is the paper's protocol
    sets = ("--set", "eval.scales=[0.5, 1]", "--set", "eval.flip=true")
    explicit = json.loads(_eval(root, val, path, "--scales", "0.5,1", "--flip").stdout)
    by_job = json.loads(_eval(root, val, path, *sets, "--log").stdout)
    assert (by_job["tta"]["scales"], by_job["tta"]["flip"]) == ([0.5, 1.0], True)
    assert by_job["miou"] == explicit["miou"] and len(by_job["tta"]["passes"]) == 4
    assert by_job["tta"]["backbone_gmac"] == pytest.approx(explicit["tta"]["backbone_gmac"])
    overridden = json.loads(_eval(root, val, path, *sets, "--scales", "1", "--no-flip").stdout)
    assert "tta" not in overridden and overridden["miou"] == plain["miou"]
    # each logged evaluation records what it ran, not its job's keys: the whole-image one is plain
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    for run_id, label in ((json.loads(whole.stdout), ""), (by_job, "TTA 0.5,1.0 flip")):
        params = client.get_run(run_id["mlflow_run_id"]).data.params
        assert _augmentation(params) == label, params

    # report labels: a training run whose job slides or augments; an evaluation run's, as older
    # cadist logged them (and none for unset keys)
    assert _augmentation({"eval.window": "64x64", "eval.stride": "None"}) == "slide 64x64/43x43"
    assert _augmentation({"eval.window": "None", "eval.stride": "None"}) == ""
    train = {"eval.scales": "0.75,1.0", "eval.flip": "False", "eval.window": "None"}
    assert _augmentation(train) == "TTA 0.75,1.0"
    tta = {"eval.tta_scales": "1.0", "eval.tta_flip": "True", "eval.window": "None"}
    assert _augmentation(tta) == "TTA 1.0 flip"
    old = {"eval.tta_scales": "1.0", "eval.tta_flip": "False", "eval.window": "64x64/32x32"}
    assert _augmentation(old) == "slide 64x64/32x32"
