"""Training on real components: a local Ray cluster (2 workers), DeepSpeed on the CPU (gloo),
real WebDataset shards and a real MLflow SQLite store."""

import json
import os
import pickle
import signal
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import ray
import torch
from mlflow.tracking import MlflowClient

from cadist.config.jobfile import load_job
from cadist.data.shards import build_shards
from cadist.data.synthetic import write_tree
from cadist.errors import ConfigError
from cadist.train.driver import run_training
from cadist.train.resume import zero_world

from ..conftest import free_port, s3_server, shared_ray

pytestmark = pytest.mark.slow
JOB = Path(__file__).resolve().parents[2] / "jobs" / "demo.yaml"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    write_tree(root / "cs", num_train=16, num_val=6, height=64, width=128, seed=1)
    build_shards(root / "cs", "train", root / "shards", samples_per_shard=2, progress=False)
    build_shards(root / "cs", "val", root / "shards", samples_per_shard=2, progress=False)
    return root


@pytest.fixture(scope="module")
def ray_local():
    """The local Ray this module shares with test_submit and test_console (conftest)."""
    return shared_ray()


class _Planted:
    """Unpickled the way DeepSpeed loads its own files, it would create `marker`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def make_job(workdir, name, **extra):
    overrides = {
        "name": name,
        "data.train_shards": str(workdir / "shards" / "train-manifest.json"),
        "data.val_shards": str(workdir / "shards" / "val-manifest.json"),
        "data.crop_size": 64,
        "data.num_workers": 1,
        "data.shuffle_buffer": 4,
        "data.steps_per_epoch": 10,
        "train.iterations": 30,
        "train.batch_size": 4,
        "train.log_every": 5,
        "train.checkpoint_every": 10,
        "eval.interval": 15,
        "eval.log_images": 2,
        "cluster.storage_path": str(workdir / "runs"),
        "mlflow.tracking_uri": f"sqlite:///{workdir / 'mlflow.db'}",
        "mlflow.experiment": "itest",
    }
    overrides.update(extra)
    return load_job(JOB, [f"{k}={v}" for k, v in overrides.items()])


def _ignored_pixels(workdir):
    import numpy as np
    from PIL import Image

    from cadist.data.cityscapes import label_lut

    lut = label_lut()
    return sum(
        int((lut[np.asarray(Image.open(p))] == 255).sum())
        for p in (workdir / "cs" / "gtFine" / "val").glob("*/*_labelIds.png")
    )


def _train_workers():
    """Ray Train worker processes of this process's own Ray (its raylet is our child): never those
    of another Ray on the machine (a parallel test worker's)."""
    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            if any("RayTrainWorker" in c for c in p.cmdline()):
                p.info = {"create_time": p.create_time()}
                out.append(p)
        except psutil.Error:
            pass
    return out


def _artifacts(client, run_id, path=""):
    out = []
    for a in client.list_artifacts(run_id, path):
        out += _artifacts(client, run_id, a.path) if a.is_dir else [a.path]
    return out


def test_train_logs_everything_and_rerun_resumes(workdir, ray_local, capsys):
    job = make_job(
        workdir,
        "itest-main",
        **{"mlflow.register_model": "itest-model", "mlflow.system_metrics_s": 1},
    )
    r = run_training(job, "itest")
    assert r.metrics["step"] == 30 and 0 <= r.metrics["val/miou"] <= 1
    # Ray Train's own actors ran (its controller, the workers), but no Ray Data actor: the job has
    # no Ray Datasets (cadist.train.backend.CadistTrainer)
    from ray.util.state import list_actors

    ran = {a.class_name for a in list_actors(address=ray_local.dashboard, limit=1000)}
    assert {"TrainController", "RayTrainWorker"} <= ran and "DatasetManager" not in ran, ran
    client = MlflowClient(r.tracking_uri)
    run = client.get_run(r.run_id)
    assert run.info.status == "FINISHED"
    loss = [
        m.value
        for m in sorted(client.get_metric_history(r.run_id, "train/loss"), key=lambda m: m.step)
    ]
    assert len(loss) == 6 and loss[-1] < 0.8 * loss[0], loss  # the loss falls
    m = run.data.metrics
    for key in (
        "train/lr",
        "train/images_per_s",
        "val/miou",
        "val/iou/road",
        "val/iou/sky",
        "macs/backbone_gmac",
        "macs/total_gmac",
    ):
        assert key in m, key
    assert m["val/miou"] == pytest.approx(r.metrics["val/miou"])
    # the node's sampler (one per node, on its first worker): CPU and memory use once a second
    cpu = client.get_metric_history(r.run_id, "system/node0/cpu_utilization_percentage")
    assert len(cpu) >= 3 and all(0 <= p.value <= 100 for p in cpu)
    assert sorted(p.step for p in cpu) == list(range(len(cpu)))
    assert m["system/node0/system_memory_usage_megabytes"] > 0
    assert m["train/lr"] == pytest.approx(1e-6)  # the poly schedule's floor at the last step
    assert (
        run.data.params["train.iterations"] == "30"
        and run.data.params["model.name"] == "deeplabv3_resnet_tiny"
    )
    tags = run.data.tags
    assert tags["cadist.world_size"] == "2" and tags["cadist.device"] == "cpu"
    assert tags["cadist.version"] and len(tags["cadist.git_commit"]) >= 7
    arts = _artifacts(client, r.run_id)
    for a in (
        "config/job.yaml",
        "eval/iou_last.csv",
        "eval/iou_best.csv",
        "checkpoints/best.pt",
        "checkpoints/last.pt",
    ):
        assert a in arts, (a, arts)
    assert sum(a.startswith("predictions/step_00000030/") for a in arts) == 2
    kept = sorted(p.name for p in (workdir / "runs" / "itest-main").glob("step_*"))
    assert kept == ["step_00000020", "step_00000030"]  # keep_checkpoints: 2
    ckpt = Path(r.checkpoint)
    assert (ckpt / "model.pt").is_file() and (ckpt / "rng_rank1.json").is_file()
    assert load_job(workdir / "runs" / ".cadist" / "itest-main.yaml") == job
    # the checkpoint's weights record their model, as exports do (predict needs no --model)
    from cadist.tracking.sources import recorded_model

    name, section = recorded_model(ckpt / "model.pt")
    assert (name, section) == (job.model.name, job.model.model_dump())

    # `cadist eval` on the last checkpoint reproduces the mIoU the 2-worker run logged
    from cadist.eval.evaluate import evaluate_job

    ev = evaluate_job(job, ckpt)
    assert ev["miou"] == pytest.approx(r.metrics["val/miou"], abs=1e-9)
    assert ev["pixels"] == 6 * 64 * 128 - _ignored_pixels(workdir)
    # … and so do the last weights the run logged to MLflow, fetched by URI from the job's store
    ev_uri = evaluate_job(job, f"runs:/{r.run_id}/checkpoints/last.pt")
    assert ev_uri["miou"] == pytest.approx(ev["miou"], abs=1e-9)

    # the best weights became version 1 of the registered model; by name they score the best mIoU
    best_miou = max(m.value for m in client.get_metric_history(r.run_id, "val/miou"))
    (v1,) = client.search_model_versions("name = 'itest-model'")
    assert (
        str(v1.version) == "1"
        and v1.run_id == r.run_id
        and v1.source.startswith(f"runs:/{r.run_id}/registered/step_")
    )
    assert client.get_run(r.run_id).data.tags["cadist.registered_model"] == "itest-model/1"
    ev_reg = evaluate_job(job, "models:/itest-model/latest")
    assert ev_reg["miou"] == pytest.approx(best_miou, abs=1e-9)

    bad = make_job(workdir, "itest-badweights", **{"model.weights": str(workdir / "nope.pt")})
    with pytest.raises(ConfigError, match=r"model\.weights: .*nope\.pt does not exist"):
        run_training(bad, "itest")

    # rerunning the same job name resumes from step 30 instead of starting over; it may train
    # longer, on another number of workers (the ZeRO-1 optimizer state split over 2 workers is
    # re-split for 1), but not something else (refused before Ray or MLflow is touched)
    runs_before = len(client.search_runs([run.info.experiment_id]))
    with pytest.raises(ConfigError, match=r"train\.lr_head 0\.1 → 0\.5\); a resumed run cannot"):
        run_training(make_job(workdir, "itest-main", **{"train.lr_head": 0.5}), "itest")
    assert len(client.search_runs([run.info.experiment_id])) == runs_before
    r2 = run_training(
        make_job(
            workdir,
            "itest-main",
            **{
                "train.iterations": 40,
                "cluster.num_workers": 1,
                "mlflow.register_model": "itest-model",
                "mlflow.system_metrics_s": 1,
            },  # fmt: skip
        ),
        "itest",
    )
    assert r2.run_id == r.run_id and r2.metrics["step"] == 40
    # once more, as it is: it reached its last step, so nothing trains (no Ray Train run: the
    # result comes from the storage path and MLflow)
    capsys.readouterr()
    resumes = len(client.get_metric_history(r.run_id, "train/resumed_from_step"))
    r3 = run_training(
        make_job(workdir, "itest-main", **{"train.iterations": 40, "cluster.num_workers": 1,
                 "mlflow.register_model": "itest-model", "mlflow.system_metrics_s": 1}),
        "itest",
    )  # fmt: skip
    assert (r3.run_id, r3.metrics["step"], r3.checkpoint) == (r.run_id, 40, r2.checkpoint)
    assert r3.metrics["val/miou"] == pytest.approx(r2.metrics["val/miou"])
    assert "job itest-main already reached its last step 40" in capsys.readouterr().err
    assert len(client.get_metric_history(r.run_id, "train/resumed_from_step")) == resumes
    steps = [m.step for m in client.get_metric_history(r.run_id, "train/loss")]
    assert sorted(steps) == [5, 10, 15, 20, 25, 30, 35, 40]
    run2 = client.get_run(r.run_id)
    assert run2.data.metrics["train/resumed_from_step"] == 30
    # the shards as MLflow dataset inputs, once each however often the run resumes
    from cadist.data.stream import shard_set

    inputs = {
        next(t.value for t in d.tags if t.key == "mlflow.data.context"): d.dataset
        for d in run2.inputs.dataset_inputs
    }
    assert len(run2.inputs.dataset_inputs) == 2 and set(inputs) == {"training", "validation"}
    for context, key in (("training", "train_shards"), ("validation", "val_shards")):
        want = shard_set(getattr(job.data, key))
        assert (inputs[context].name, inputs[context].digest) == (want["name"], want["digest"])
    assert json.loads(inputs["training"].profile) == {"num_shards": 8, "num_samples": 16}
    assert run2.data.tags["cadist.resume_changes"] == (
        "step 30: cluster.num_workers 2 → 1, train.iterations 30 → 40"
    )
    assert run2.data.tags["cadist.world_size"] == "1"
    assert run2.data.params["train.iterations"] == "30"  # params: those of the first start
    assert zero_world(ckpt) == 2 and zero_world(Path(r2.checkpoint)) == 1
    # registering again adds a version only for a new best, from its own immutable copy
    versions = client.search_model_versions("name = 'itest-model'")
    assert len({v.source for v in versions}) == len(versions) >= 1

    # --restart keeps the earlier run aside and starts over: a new MLflow run from step 0, here
    # from the earlier run's best weights by URI (fetched once into the storage) with a vanishing
    # learning rate, so its evaluation reproduces that run's best mIoU; ZeRO-2 (its re-split on
    # another count: the elastic test in test_node_loss.py)
    best_now = max(m.value for m in client.get_metric_history(r.run_id, "val/miou"))
    restart = {"model.weights": f"runs:/{r.run_id}", "train.iterations": 1, "eval.interval": 1,
               "train.lr_backbone": 1e-12, "train.lr_head": 1e-12, "train.weight_decay": 0,
               "train.checkpoint_every": 1, "deepspeed.zero_stage": 2}  # fmt: skip
    r3 = run_training(make_job(workdir, "itest-main", **restart), "itest", restart=True)
    assert r3.run_id != r.run_id and r3.metrics["step"] == 1
    assert "train/resumed_from_step" not in client.get_run(r3.run_id).data.metrics
    (aside,) = (workdir / "runs").glob("itest-main.before-*")
    assert (aside / "step_00000040" / "model.pt").is_file()
    assert zero_world(Path(r3.checkpoint)) == 2
    copy = workdir / "runs" / ".cadist" / "itest-main.init-weights.pt"
    best = client.download_artifacts(r.run_id, "checkpoints/best.pt", str(workdir))
    assert copy.read_bytes() == Path(best).read_bytes()
    assert client.get_run(r3.run_id).data.tags["cadist.weights_source"] == f"runs:/{r.run_id}"
    # (not exactly: BatchNorm running statistics still move in the one training step)
    assert r3.metrics["val/miou"] == pytest.approx(best_now, abs=5e-3)


def test_killed_worker_resumes_from_its_checkpoint(workdir, ray_local, tmp_path, monkeypatch):
    """…with storage and shards on object storage (a real S3 API server; the working directory
    gets nothing), and two micro-batches per step (gradient accumulation): steps, schedule and
    resume count optimiser steps. Then a rerun with more iterations resumes from S3 and
    `cadist status s3://…` shows where it got."""
    from click.testing import CliRunner

    from cadist.cli import main
    from cadist.storage.store import Storage

    bucket = f"s3://{s3_server().bucket()}"
    for split in ("train", "val"):
        build_shards(workdir / "cs", split, f"{bucket}/shards", samples_per_shard=2,
                     workers=1, progress=False)  # fmt: skip
    monkeypatch.chdir(tmp_path)  # nothing may land here
    on_s3 = {
        "data.train_shards": f"{bucket}/shards/train-manifest.json",
        "data.val_shards": f"{bucket}/shards/val-manifest.json",
        "cluster.storage_path": f"{bucket}/runs",
        "train.iterations": 60,
        "eval.interval": 60,
        "deepspeed.gradient_accumulation_steps": 2,
        # every checkpoint kept: Ray Train's deletion of an old one right after the restart can
        # find it gone on S3 and end the run ("Path not found: …/step_00000020", its checkpoint
        # manager; seen on a loaded machine) — not what this test is about
        "train.keep_checkpoints": 10,
    }
    job = make_job(workdir, "itest-kill", **on_s3)
    store = Storage(f"{bucket}/runs")
    box = {}
    t0 = time.time()
    t = threading.Thread(target=lambda: box.setdefault("r", run_training(job, "itest")))
    t.start()
    deadline = time.time() + 240
    while not store.is_dir("itest-kill/step_00000020") and time.time() < deadline:
        time.sleep(0.5)
    assert store.is_dir("itest-kill/step_00000020"), "no checkpoint appeared"
    # one of this run's two Train workers: not a leftover of an earlier test, and not one of their
    # DataLoader processes (forked children carry the same process title)
    workers = [p for p in _train_workers() if p.info["create_time"] >= t0 - 1]
    workers = [p for p in workers if p.ppid() not in {w.pid for w in workers}]
    assert len(workers) == job.cluster.num_workers == 2, f"Train worker processes: {workers}"
    os.kill(workers[-1].pid, signal.SIGKILL)
    workers[-1].wait(30)
    t.join(400)
    assert not t.is_alive()
    r = box["r"]
    assert r.metrics["step"] == 60
    client = MlflowClient(r.tracking_uri)
    resumed = client.get_metric_history(r.run_id, "train/resumed_from_step")
    # it restarts from a registered checkpoint (a hard kill may lose the newest one, so ≥ 10)
    assert resumed and resumed[-1].value in (10, 20, 30, 40, 50)
    assert client.get_run(r.run_id).info.status == "FINISHED"
    # the poly schedule advanced once per optimiser step, not per micro-batch
    lr = {m.step: m.value for m in client.get_metric_history(r.run_id, "train/lr")}
    assert lr[30] == pytest.approx(job.train.lr_backbone * 0.5**0.9, rel=1e-6)
    assert lr[55] == pytest.approx(job.train.lr_backbone * (5 / 60) ** 0.9, rel=1e-6)
    params = client.get_run(r.run_id).data.params
    assert params["deepspeed.gradient_accumulation_steps"] == "2"
    assert r.checkpoint == f"{bucket}/runs/itest-kill/step_00000060"

    # every checkpoint is committed by its manifest: each file's sha256 and size
    manifest = store.read_json("itest-kill/step_00000060/manifest.json")
    assert (manifest["step"], manifest["world"]) == (60, 2)
    assert {"model.pt", "rng_rank1.json", "state/mp_rank_00_model_states.pt"} <= set(
        manifest["files"]
    )
    # someone who can write the bucket plants a pickle in the newest checkpoint's DeepSpeed
    # state: the rerun (more iterations, same MLflow run) never unpickles it, falls back to the
    # newest checkpoint that matches its manifest, and says so
    marker = tmp_path.parent / "planted-ran"
    planted = pickle.dumps({"module": _Planted(str(marker))})
    store.write("itest-kill/step_00000060/state/mp_rank_00_model_states.pt", planted)
    r2 = run_training(make_job(workdir, "itest-kill", **on_s3 | {"train.iterations": 70}), "it")
    assert (r2.metrics["step"], r2.run_id) == (70, r.run_id)
    resumed = client.get_metric_history(r.run_id, "train/resumed_from_step")
    assert resumed[-1].value == 50 and not marker.exists()
    out = CliRunner().invoke(main, ["status", f"{bucket}/runs", "--json"])
    assert out.exit_code == 0, out.output
    (row,) = json.loads(out.stdout)["jobs"]
    assert (row["job"], row["step"], row["state"], row["mlflow_run_id"]) == (
        "itest-kill", 70, "finished", r.run_id)  # fmt: skip
    assert row["checkpoint"] == f"{bucket}/runs/itest-kill/step_00000070"
    assert list(tmp_path.iterdir()) == []  # no cadist_runs, nothing else, in the working directory
    # the checkpoint on S3 evaluates (`cadist eval --ckpt s3://…`, the val shards on S3: the
    # logged mIoU of the last step) and predicts (`cadist predict --ckpt s3://…`)
    (tmp_path / "job.yaml").write_text(make_job(workdir, "itest-kill", **on_s3).to_yaml())
    ckpt = f"{bucket}/runs/itest-kill/step_00000070"
    out = CliRunner().invoke(main, ["eval", str(tmp_path / "job.yaml"), "--ckpt", ckpt])
    assert out.exit_code == 0, out.output
    logged = client.get_metric_history(r.run_id, "val/miou")
    assert json.loads(out.stdout)["miou"] == pytest.approx(
        max(logged, key=lambda m: m.step).value, abs=1e-6
    )
    image = next((workdir / "cs" / "leftImg8bit" / "val").glob("*/*.png"))
    out = CliRunner().invoke(main, ["predict", "--ckpt", ckpt, "--image", str(image),
                                    "--out", str(tmp_path / "pred")])  # fmt: skip
    assert out.exit_code == 0, out.output
    assert len(list((tmp_path / "pred").glob("*_pred.png"))) == 1


def test_unreachable_tracking_server_fails_before_training(workdir):
    job = make_job(workdir, "itest-nomlflow", **{"mlflow.tracking_uri": "http://127.0.0.1:9"})
    t0 = time.time()
    with pytest.raises(
        ConfigError, match=r"MLflow tracking server http://127.0.0.1:9 cannot be reached"
    ):
        run_training(job, "itest")
    assert time.time() - t0 < 30
    assert not (workdir / "runs" / "itest-nomlflow").exists()


def test_missing_shards_fail_on_the_driver(workdir):
    job = make_job(
        workdir,
        "itest-noshards",
        **{"data.train_shards": str(workdir / "nope-{000000..000003}.tar")},
    )
    with pytest.raises(
        ConfigError, match=r"data\.train_shards: shard .*nope-000000\.tar does not exist"
    ):
        run_training(job, "itest")
    job = make_job(workdir, "itest-few", **{"data.num_workers": 8})
    with pytest.raises(
        ConfigError, match=r"8 shards for cluster\.num_workers 2 × data\.num_workers 8 = 16"
    ):
        run_training(job, "itest")


def test_a_job_the_ray_cluster_cannot_hold_fails_at_once(workdir, ray_local):
    """On the 2-CPU local cluster: a GPU job and a 3-worker job stop before any MLflow run or Ray
    Train run exists (Ray Train itself would retry its worker-group start forever)."""
    for name, extra, msg in (
        ("itest-gpu", {"cluster.use_gpu": "true"}, r"cluster\.use_gpu is true and the Ray cluster has no GPU \(2 CPUs"),
        ("itest-big", {"cluster.num_workers": 3, "train.batch_size": 3}, r"needs 3 workers of 1 CPU each and the Ray cluster holds 2"),
    ):  # fmt: skip
        t0 = time.time()
        with pytest.raises(ConfigError, match=msg):
            run_training(make_job(workdir, name, **extra), "itest")
        assert time.time() - t0 < 30
        assert not (workdir / "runs" / name).exists()
        assert not (workdir / "runs" / ".cadist" / f"{name}.mlflow.json").exists()


def test_a_ray_address_nothing_answers_at_is_one_error(workdir, tmp_path):
    """`cadist train --address host:port` with no Ray there: one line within seconds (Ray itself
    retries for minutes), no MLflow run."""
    import subprocess
    import sys

    port = free_port()  # nothing listens there
    job = make_job(workdir, "itest-noray")
    (tmp_path / "job.yaml").write_text(job.to_yaml())
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = str(JOB.parents[1])
    t0 = time.time()
    r = subprocess.run(
        [sys.executable, "-m", "cadist", "train", str(tmp_path / "job.yaml"), "--address",
         f"127.0.0.1:{port}"],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert r.returncode != 0 and time.time() - t0 < 60
    assert r.stderr.strip().splitlines()[-1] == (
        f"error: {tmp_path / 'job.yaml'}: Ray cluster address 127.0.0.1:{port}: nothing answers "
        f"at 127.0.0.1:{port} (Connection refused); start the cluster's head (`ray start --head`), "
        f"fix cluster.address / --address, or leave it unset for a local Ray"
    )
    assert not (workdir / "runs" / ".cadist" / "itest-noray.mlflow.json").exists()


# -- a 2-worker DeepSpeed step equals a 1-process step on the concatenated batch -----------------
def _one_step_worker(cfg):
    """Each case of `cfg["cases"]` ({"job", "batch", "out"}) in turn, in one Ray Train run (one
    start for all): two optimiser steps of a fresh engine on this rank's share of the batch."""
    import ray.train

    from cadist.config.schema import JobConfig
    from cadist.train.engine import build_engine, train_step

    rank, world = ray.train.get_context().get_world_rank(), ray.train.get_context().get_world_size()
    cpu = torch.device("cpu")
    for case in cfg["cases"]:
        job = JobConfig.model_validate(case["job"])
        engine = build_engine(job, False, world, cpu)
        _no_dropout(engine.module)  # dropout masks are random per process; the rest must match
        x, y = torch.load(case["batch"], weights_only=True)
        n, m = x.shape[0] // world, job.micro_batch
        for _ in range(2):  # two optimiser steps, each of n / m micro-batches of this rank's share
            for i in range(rank * n, (rank + 1) * n, m):
                train_step(
                    engine, {"image": x[i : i + m], "label": y[i : i + m]}, cpu, torch.float32
                )
        if rank == 0:
            torch.save(engine.module.state_dict(), case["out"])
        del engine
    ray.train.report({"done": 1})


def _no_dropout(model):
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0


def test_two_worker_step_equals_one_process_step(workdir, ray_local, tmp_path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from cadist.nets.build import build_model
    from cadist.train.loop import make_optimizer, seed_everything, segmentation_loss

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    g = torch.Generator().manual_seed(0)
    x8, y8 = torch.randn(8, 3, 64, 64, generator=g), torch.randint(0, 19, (8, 64, 64), generator=g)
    # micro-batches of 2 images per worker: BatchNorm over the 1×1 pooled ASPP branch of 2 images
    # in all is too ill-conditioned to compare (float64 vs float32 statistics differ by 1e-3)
    cases, jobs = [], []
    for stage, acc in ((0, 1), (2, 1), (0, 2)):
        torch.save((x8[: 4 * acc], y8[: 4 * acc]), tmp_path / f"batch{acc}.pt")
        job = make_job(
            workdir,
            f"itest-eq{stage}-{acc}",
            **{
                "deepspeed.zero_stage": stage,
                "deepspeed.gradient_accumulation_steps": acc,
                "train.batch_size": 4 * acc,
            },
        )
        out = tmp_path / f"ds{stage}-{acc}.pt"
        cases.append({"job": job.model_dump(), "batch": str(tmp_path / f"batch{acc}.pt"),
                      "out": str(out)})  # fmt: skip
        jobs.append(job)
    TorchTrainer(
        _one_step_worker,
        train_loop_config={"cases": cases},
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False),
        run_config=RunConfig(name="eq", storage_path=str(tmp_path / "ray")),
    ).fit()
    for case, job in zip(cases, jobs, strict=True):
        x, y = torch.load(case["batch"], weights_only=True)
        out, acc = case["out"], job.deepspeed.gradient_accumulation_steps
        stage = job.deepspeed.zero_stage
        seed_everything(job.train.seed)
        ref = build_model(job.model.name, job.model.output_stride)
        _no_dropout(ref)
        opt, sched = make_optimizer(ref, job.train)
        n, m = x.shape[0] // 2, job.micro_batch
        for _ in range(2):
            opt.zero_grad()
            for j in range(acc):  # micro-batch j: the j-th slice of each worker's share (synced BN)
                idx = [r * n + j * m + k for r in range(2) for k in range(m)]
                # no ignored pixels: the global mean = the mean of the micro-batches' means
                (segmentation_loss(ref(x[idx]), y[idx]) / acc).backward()
            opt.step()
            sched.step()
        got = torch.load(out, weights_only=True)
        worst = max(
            (got[k].float() - v.float()).abs().max().item() for k, v in ref.state_dict().items()
        )
        changed = max(
            (got[k].float() - v.float()).abs().max().item()
            for k, v in build_model(job.model.name, 16).state_dict().items()
            if v.is_floating_point()
        )
        # float32 sums in another order (an all-reduce of two halves vs one batch): up to 1.1e-4
        # (the first conv's weights) on some CPUs, against weights that moved by up to 1.6
        assert worst < 2e-4 and worst < 1e-3 * changed, (stage, acc, worst, changed)
        assert changed > 1e-3  # the weights did move


def test_edge_model_trains_and_logs_mask_statistics(workdir, ray_local):
    """…with the adaptive head (model.head adaptive; the dense head trains in the demo and the
    sweeps), evaluated with the job's test-time augmentation: scales 0.5 and 1, mirrored, each in
    a sliding window (eval.window 64x64: three crops of a 64×128 image at default stride 43, one
    of its 32×64 half): the logged GMac is all passes' crops', and `cadist eval` of the job
    evaluates the same way."""
    job = make_job(
        workdir,
        "itest-edge",
        **{
            "model.name": "deeplabv3_batch_ap_resnet_tiny",
            "model.head": "adaptive",
            "train.iterations": 10,
            "eval.interval": 10,
            "eval.log_images": 1,
            "eval.window": "64x64",
            "eval.scales": [0.5, 1.0],
            "eval.flip": True,
        },
    )
    r = run_training(job, "itest")
    assert r.metrics["step"] == 10
    client = MlflowClient(r.tracking_uri)
    run = client.get_run(r.run_id)
    m = run.data.metrics
    p = m["val/high_res_fraction"]
    assert 0.0 <= p <= 1.0
    assert (run.data.params["eval.scales"], run.data.params["eval.flip"]) == ("0.5,1.0", "True")
    arts = _artifacts(client, r.run_id)
    pred = [a for a in arts if a.startswith("predictions/step_00000010/")]
    assert len(pred) == 1
    local = client.download_artifacts(r.run_id, pred[0], str(workdir))
    from PIL import Image

    # image | truth | prediction | mask overlay (the scale-1 pass's crops' masks put together)
    assert Image.open(local).size == (4 * 128, 64)
    # `cadist eval` of the job and its final checkpoint reproduces the logged mIoU, high-res
    # fraction and GMac (it runs the job's passes)
    from click.testing import CliRunner

    from cadist.cli import main

    job_file = workdir / "itest-edge.yaml"
    job_file.write_text(job.to_yaml())
    out = CliRunner().invoke(main, ["eval", str(job_file), "--ckpt", str(r.checkpoint)])
    assert out.exit_code == 0, out.output
    ev = json.loads(out.stdout)
    passes = {(q["height"], q["width"], q["flip"]): q for q in ev["tta"]["passes"]}
    assert sorted(passes) == [(32, 64, False), (32, 64, True), (64, 128, False), (64, 128, True)]
    assert [passes[32, 64, False]["windows"], passes[64, 128, False]["windows"]] == [1, 3]
    assert ev["miou"] == pytest.approx(m["val/miou"], abs=1e-9)
    assert ev["high_res_fraction"] == pytest.approx(p, abs=1e-9)
    # the logged GMac follows the method's line at each pass's crop size (64×64 at scale 1,
    # 32×64 at 0.5) at that pass's high-res fraction, times its crops, summed over the passes
    from cadist.nets.stats import mac_line

    by_hand = sum(
        q["windows"]
        * mac_line("deeplabv3_batch_ap_resnet_tiny", "os8to16", *q["window"]).backbone(
            q["high_res_fraction"]
        )
        for q in passes.values()
    )
    assert m["macs/backbone_gmac"] == pytest.approx(by_hand, rel=1e-9)
    assert ev["tta"]["backbone_gmac"] == pytest.approx(by_hand, rel=1e-9)
    # the adaptive head's GMac follow each pass's fraction too (the dense head's would not)
    lines = {w: mac_line("deeplabv3_batch_ap_resnet_tiny", "os8to16", *w, "adaptive")
             for w in {tuple(q["window"]) for q in passes.values()}}  # fmt: skip
    total = sum(
        q["windows"] * (lines[tuple(q["window"])].backbone(q["high_res_fraction"])
                        + lines[tuple(q["window"])].head(q["high_res_fraction"]))
        for q in passes.values()
    )  # fmt: skip
    assert m["macs/total_gmac"] == pytest.approx(total, rel=1e-9)
    assert m["macs/backbone_gmac_computed"] <= m["macs/backbone_gmac"]
    # `cadist report` names the protocol the run was evaluated with
    from cadist.results.report import _augmentation

    assert _augmentation(run.data.params) == "TTA 0.5,1.0 flip slide 64x64/43x43"


def test_learned_model_trains_through_ray_and_logs_both_networks(workdir, ray_local):
    job = make_job(
        workdir,
        "itest-learned",
        **{
            "model.name": "deeplabv3_ad_resnet_tiny",
            "model.head": "adaptive",  # (training: its dense simulation; evaluation: both)
            "model.target_low_res": 0.5,
            "model.mask_sampling": "argmax",  # deterministic evaluation, so `cadist eval` agrees
            "train.iterations": 10,
            "eval.interval": 10,
            "eval.log_images": 1,
        },
    )
    r = run_training(job, "itest")
    assert r.metrics["step"] == 10
    client = MlflowClient(r.tracking_uri)
    m = client.get_run(r.run_id).data.metrics
    for key in ("val/miou", "val/miou_inference", "val/high_res_fraction_train"):
        assert 0.0 <= m[key] <= 1.0, key
    first = {
        k: client.get_metric_history(r.run_id, k)[0].value
        for k in ("train/lr", "train/lr_head", "train/lr_mask_estimator")
    }  # step 5 of 10: the three groups at their own base rates (§8), same poly factor
    t = job.train
    assert first["train/lr_mask_estimator"] == pytest.approx(
        first["train/lr"] * t.lr_mask_estimator / t.lr_backbone, rel=1e-6
    )
    assert first["train/lr_head"] == pytest.approx(
        first["train/lr"] * t.lr_head / t.lr_backbone, rel=1e-6
    )
    assert 0.0 <= m["train/ratio_loss"] <= 0.25
    from cadist.nets.stats import mac_line

    p = m["val/high_res_fraction"]  # the inference network's share: what its MACs follow
    line = mac_line("deeplabv3_ad_resnet_tiny", "os8to16", 64, 128, "adaptive")
    assert m["macs/backbone_gmac"] == pytest.approx(line.backbone(p), rel=1e-9)
    assert m["macs/total_gmac"] == pytest.approx(line.backbone(p) + line.head(p), rel=1e-9)
    # ZeRO-1 over 2 workers kept the tied branches identical
    import torch

    from cadist.eval.evaluate import evaluate_job
    from cadist.nets.weights import read_file
    from cadist.tracking.sources import resolve_weights

    sd = read_file(resolve_weights(r.checkpoint))["state_dict"]
    tied = [k for k in sd if "layer3_high_res" in k and k.endswith("weight")]
    assert tied and all(torch.equal(sd[k], sd[k.replace("high", "low")]) for k in tied)
    ev = evaluate_job(job, r.checkpoint, per_image=True)
    assert ev["miou"] == pytest.approx(m["val/miou"], abs=1e-9)
    assert ev["miou_inference"] == pytest.approx(m["val/miou_inference"], abs=1e-9)
    assert ev["high_res_fraction"] == pytest.approx(p, abs=1e-9)
    # per image, like the totals: each network's mIoU, the inference network's fraction (images
    # of one size: their mean is the total's)
    rows = ev["per_image"]
    assert len(rows) == ev["images"] and all("miou_inference" in row for row in rows)
    for key, total in (("high_res_fraction", p), ("high_res_fraction_train",
                       m["val/high_res_fraction_train"])):  # fmt: skip
        assert sum(row[key] for row in rows) / len(rows) == pytest.approx(total, abs=1e-6)


def test_training_goes_on_while_the_tracking_server_is_down(workdir, ray_local):
    """A real `mlflow server` is killed after the first logged step and started again (same port
    and stores) only once training has checkpointed step 30: training never stops, and the run
    ends up with every metric, image and weights file, sent from the spool."""
    from tests.conftest import MlflowServer, registered_checkpoint

    server = MlflowServer(workdir / "outage").start()
    job = make_job(
        workdir, "itest-outage",
        **{"mlflow.tracking_uri": server.uri, "cluster.num_workers": 1, "train.iterations": 40,
           "eval.interval": 20, "train.checkpoint_every": 10, "train.keep_checkpoints": 5},
    )  # fmt: skip
    run_dir = workdir / "runs" / "itest-outage"
    events = []

    def outage():
        client = MlflowClient(server.uri)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            runs = client.search_runs(
                [e.experiment_id for e in client.search_experiments()],
                "tags.`cadist.job` = 'itest-outage'",
            )
            if runs and client.get_metric_history(runs[0].info.run_id, "train/loss"):
                break
            time.sleep(0.2)
        server.stop()
        events.append("down")
        while time.monotonic() < deadline and not (run_dir / "step_00000030").is_dir():
            time.sleep(0.2)
        events.append("checkpoint 30 while down")
        server.start()
        events.append("up")

    watcher = threading.Thread(target=outage, daemon=True)
    watcher.start()
    try:
        try:
            r = run_training(job, "itest")
        finally:
            watcher.join(timeout=300)
        assert events == ["down", "checkpoint 30 while down", "up"]  # the server answers again
        client = MlflowClient(server.uri)
        steps = sorted(m.step for m in client.get_metric_history(r.run_id, "train/loss"))
        assert steps == [5, 10, 15, 20, 25, 30, 35, 40]
        assert sorted(m.step for m in client.get_metric_history(r.run_id, "val/miou")) == [20, 40]
        run = client.get_run(r.run_id)
        assert run.info.status == "FINISHED"
        arts = set(_artifacts(client, r.run_id))
        assert {"checkpoints/best.pt", "checkpoints/last.pt", "eval/iou_last.csv"} <= arts
        assert sum(a.startswith("predictions/step_00000020/") for a in arts) == 2
        assert not (workdir / "runs" / ".cadist" / "itest-outage.mlflow-spool" / r.run_id).exists()
        assert registered_checkpoint(run_dir)
    finally:
        server.stop()


def test_eval_on_the_ray_cluster_equals_eval_here(workdir, ray_local, tmp_path):
    """`cadist eval --address`: the evaluation (one per --vary setting, side by side) as Ray tasks
    given the weights through the object store — the same figures as in this process; a task's
    error comes back as its one-line error; a task no node can hold is refused up front."""
    from click.testing import CliRunner

    from cadist.cli import main
    from cadist.nets.build import build_model

    model = "deeplabv3_batch_ap_resnet_tiny"
    torch.manual_seed(0)
    weights = tmp_path / "weights.pt"
    torch.save(build_model(model, num_classes=19).state_dict(), weights)
    val = workdir / "shards" / "val-manifest.json"
    args = ["eval", str(JOB), "--ckpt", str(weights), "--set", f"model.name={model}",
            "--set", f"data.val_shards={val}", "--set", "data.num_workers=0",
            "--set", "model.trimap_width=1"]  # fmt: skip
    vary = ["--vary", "model.edge_threshold=0.2,100"]
    here = CliRunner().invoke(main, [*args, *vary])
    there = CliRunner().invoke(main, [*args, *vary, "--address", "local"])
    assert here.exit_code == 0 and there.exit_code == 0, here.output + there.output
    rows_here, rows_there = (json.loads(r.stdout)["results"] for r in (here, there))
    assert [r["setting"] for r in rows_there] == [r["setting"] for r in rows_here]
    for a, b in zip(rows_here, rows_there, strict=True):
        assert [w["device"] for w in b["ran_on"]] == ["cpu"] and "ran_on" not in a
        assert b["miou"] == pytest.approx(a["miou"], abs=1e-6)
        assert b["high_res_fraction"] == pytest.approx(a["high_res_fraction"], abs=1e-9)
        assert b["backbone_gmac"] == pytest.approx(a["backbone_gmac"], rel=1e-9)
    assert rows_here[0]["high_res_fraction"] > rows_here[1]["high_res_fraction"]  # τ matters
    # one evaluation split over 4 tasks (6 images in 3 shards: every task reads every shard and
    # keeps its images), with TTA: the same totals, passes and per-image records as here
    tta = ["--per-image", "--scales", "0.5,1", "--flip", "--set", "model.edge_threshold=0.2"]
    one_here = CliRunner().invoke(main, [*args, *tta])
    split = CliRunner().invoke(main, [*args, *tta, "--address", "local", "--tasks", "4"])
    assert one_here.exit_code == 0 and split.exit_code == 0, one_here.output + split.output
    a, b = json.loads(one_here.stdout), json.loads(split.stdout)
    assert b["tasks"] == 4 and b["images"] == a["images"] == 6 and b["pixels"] == a["pixels"]
    for key in ("miou", "pixel_accuracy", "high_res_fraction", "backbone_gmac", "total_gmac"):
        assert b[key] == pytest.approx(a[key], abs=1e-6), key
    assert b["iou"] == pytest.approx(a["iou"], abs=1e-6, nan_ok=True)
    assert len(b["tta"]["passes"]) == len(a["tta"]["passes"]) == 4
    for pa, pb in zip(a["tta"]["passes"], b["tta"]["passes"], strict=True):
        assert pb == pytest.approx(pa, abs=1e-9)
    assert [r["key"] for r in b["per_image"]] == [r["key"] for r in a["per_image"]]
    assert [r["miou"] for r in b["per_image"]] == pytest.approx(
        [r["miou"] for r in a["per_image"]], abs=1e-6, nan_ok=True
    )
    # a learned-mask model: both networks' shares add up too (arg-max masks: no Gumbel noise)
    learned = "deeplabv3_ad_resnet_tiny"
    torch.manual_seed(1)
    torch.save(build_model(learned, num_classes=19).state_dict(), tmp_path / "learned.pt")
    largs = [*args[:3], str(tmp_path / "learned.pt"), *args[4:], "--set", f"model.name={learned}",
             "--set", "model.mask_sampling=argmax", "--per-image"]  # fmt: skip
    l_here = CliRunner().invoke(main, largs)
    l_split = CliRunner().invoke(main, [*largs, "--address", "local", "--tasks", "2"])
    assert l_here.exit_code == 0 and l_split.exit_code == 0, l_here.output + l_split.output
    a, b = json.loads(l_here.stdout), json.loads(l_split.stdout)
    for key in ("miou", "miou_inference", "high_res_fraction", "high_res_fraction_train",
                "backbone_gmac"):  # fmt: skip
        assert b[key] == pytest.approx(a[key], abs=1e-6), key
    key_of = {r["key"]: r for r in a["per_image"]}
    for r in b["per_image"]:
        for k in ("miou_inference", "high_res_fraction", "high_res_fraction_train"):
            assert r[k] == pytest.approx(key_of[r["key"]][k], abs=1e-6, nan_ok=True), k
    lone = CliRunner().invoke(main, [*args, "--tasks", "2"])
    assert lone.exit_code == 2 and "--tasks goes with --address" in lone.output
    # errors: raised in the task, shown here as one line; refused before any task
    bad = CliRunner().invoke(
        main, [*args, "--set", f"data.val_shards={tmp_path / 'none-{000..001}.tar'}",
               "--address", "local"],
    )  # fmt: skip
    assert bad.exit_code != 0 and "none-000.tar" in bad.output, bad.output
    big = CliRunner().invoke(
        main, [*args, "--set", "cluster.cpus_per_worker=64", "--address", "local"]
    )
    assert big.exit_code != 0, big.output
    assert "an evaluation task needs 64 CPU (cluster.cpus_per_worker)" in big.output, big.output
    cpu = CliRunner().invoke(main, [*args, "--device", "cpu", "--address", "local"])
    assert cpu.exit_code == 2 and "--device goes with" in cpu.output


def _files_holding(root, needles) -> list[str]:
    """Files under `root` whose bytes hold any of `needles`."""
    hits = []
    for p in Path(root).rglob("*"):
        if p.is_file() and not p.is_symlink():
            data = p.read_bytes()
            hits += [str(p) for n in needles if n.encode() in data][:1]
    return hits


def test_presigned_weights_url_is_used_and_never_written(workdir, ray_local, tmp_path, capfd):
    """A presigned S3 URL (its credential and signature are secrets) as `model.weights`: the run
    starts from those weights, and neither the credential nor the signature appears in MLflow
    (params, tags, dataset inputs, artifacts, its database), on the storage path, in the output
    or in Ray's logs; a submission of the job is refused before anything is sent."""
    from urllib.parse import parse_qs, urlsplit

    import boto3
    import botocore.config
    import mlflow.artifacts

    from cadist.nets.build import build_model
    from cadist.nets.weights import save_weights
    from cadist.submit.submission import submission_env

    s3 = s3_server()
    bucket = s3.bucket("presign")
    base = make_job(workdir, "itest-secret")
    torch.manual_seed(5)
    init = build_model(**base.model.build_kwargs())
    save_weights(init, tmp_path / "init.pt", model=base.model.name)
    c = boto3.client("s3", endpoint_url=s3.endpoint, region_name="us-east-1",
                     config=botocore.config.Config(signature_version="s3v4"))  # fmt: skip
    c.upload_file(str(tmp_path / "init.pt"), bucket, "weights/init.pt")
    url = c.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": "weights/init.pt"},
                                   ExpiresIn=900)  # fmt: skip
    q = parse_qs(urlsplit(url).query)
    secrets = [q["X-Amz-Signature"][0], q["X-Amz-Credential"][0]]
    job = make_job(workdir, "itest-secret", **{
        "model.weights": url, "train.iterations": 2, "train.checkpoint_every": 2,
        "eval.interval": 2, "eval.log_images": 0,
        "cluster.storage_path": str(tmp_path / "runs"),
        "mlflow.tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
    })  # fmt: skip
    with pytest.raises(ConfigError, match="model.weights carries a credential"):
        submission_env(job, "job.yaml")
    capfd.readouterr()
    r = run_training(job, "itest")
    out = capfd.readouterr()
    assert r.metrics["step"] == 2
    client = MlflowClient(r.tracking_uri)
    run = client.get_run(r.run_id)
    shown = run.data.params["model.weights"]
    assert shown.startswith(f"{s3.endpoint}/{bucket}/weights/init.pt?") and (
        "X-Amz-Signature=***" in shown and "X-Amz-Credential=***" in shown
    )
    assert run.data.tags["cadist.weights_source"] == shown
    arts = mlflow.artifacts.download_artifacts(
        run_id=r.run_id, dst_path=str(tmp_path / "arts"), tracking_uri=r.tracking_uri
    )
    assert (Path(arts) / "config" / "job.yaml").is_file()
    session = Path(ray._private.worker._global_node.get_session_dir_path())
    assert any(session.rglob("*.log")) or any(session.rglob("*.out"))
    for where in (tmp_path, session):
        assert _files_holding(where, secrets) == [], where
    assert not any(s in out.out + out.err for s in secrets)
