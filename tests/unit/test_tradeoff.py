"""`cadist eval --vary`: one set of weights evaluated at several settings (the tiny edge model on
generated 64×128 scenes), each setting equal to its own `cadist eval --set`, the Pareto front,
the figure and the nested MLflow runs (SQLite store); and its errors."""

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from cadist.cli import main
from cadist.nets.build import build_model
from cadist.nets.stats import mac_line

from ..conftest import tiny_shards

DEMO = Path(__file__).resolve().parents[2] / "jobs" / "demo.yaml"
MODEL = "deeplabv3_batch_ap_resnet_tiny"


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    root = tmp_path_factory.mktemp("vary")
    _, val = tiny_shards(root, num_train=2, num_val=3, seed=5)
    torch.manual_seed(0)
    path = root / "weights.pt"
    torch.save(build_model(MODEL, num_classes=19).state_dict(), path)
    return root, val, path


def _eval(weights, *more):
    root, val, path = weights
    args = ["eval", str(DEMO), "--ckpt", str(path), "--device", "cpu",
            "--set", f"model.name={MODEL}", "--set", f"data.val_shards={val}",
            "--set", "data.num_workers=0", "--set", "mlflow.experiment=vary",
            "--set", f"mlflow.tracking_uri=sqlite:///{root / 'mlflow.db'}", *more]  # fmt: skip
    return CliRunner().invoke(main, args)


def _front(rows):
    """By hand: a row is on the front unless another has at least its mIoU at most its GMac,
    and is better in one."""
    return [
        not any(
            o is not r
            and o["miou"] >= r["miou"]
            and o["backbone_gmac"] <= r["backbone_gmac"]
            and (o["miou"] > r["miou"] or o["backbone_gmac"] < r["backbone_gmac"])
            for o in rows
        )
        for r in rows
    ]


def test_vary_evaluates_each_setting_as_its_own_eval_and_logs_them_nested(weights, tmp_path):
    root = weights[0]
    plot = tmp_path / "figs" / "tradeoff.png"
    r = _eval(
        weights,
        "--set",
        "model.trimap_width=1",
        "--vary",
        "model.edge_threshold=0.1,0.8,100",
        "--log",
        "--plot",
        str(plot),
    )
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    rows = out["results"]
    assert [row["setting"] for row in rows] == [
        {"model.edge_threshold": t} for t in (0.1, 0.8, 100)
    ]
    line = mac_line(MODEL, "os8to16", 64, 128)
    for row in rows:
        # the same figures as evaluating that setting alone
        t = row["setting"]["model.edge_threshold"]
        sets = ["--set", "model.trimap_width=1", "--set", f"model.edge_threshold={t}"]
        alone = json.loads(_eval(weights, *sets).stdout)
        assert row["miou"] == alone["miou"]
        assert row["high_res_fraction"] == pytest.approx(alone["high_res_fraction"], abs=1e-12)
        # GMac per image: the method's line at the image size and the setting's high-res share
        assert row["backbone_gmac"] == pytest.approx(line.backbone(row["high_res_fraction"]))
        assert alone["backbone_gmac"] == pytest.approx(row["backbone_gmac"])
        assert row["backbone_gmac_computed"] <= row["backbone_gmac"]
    fractions = [row["high_res_fraction"] for row in rows]
    # a higher threshold marks fewer edges: fewer cells stay at high resolution, fewer MACs
    assert fractions[0] > fractions[1] > fractions[2] == 0.0
    assert rows[2]["backbone_gmac"] == pytest.approx(line.backbone(0.0))
    assert [row["pareto"] for row in rows] == _front(rows) and rows[2]["pareto"]
    on = sorted((row for row in rows if row["pareto"]), key=lambda row: row["backbone_gmac"])
    assert out["pareto"] == [row["setting"] for row in on]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out["plot"] == str(plot)
    assert "[2/3] edge_threshold=0.8: mIoU" in r.stderr
    # MLflow: one run per setting, nested under the `<job>-vary` run that holds the results
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    parent = client.get_run(out["mlflow_run_id"])
    assert parent.info.run_name == "demo-vary" and parent.info.status == "FINISHED"
    assert parent.data.params["vary.model.edge_threshold"] == "[0.1, 0.8, 100]"
    arts = {a.path for a in client.list_artifacts(parent.info.run_id, "vary")}
    assert arts == {"vary/results.json", "vary/tradeoff.png"}
    for row in rows:
        child = client.get_run(row["mlflow_run_id"])
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        t = row["setting"]["model.edge_threshold"]
        assert child.info.run_name == f"demo-eval-edge_threshold={t}"
        assert float(child.data.params["model.edge_threshold"]) == t
        assert child.data.metrics["macs/backbone_gmac"] == pytest.approx(row["backbone_gmac"])
        assert child.data.metrics["val/high_res_fraction"] == row["high_res_fraction"]
    # `cadist report` lists the settings' runs beside each other (not the parent: no figures)
    rep = CliRunner().invoke(main, ["report", "--experiment", "vary", "--tracking-uri",
                                    f"sqlite:///{root / 'mlflow.db'}", "--json"])  # fmt: skip
    assert rep.exit_code == 0, rep.output
    names = sorted(row["run"] for row in json.loads(rep.stdout)["runs"])
    assert names == sorted(f"demo-eval-edge_threshold={t}" for t in (0.1, 0.8, 100))


def test_vary_takes_every_combination_and_the_evaluation_protocol(weights):
    r = _eval(weights, "--vary", "model.edge_threshold=0.1,0.3", "--vary", "model.trimap_width=1,5")
    assert r.exit_code == 0, r.output
    settings = [row["setting"] for row in json.loads(r.stdout)["results"]]
    assert settings == [{"model.edge_threshold": t, "model.trimap_width": w}
                        for t in (0.1, 0.3) for w in (1, 5)]  # fmt: skip
    # the protocol too: mirrored, each image costs both passes
    r = _eval(weights, "--vary", "eval.flip=false,true")
    assert r.exit_code == 0, r.output
    plain, flipped = json.loads(r.stdout)["results"]
    line = mac_line(MODEL, "os8to16", 64, 128)
    assert flipped["backbone_gmac"] > plain["backbone_gmac"] > line.backbone(0.0) * 0.99
    alone = json.loads(_eval(weights, "--flip").stdout)
    assert flipped["miou"] == alone["miou"]
    assert flipped["backbone_gmac"] == pytest.approx(alone["tta"]["backbone_gmac"])
    # list values: a YAML list of them
    r = _eval(weights, "--vary", "eval.scales=[[1.0],[0.5,1.0]]")
    assert r.exit_code == 0, r.output
    assert [row["setting"] for row in json.loads(r.stdout)["results"]] == [
        {"eval.scales": [1.0]},
        {"eval.scales": [0.5, 1.0]},
    ]


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (
            ["--vary", "data.val_shards=a,b"],
            "--vary data.val_shards: not a key an evaluation can vary",
        ),
        (["--vary", "model.edge_threshold"], "--vary 'model.edge_threshold': expected KEY=V1,V2"),
        (
            ["--vary", "model.edge_threshold=0.1", "--vary", "model.edge_threshold=0.2"],
            "given twice",
        ),
        (["--vary", "model.edge_threshold=[0.1"], "expected values separated by commas"),
        (["--vary", "eval.flip=true,false", "--flip"], "--vary eval.flip and --flip: the option"),
        (["--vary", "model.edge_threshold=0.1,-1"], "model.edge_threshold"),
        (["--vary", "model.trimap_width=1", "--per-image"], "--per-image goes with one setting"),
        (
            ["--vary", "eval.window=64x64,48x64"],
            "--vary window=48x64: window 48x64: "
            + MODEL
            + " takes inputs whose sides are multiples of 32",
        ),
        (["--plot", "x.png"], "--plot goes with --vary"),
    ],
)
def test_vary_errors_are_one_clear_line(weights, args, said):
    r = _eval(weights, *args)
    assert r.exit_code != 0 and said in r.output, r.output
    assert "Traceback" not in r.output


def test_vary_the_head_on_the_same_weights(weights):
    """`--vary model.head=dense,adaptive` (and `--head`): the same weights with each head; the
    adaptive head's total GMac is the dense head's minus what its OS16 elements save, and
    `--head adaptive` alone gives the same figures."""
    r = _eval(weights, "--set", "model.trimap_width=1", "--set", "model.edge_threshold=0.8",
              "--vary", "model.head=dense,adaptive")  # fmt: skip
    assert r.exit_code == 0, r.output
    dense, ada = json.loads(r.stdout)["results"]
    assert (dense["setting"], ada["setting"]) == (
        {"model.head": "dense"},
        {"model.head": "adaptive"},
    )
    p = dense["high_res_fraction"]
    assert ada["high_res_fraction"] == p and 0 < p < 1  # the same mask
    assert ada["backbone_gmac"] == pytest.approx(dense["backbone_gmac"])
    lo = mac_line(MODEL, "os8to16", 64, 128, "adaptive")
    assert ada["total_gmac"] == pytest.approx(ada["backbone_gmac"] + lo.head(p))
    assert dense["total_gmac"] - ada["total_gmac"] == pytest.approx(
        (lo.head(1.0) - lo.head(0.0)) * (1 - p)  # the dense head is the adaptive one at p = 1
    )  # fmt: skip
    assert ada["total_gmac"] < dense["total_gmac"]
    one = _eval(weights, "--set", "model.trimap_width=1", "--set", "model.edge_threshold=0.8",
                "--head", "adaptive")  # fmt: skip
    assert one.exit_code == 0, one.output
    alone = json.loads(one.stdout)
    assert alone["miou"] == pytest.approx(ada["miou"]) and alone["total_gmac"] == pytest.approx(
        ada["total_gmac"]
    )
