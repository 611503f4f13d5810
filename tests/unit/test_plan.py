"""`cadist train --dry-run`: the checks of a real start and what it would run, with nothing started
or written."""

import json
import os

from click.testing import CliRunner

from cadist.cli import main
from cadist.config.jobfile import load_job
from tests.conftest import tiny_shards
from tests.unit.test_resume import JOBS, _checkpoint


def _files(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_dry_run_checks_and_describes_without_starting_anything(tmp_path, monkeypatch):
    train, val = tiny_shards(tmp_path)
    monkeypatch.chdir(tmp_path)
    args = ["train", os.path.join(JOBS, "demo.yaml"), "--dry-run",
            "--set", f"data.train_shards={train}", "--set", f"data.val_shards={val}",
            "--set", "data.num_workers=1", "--set", "cluster.storage_path=runs",
            "--set", f"mlflow.tracking_uri=sqlite:///{tmp_path / 'ml.db'}"]  # fmt: skip
    before = _files(tmp_path)
    r = CliRunner().invoke(main, [*args, "--json"])
    assert r.exit_code == 0, r.output
    plan = json.loads(r.stdout)
    job = load_job(os.path.join(JOBS, "demo.yaml"), [])
    assert plan["start"] == {"fresh": True, "changes": []}
    assert plan["data"]["train"]["shards"] == 4 and plan["data"]["train"]["samples"] == 8
    assert plan["data"]["val"]["samples"] == 2
    b = plan["batch"]
    assert (b["global"], b["workers"], b["micro_batch"]) == (
        job.train.batch_size,
        job.cluster.num_workers,
        job.train.batch_size // job.cluster.num_workers,
    )
    assert b["epochs"] == round(job.train.iterations * job.train.batch_size / 8, 2)
    assert plan["cluster"]["where"] == "a local Ray on this machine"
    assert plan["deepspeed"]["train_batch_size"] == job.train.batch_size
    assert plan["deepspeed"]["zero_optimization"]["stage"] == job.deepspeed.zero_stage
    assert plan["mlflow"]["continues_run"] is None
    # GMac per validation image (64×128): the dense demo model's, an adaptive model's line in p
    from cadist.nets.macs import count_dense
    from cadist.nets.stats import mac_line

    dense = count_dense(job.model.name, job.model.output_stride, 64, 128)
    assert plan["macs"] == {"input_hw": [64, 128]} | {
        k: round(dense[k], 2) for k in ("backbone_gmac", "head_gmac", "total_gmac")
    }
    r = CliRunner().invoke(
        main, [*args, "--json", "--set", "model.name=deeplabv3_batch_ap_resnet_tiny"]
    )
    assert r.exit_code == 0, r.output
    line = mac_line("deeplabv3_batch_ap_resnet_tiny", job.model.adaptive_mode, 64, 128)
    macs = json.loads(r.stdout)["macs"]
    assert macs["backbone_gmac_at_p0"] == round(line.backbone(0.0), 2)
    assert macs["backbone_gmac_per_p"] == round(line.backbone(1.0) - line.backbone(0.0), 2) > 0
    # the evaluation protocol: the paper's, or the job's passes and the forwards they cost
    assert plan["eval"] == {"interval": job.eval.interval, "protocol": "", "passes": 1,
                            "forwards_per_image": 1}  # fmt: skip
    sets = [
        "--set",
        "eval.scales=[0.5, 1]",
        "--set",
        "eval.flip=true",
        "--set",
        "eval.window=64x64",
    ]
    r = CliRunner().invoke(main, [*args, *sets])
    assert r.exit_code == 0, r.output
    # scale 1: 64×128 in three 64×64 crops; 0.5: 32×64 in one; each also mirrored
    assert (
        f"evaluates every {job.eval.interval} steps and at the end: TTA 0.5,1.0 flip slide "
        "64x64/43x43 — 4 passes, 8 forwards per 64×128 validation image" in r.stdout
    ), r.stdout
    assert _files(tmp_path) == before  # nothing written: no run folder, no MLflow store

    # a rerun: resumes from the newest checkpoint, lists what changes, continues the MLflow run
    meta = tmp_path / "runs" / ".cadist"
    meta.mkdir(parents=True)
    first = load_job(os.path.join(JOBS, "demo.yaml"), [a for a in args[4::2]])
    from cadist.cluster.paths import absolute_paths

    (meta / "demo.yaml").write_text(absolute_paths(first).to_yaml())
    (meta / "demo.mlflow.json").write_text(json.dumps({"run_id": "abc123"}))
    _checkpoint(tmp_path / "runs" / "demo", 200)
    r = CliRunner().invoke(main, [*args, "--set", "train.iterations=900"])
    assert r.exit_code == 0, r.output
    assert "resumes from its checkpoint at step 200 with train.iterations 600 → 900" in r.stdout
    assert "continues run abc123" in r.stdout
    assert "8 images in 4 shards" in r.stdout and "nothing was started" in r.stdout
    # a change a resume cannot take is the error `cadist train` would give
    r = CliRunner().invoke(main, [*args, "--set", "train.lr_head=0.5"])
    assert r.exit_code != 0 and "would resume from its checkpoint at step 200" in r.output
    # --restart: checked as a first start (the earlier run would be set aside)
    r = CliRunner().invoke(main, [*args, "--set", "train.lr_head=0.5", "--restart", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["start"]["fresh"] is True
    # elastic: the range is shown, and checked against this machine at its low end
    r = CliRunner().invoke(main, [*args, "--set", "cluster.min_workers=1", "--restart"])
    assert r.exit_code == 0, r.output
    assert "2 workers of 1 CPU (elastic: down to 1)" in r.stdout
    # a job this machine cannot hold fails as it would at a real start
    r = CliRunner().invoke(main, [*args, "--set", "cluster.use_gpu=true"])
    assert r.exit_code != 0 and "cluster.use_gpu is true" in r.output


def test_sweep_dry_run_shows_trials_and_how_many_run_at_once(tmp_path, monkeypatch):
    import yaml

    train, val = tiny_shards(tmp_path)
    monkeypatch.chdir(tmp_path)
    sweep = {
        "name": "plan",
        "job": os.path.abspath(os.path.join(JOBS, "demo.yaml")),
        "set": {"data.train_shards": str(train), "data.val_shards": str(val),
                "model.name": "deeplabv3_batch_ap_resnet_tiny", "cluster.num_workers": 1,
                "cluster.storage_path": "runs", "train.batch_size": 2,
                "mlflow.tracking_uri": f"sqlite:///{tmp_path / 'ml.db'}"},
        "search": {"model.edge_threshold": {"uniform": [0.1, 0.3]},
                   "model.trimap_width": {"choice": [5, 11]}},
        "objectives": {"val/miou": "max", "macs/backbone_gmac": "min"},
        "num_samples": 6,
        "max_concurrent": 4,
    }  # fmt: skip
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    before = _files(tmp_path)
    r = CliRunner().invoke(main, ["tune", "sweep.yaml", "--dry-run", "--json"])
    assert r.exit_code == 0, r.output
    plan = json.loads(r.stdout)
    cpus = len(os.sched_getaffinity(0))
    assert plan["trials"] == 6 and plan["resumes"] is False
    assert plan["at_once"] == min(4, cpus)  # trials of one 1-CPU worker side by side
    assert plan["search"] == sweep["search"]
    assert plan["trial"]["epochs"] == round(600 * 2 / 8, 2)
    assert plan["macs"]["backbone_gmac_per_p"] > 0
    assert plan["eval"]["protocol"] == "" and plan["eval"]["forwards_per_image"] == 1
    assert _files(tmp_path) == before
    r = CliRunner().invoke(main, ["tune", "sweep.yaml", "--dry-run", "--set", "num_samples=3"])
    assert r.exit_code == 0, r.output
    assert "sweep plan (sweep.yaml): 3 trials of" in r.stdout
    assert "search model.trimap_width: choice [5, 11]" in r.stdout
    assert f"at once: {min(4, cpus)} trial(s) on a local Ray on this machine" in r.stdout
    every = load_job(os.path.join(JOBS, "demo.yaml"), []).eval.interval
    assert f"each trial evaluates every {every} steps and at the end: whole images" in r.stdout
    # a searched value the job schema refuses is the error `cadist tune` gives
    r = CliRunner().invoke(
        main, ["tune", "sweep.yaml", "--dry-run", "--set", "set.cluster.num_workers=0"]
    )
    assert r.exit_code != 0 and "cluster.num_workers" in r.output
