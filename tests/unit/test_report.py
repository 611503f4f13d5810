"""`cadist report` against a real MLflow store (SQLite): best-during-training mIoU per run and the
statistics of that evaluation, beside the released numbers."""

import json
from pathlib import Path

from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from cadist.cli import main
from cadist.tracking.runs import Tracker, new_run


def _run(uri, name, params, history, job=True):
    rid = new_run(uri, "exp", name, {"cadist.job": name} if job else {"cadist.sweep": name})
    t = Tracker(uri, rid)
    t.log_params(params)
    for key, points in history.items():
        for step, value in points:
            t.log_metrics({key: value}, step)
    t.finish()


def test_report_picks_the_best_evaluation_and_its_statistics(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    _run(
        uri,
        "os16",
        {"model.name": "deeplabv3_resnet101", "model.output_stride": 16},
        {"val/miou": [(100, 0.5), (200, 0.7), (300, 0.65)], "macs/backbone_gmac": [(0, 416.76)]},
    )
    _run(
        uri,
        "edge",
        {
            "model.name": "deeplabv3_batch_ap_resnet101",
            "model.output_stride": 16,
            "model.edge_threshold": 0.15,
            "model.trimap_width": 11,
        },
        {
            "val/miou": [(100, 0.6), (200, 0.62)],
            "val/high_res_fraction": [(100, 0.5), (200, 0.4)],
            "macs/backbone_gmac": [(100, 927.4), (200, 828.2)],
            "macs/total_gmac": [(100, 1438.1), (200, 1339.0)],
            "val/images_per_s": [(100, 3.1), (200, 3.25)],
        },
    )
    _run(uri, "a-sweep", {}, {"sweep/best_miou": [(0, 0.7)]}, job=False)  # not a training run
    r = CliRunner().invoke(main, ["report", "--experiment", "exp", "--tracking-uri", uri, "--json"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)["runs"]
    assert [row["run"] for row in rows] == ["os16", "edge"]  # by backbone GMac
    dense, edge = rows
    assert (dense["best_miou"], dense["best_step"], dense["backbone_gmac"]) == (0.7, 200, 416.76)
    assert dense["paper_miou"] == 0.762 and dense["model"] == "deeplabv3_resnet101 OS16"
    assert (edge["best_miou"], edge["high_res_fraction"], edge["backbone_gmac"]) == (
        0.62,
        0.4,
        828.2,
    )
    assert edge["paper_miou"] == 0.773 and edge["steps"] == 200
    # at the best evaluation: its total GMac and evaluation throughput; how its mask is made
    assert (edge["total_gmac"], edge["images_per_s"]) == (1339.0, 3.25)
    assert (edge["mask"], dense["mask"]) == ("edges τ 0.15, trimap 11", "dense")
    r = CliRunner().invoke(main, ["report", "--experiment", "exp", "--tracking-uri", uri])
    assert (
        r.exit_code == 0
        and (
            "| edge | deeplabv3_batch_ap_resnet101 | edges τ 0.15, trimap 11 | 0.6200 | 200 | – | "
            "0.4000 | 828.2000 | 1339.0000 | 3.2 | 0.7730 | FINISHED |"
        )
        in r.stdout
    ), r.stdout
    r = CliRunner().invoke(main, ["report", "--experiment", "nope", "--tracking-uri", uri])
    assert r.exit_code == 2 and "no experiment 'nope'; experiments there: exp" in r.output
    # the trade-off figure: os16 (0.70 @ 416.76) dominates edge (0.62 @ 828.2)
    r = CliRunner().invoke(
        main,
        ["report", "--experiment", "exp", "--tracking-uri", uri, "--plot", str(tmp_path / "t.png")],
    )
    assert r.exit_code == 0, r.output
    assert "Pareto front: os16)" in r.stderr
    from PIL import Image

    with Image.open(tmp_path / "t.png") as im:
        assert im.size == (840, 540)


def test_per_class_table_at_each_runs_best_evaluation(tmp_path):
    """`--per-class`: the per-class IoU logged at each run's best step (not the last), a class per
    row in trainId order, and with `--baseline` each other run's difference to it."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    dense = {"model.name": "deeplabv3_resnet101", "model.output_stride": 8}
    _run(
        uri,
        "os8",
        dense,
        {
            "val/miou": [(100, 0.70), (200, 0.75)],
            "val/iou/road": [(100, 0.90), (200, 0.95)],
            "val/iou/pole": [(100, 0.40), (200, 0.50)],
            "val/iou/traffic light": [(100, 0.20), (200, 0.30)],  # MLflow key: traffic_light
        },
    )
    _run(uri, "edge", dense | {"model.name": "deeplabv3_batch_ap_resnet101"},
         {"val/miou": [(100, 0.74), (200, 0.72)], "val/iou/road": [(100, 0.96), (200, 0.99)],
          "val/iou/pole": [(100, 0.45), (200, float("nan"))],
          "val/iou/traffic light": [(100, 0.25), (200, 0.1)]})  # fmt: skip
    base = ["report", "--experiment", "exp", "--tracking-uri", uri]
    r = CliRunner().invoke(main, [*base, "--per-class", "--json"])
    assert r.exit_code == 0, r.output
    by_run = {row["run"]: row["per_class"] for row in json.loads(r.stdout)["runs"]}
    assert by_run == {"os8": {"road": 0.95, "pole": 0.5, "traffic light": 0.3},
                      "edge": {"road": 0.96, "pole": 0.45, "traffic light": 0.25}}  # fmt: skip
    r = CliRunner().invoke(main, [*base, "--per-class", "--baseline", "os8"])
    assert r.exit_code == 0, r.output
    table = r.stdout.split("per-class IoU at each run's best evaluation:")[1]
    lines = table.strip().splitlines()
    assert lines[0] == "| class | os8 (baseline) | edge |"
    assert lines[2] == "| road | 0.9500 | 0.9600 (+0.0100) |"  # road first: trainId 0
    assert "| pole | 0.5000 | 0.4500 (-0.0500) |" in lines
    assert "| sidewalk | – | – |" in lines  # not logged
    # one row per class, a two-word class too (its MLflow key has "_" for " ")
    assert [ln for ln in lines if "traffic" in ln and "light" in ln] == [
        "| traffic light | 0.3000 | 0.2500 (-0.0500) |"
    ]
    assert len(lines) == 2 + 19 + 1  # header, rule, the 19 classes, mIoU
    assert lines[-1] == "| **mIoU** | 0.7500 | 0.7400 (-0.0100) |"
    r = CliRunner().invoke(main, [*base, "--per-class", "--baseline", "os16"])
    assert (
        r.exit_code == 2
        and "--baseline os16: no such run" in r.output
        and "(runs: edge, os8)" in r.output
    )
    r = CliRunner().invoke(main, [*base, "--baseline", "os8"])
    assert r.exit_code == 2 and "--baseline goes with --per-class" in r.output
    r = CliRunner().invoke(main, [*base, "--json"])  # without --per-class: not fetched
    assert all("per_class" not in row for row in json.loads(r.stdout)["runs"])


def test_tradeoff_plot_marks_exactly_the_front(tmp_path):
    import numpy as np
    from PIL import Image

    from cadist.results.plots import tradeoff_png

    pts = [
        {"label": "a", "g": 1.0, "m": 0.50},
        {"label": "b", "g": 2.0, "m": 0.60},
        {"label": "c", "g": 2.5, "m": 0.55},  # dominated by b
        {"label": "d", "g": 3.0, "m": 0.70},
        {"label": "e", "g": None, "m": 0.99},  # not measured: left out
    ]
    front = tradeoff_png(pts, tmp_path / "f.png", "g", "m")
    assert front == ["a", "b", "d"]
    assert not [p for p in tmp_path.iterdir() if p.name != "f.png"]  # no temporary file left
    rgb = np.asarray(Image.open(tmp_path / "f.png").convert("RGB")).astype(int)
    red = (rgb[..., 0] > 180) & (rgb[..., 1] < 80) & (rgb[..., 2] < 80)  # the front's line
    assert red.sum() > 100
    assert tradeoff_png(pts[2:3], tmp_path / "one.png", "g", "m") == ["c"]


def test_trade_off_labels_do_not_overlap_each_other_or_the_points():
    """Six close points with long labels (a sweep's): each label where it covers no other label
    and no other point; placed right-above unless that is taken."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cadist.results.plots import place_labels

    pts = [(1.141, 0.6629, "edge_threshold=0.1, trimap_width=11"),
           (1.158, 0.6630, "edge_threshold=0.05, trimap_width=11"),
           (1.150, 0.6627, "edge_threshold=0.07, trimap_width=21"),
           (1.090, 0.6602, "edge_threshold=0.15, trimap_width=11"),
           (1.020, 0.6578, "edge_threshold=0.25, trimap_width=11"),
           (0.999, 0.6572, "edge_threshold=0.4, trimap_width=11"),
           (0.900, 0.6500, "alone")]  # fmt: skip
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    try:
        ax.scatter([p[0] for p in pts], [p[1] for p in pts])
        ax.margins(0.15)
        boxes = place_labels(ax, pts)
        dots = [ax.transData.transform((x, y)) for x, y, _ in pts]
    finally:
        plt.close(fig)
    assert len(boxes) == len(pts)
    for i, a in enumerate(boxes):
        assert not any(a.overlaps(b) for b in boxes[i + 1 :]), i
        assert not any(a.contains(*d) for j, d in enumerate(dots) if j != i), i
    # a label with room sits at its default place: right of and above its point
    assert boxes[-1].x0 > dots[-1][0] and boxes[-1].y0 > dots[-1][1]


def test_eval_log_records_a_run_that_report_lists(tmp_path):
    """`cadist eval --log` of a dense and an adaptive checkpoint on generated shards: MLflow runs
    with the evaluation's numbers and GMac, listed by `cadist report` beside training runs."""
    import pytest
    import torch

    from cadist.nets.build import build_model
    from cadist.nets.macs import count_dense
    from cadist.nets.stats import mac_line
    from cadist.nets.weights import save_weights

    from ..conftest import tiny_shards

    train, val = tiny_shards(tmp_path, num_train=2, num_val=2, seed=4)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    job = str(Path(__file__).parents[2] / "jobs" / "demo.yaml")
    common = ["--set", f"data.train_shards={train}", "--set", f"data.val_shards={val}",
              "--set", "data.num_workers=0", "--set", f"mlflow.tracking_uri={uri}",
              "--set", "mlflow.experiment=evals", "--set", "cluster.num_workers=1",
              "--device", "cpu", "--log"]  # fmt: skip
    out = {}
    for name, os_ in (("deeplabv3_resnet_tiny", 16), ("deeplabv3_batch_ap_resnet_tiny", 16)):
        torch.manual_seed(0)
        save_weights(build_model(name, os_), tmp_path / f"{name}.pt", model=name)
        r = CliRunner().invoke(
            main,
            ["eval", job, "--ckpt", str(tmp_path / f"{name}.pt"), "--set", f"model.name={name}",
             "--set", f"name={name}", *common],
        )  # fmt: skip
        assert r.exit_code == 0, r.output
        out[name] = json.loads(r.stdout)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    dense, ada = out["deeplabv3_resnet_tiny"], out["deeplabv3_batch_ap_resnet_tiny"]
    run = client.get_run(dense["mlflow_run_id"])
    assert run.info.run_name == "deeplabv3_resnet_tiny-eval" and run.info.status == "FINISHED"
    assert run.data.metrics["val/miou"] == pytest.approx(dense["miou"])
    assert run.data.metrics["macs/backbone_gmac"] == pytest.approx(
        count_dense("deeplabv3_resnet_tiny", 16, 64, 128)["backbone_gmac"]
    )
    assert run.data.tags["cadist.weights_source"].endswith("deeplabv3_resnet_tiny.pt")
    arun = client.get_run(ada["mlflow_run_id"])
    p = ada["high_res_fraction"]
    assert 0 < p <= 1 and arun.data.metrics["val/high_res_fraction"] == pytest.approx(p)
    line = mac_line("deeplabv3_batch_ap_resnet_tiny", "os8to16", 64, 128)
    assert arun.data.metrics["macs/backbone_gmac"] == pytest.approx(line.backbone(p))
    r = CliRunner().invoke(
        main, ["report", "--experiment", "evals", "--tracking-uri", uri, "--json"]
    )
    rows = {row["run"]: row for row in json.loads(r.stdout)["runs"]}
    assert rows["deeplabv3_batch_ap_resnet_tiny-eval"]["best_miou"] == pytest.approx(ada["miou"])
    assert rows["deeplabv3_resnet_tiny-eval"]["best_step"] == 0
    # the validation shards as the run's MLflow dataset input: name, digest, context, profile
    from cadist.data.stream import shard_set

    want = shard_set(val)
    (given,) = run.inputs.dataset_inputs
    assert (given.dataset.name, given.dataset.digest) == ("shards/val", want["digest"])
    assert [(t.key, t.value) for t in given.tags] == [("mlflow.data.context", "evaluation")]
    assert json.loads(given.dataset.profile) == {"num_shards": 1, "num_samples": 2}
    assert json.loads(given.dataset.source) == {"uri": str(val.resolve())}
    assert {row["val_data"] for row in rows.values()} == {f"shards/val@{want['digest']}"}
    assert "different validation shards" not in r.stderr
    # a run scored on other shards: the report says their mIoU do not compare
    _, other = tiny_shards(tmp_path / "other", num_train=2, num_val=2, seed=9)
    assert shard_set(other)["digest"] != want["digest"]
    name = "deeplabv3_resnet_tiny"
    r = CliRunner().invoke(
        main,
        ["eval", job, "--ckpt", str(tmp_path / f"{name}.pt"), "--set", f"model.name={name}",
         "--set", "name=elsewhere", *common, "--set", f"data.val_shards={other}"],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["report", "--experiment", "evals", "--tracking-uri", uri])
    assert r.exit_code == 0, r.output
    note = r.stderr
    assert "scored on different validation shards" in note and "do not compare" in note, note
    assert f"shards/val@{shard_set(other)['digest']}: elsewhere-eval" in note, note
    assert f"shards/val@{want['digest']}: deeplabv3_" in note, note


def test_report_reads_every_cadist_experiment_the_paper_ones_first_by_default(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # no database there: a read-only command says so and creates none
    missing = CliRunner().invoke(main, ["report", "--tracking-uri", uri])
    assert missing.exit_code == 2 and "no such database" in missing.output, missing.output
    assert list(tmp_path.iterdir()) == []
    MlflowClient(uri).search_experiments()  # an empty store
    empty = CliRunner().invoke(main, ["report", "--tracking-uri", uri])
    assert empty.exit_code == 2 and "no experiment holds cadist runs yet" in empty.output
    assert "(it holds no runs yet)" in empty.output

    def add(exp, name, model, gmac, miou):
        rid = new_run(uri, exp, name, {"cadist.job": name})
        t = Tracker(uri, rid)
        t.log_params({"model.name": model, "model.output_stride": 8})
        t.log_metrics({"val/miou": miou, "macs/backbone_gmac": gmac}, 100)
        t.finish()

    # after `cadist demo`: its experiment, with no arguments
    add("cadist-demo", "elsewhere", "deeplabv3_resnet101", 416.76, 0.70)
    new_run(uri, "no-cadist-runs", "x", {})  # an experiment without cadist runs: left out
    r = CliRunner().invoke(main, ["report", "--tracking-uri", uri, "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["experiments"] == ["cadist-demo"]
    # the paper jobs' experiments come first
    add("cityscapes-dense", "os8", "deeplabv3_resnet101", 1423.58, 0.77)
    add("cityscapes-adaptive", "edge", "deeplabv3_batch_ap_resnet101", 900.0, 0.76)
    r = CliRunner().invoke(main, ["report", "--tracking-uri", uri, "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["experiments"] == ["cityscapes-dense", "cityscapes-adaptive", "cadist-demo"]
    assert [row["run"] for row in out["runs"]] == ["elsewhere", "edge", "os8"]  # by GMac
    r = CliRunner().invoke(
        main, ["report", "--tracking-uri", uri, "--experiment", "cadist-demo", "--experiment",
               "cityscapes-dense", "--json"],
    )  # fmt: skip
    assert [row["run"] for row in json.loads(r.stdout)["runs"]] == ["elsewhere", "os8"]
