"""Plain-process parts of training: config, confusion matrix, schedule, synchronised BatchNorm."""

import copy
import math
import os
import re
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from cadist.config.jobfile import load_job
from cadist.errors import ConfigError
from cadist.eval.miou import ConfusionMatrix
from cadist.train.loop import param_groups, poly_lambdas
from cadist.train.syncbn import convert_to_distributed_bn

JOBS = os.path.join(os.path.dirname(__file__), "..", "..", "jobs")


# -- config -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name",
    [
        "demo.yaml",
        "deeplabv3_r101_os16.yaml",
        "deeplabv3_r101_os8.yaml",
        "edge_os8to16.yaml",
        "learned_os8to16.yaml",
    ],
)
def test_shipped_jobs_validate(name):
    job = load_job(os.path.join(JOBS, name))
    assert job.train.batch_size % job.cluster.num_workers == 0


@pytest.mark.parametrize("name", ["sweep_edge.yaml", "sweep_learned.yaml", "sweep_edge_demo.yaml"])
def test_shipped_sweeps_validate(name):
    from cadist.sweep.spec import load_sweep

    sweep, fixed, job_path = load_sweep(os.path.join(JOBS, name))
    assert os.path.isfile(job_path) and sweep.search and sweep.objectives


def test_a_grid_sweep_takes_every_combination_once(tmp_path):
    """searcher grid: num_samples is the number of combinations; a range, or another
    num_samples, is one error naming the key or both numbers; Tune gets a grid search."""
    import yaml

    from cadist.errors import ConfigError
    from cadist.sweep.spec import load_sweep
    from cadist.sweep.tune import _space

    sweep, _, _ = load_sweep(os.path.join(JOBS, "sweep_edge_demo.yaml"))
    assert (sweep.searcher, sweep.num_samples) == ("grid", 4)
    assert _space(sweep) == {
        "model.edge_threshold": {"grid_search": [0.35, 0.95]},
        "model.trimap_width": {"grid_search": [3, 11]},
    }
    base = yaml.safe_load(open(os.path.join(JOBS, "sweep_edge_demo.yaml")))
    base["job"] = os.path.join(JOBS, "demo.yaml")
    for change, says in (
        ({"num_samples": 6}, "num_samples 6 but the grid has 4 combinations"),
        ({"search": {"model.edge_threshold": {"uniform": [0.1, 0.9]}}},
         "model.edge_threshold: expected {choice: [values…]}"),
    ):  # fmt: skip
        (tmp_path / "s.yaml").write_text(yaml.safe_dump(base | change))
        with pytest.raises(ConfigError, match=re.escape(says)):
            load_sweep(tmp_path / "s.yaml")


def test_paper_jobs_follow_the_recipe():
    for os_ in (8, 16):
        job = load_job(os.path.join(JOBS, f"deeplabv3_r101_os{os_}.yaml"))
        t = job.train
        assert (job.model.name, job.model.output_stride) == ("deeplabv3_resnet101", os_)
        assert (
            t.iterations,
            t.batch_size,
            t.lr_backbone,
            t.lr_head,
            t.momentum,
            t.weight_decay,
            t.poly_power,
            t.min_lr,
        ) == (30000, 8, 0.01, 0.1, 0.9, 1e-4, 0.9, 1e-6)
        assert (job.data.crop_size, job.eval.interval, t.seed) == (768, 100, 1)


def test_overrides_and_one_line_errors(tmp_path):
    f = tmp_path / "j.yaml"
    f.write_text("name: a\nmodel: {name: deeplabv3_resnet_tiny}\n")
    job = load_job(f, ["train.iterations=7", "cluster.num_workers=2", "deepspeed.zero_stage=2"])
    assert (job.train.iterations, job.cluster.num_workers, job.deepspeed.zero_stage) == (7, 2, 2)
    cases = [
        (
            ["train.iteratons=3"],
            r"j\.yaml: train\.iteratons: unknown key; allowed here: iterations",
        ),
        (["model.output_stride=4"], r"model\.output_stride: .*8 or 16.*\(got 4\)"),
        (
            ["cluster.num_workers=3"],
            r"train\.batch_size 8 is not divisible by cluster\.num_workers 3",
        ),
        (
            ["cluster.num_workers=2", "deepspeed.gradient_accumulation_steps=3"],
            r"train\.batch_size 8 is not divisible by cluster\.num_workers 2 × "
            r"deepspeed\.gradient_accumulation_steps 3 = 6; use a multiple of 6 \(e\.g\. 6\) or "
            r"fewer accumulation steps",
        ),
        (
            ["deepspeed.gradient_accumulation_steps=8"],
            r"train\.batch_size 8 on one worker in 8 accumulation steps runs 1 image at a time",
        ),
        (["model.name=resnet9"], r"model\.name: .*'deeplabv3_resnet101'.*\(got 'resnet9'\)"),
        (["name=bad name"], r"name: String should match"),
        (["train.iterations"], r"expected KEY=VALUE"),
        (
            ["cluster.num_workers=4", "cluster.min_workers=6"],
            r"cluster\.min_workers 6 is more than cluster\.num_workers 4",
        ),
        (  # elastic: every count in the range must split the batch (8 over 3 does not)
            ["cluster.num_workers=4", "cluster.min_workers=2"],
            r"train\.batch_size 8 does not split over 3 workers, which elastic training "
            r"\(cluster\.min_workers 2 … num_workers 4\) may run on; every count in the range must "
            r"split the global batch: narrow the range, or use a batch of 12$",
        ),
        (
            ["cluster.storage_path=hdfs://nn/runs"],
            r"cluster\.storage_path: hdfs://nn/runs: unknown storage scheme 'hdfs'; use a local "
            r"folder, file://, s3://bucket/prefix or gs://bucket/prefix",
        ),
    ]
    for overrides, pattern in cases:
        with pytest.raises(ConfigError, match=pattern) as e:
            load_job(f, overrides)
        assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=r"over 3 workers, .*: use min_workers 4, narrow"):
        load_job(f, ["cluster.num_workers=5", "cluster.min_workers=1", "train.batch_size=20"])
    elastic = load_job(f, ["cluster.num_workers=4", "cluster.min_workers=2", "train.batch_size=12"])
    assert list(elastic.worker_counts) == [2, 3, 4]
    assert [elastic.micro_batch_for(n) for n in (2, 3, 4)] == [6, 4, 3] and elastic.micro_batch == 3
    with pytest.raises(ConfigError, match="no such job file"):
        load_job(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_job(tmp_path / "bad.yaml")


def test_config_prints_the_job_as_it_runs_and_where_each_key_was_set(tmp_path):
    from click.testing import CliRunner

    from cadist.cli import main

    f = tmp_path / "j.yaml"
    f.write_text("name: a\nmodel: {name: deeplabv3_resnet_tiny}\ntrain: {iterations: 9, seed: 5}\n")
    args = ["config", str(f), "--set", "train.seed=4", "--set", "eval.scales=[0.5,1]"]
    shown = CliRunner().invoke(main, [*args, "--sources"])
    assert shown.exit_code == 0, shown.output
    lines = shown.stdout.splitlines()
    for line in (
        f"name: a  # {f}",
        f"  iterations: 9  # {f}",
        "  seed: 4  # --set",
        "  scales: [0.5, 1.0]  # --set",
        "  flip: false  # default",
        "  batch_size: 8  # default",
    ):
        assert line in lines, (line, shown.stdout)
    # without --sources: YAML that runs as a job file, the same job
    plain = CliRunner().invoke(main, args)
    (tmp_path / "shown.yaml").write_text(plain.stdout)
    assert load_job(tmp_path / "shown.yaml") == load_job(f, args[3::2])
    bad = CliRunner().invoke(main, ["config", str(f), "--set", "train.iterations=0"])
    assert bad.exit_code != 0 and "j.yaml: train.iterations" in bad.output, bad.output


def test_resolved_config_round_trips(tmp_path):
    job = load_job(os.path.join(JOBS, "demo.yaml"), ["train.iterations=5"])
    (tmp_path / "r.yaml").write_text(job.to_yaml())
    assert load_job(tmp_path / "r.yaml") == job
    assert job.flat()["train.iterations"] == 5


# -- metric -----------------------------------------------------------------------------------
def test_confusion_matrix_against_hand_computed_values():
    cm = ConfusionMatrix(3)
    target = torch.tensor([0, 0, 1, 1, 2, 255, 2, 0])
    pred = torch.tensor([0, 1, 1, 1, 0, 2, 2, 0])
    cm.update(pred, target)
    assert cm.mat.tolist() == [[2, 1, 0], [0, 2, 0], [1, 0, 1]]
    iou = cm.iou()
    assert iou == pytest.approx([2 / 4, 2 / 3, 1 / 2])
    assert cm.miou() == pytest.approx((1 / 2 + 2 / 3 + 1 / 2) / 3)
    assert cm.pixel_accuracy() == pytest.approx(5 / 7)
    assert cm.mean_class_accuracy() == pytest.approx((2 / 3 + 1 + 1 / 2) / 3)
    cm2 = ConfusionMatrix(4)
    cm2.update(torch.tensor([0, 1]), torch.tensor([0, 1]))
    assert math.isnan(cm2.iou()[3]) and cm2.miou() == 1.0  # absent classes are excluded


def test_poly_schedule_and_param_groups():
    m = nn.Sequential()
    m.add_module("backbone", nn.Linear(2, 2))
    m.add_module("classifier", nn.Linear(2, 2))
    groups = param_groups(m, 0.01, 0.1)
    assert [len(g["params"]) for g in groups] == [2, 2]
    opt = torch.optim.SGD(groups, lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, poly_lambdas(groups, 100, 0.9, 1e-6))
    lrs = []
    for _ in range(100):
        lrs.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx([0.01, 0.1])  # t = 0 for the first step
    assert lrs[50] == pytest.approx([0.01 * 0.5**0.9, 0.1 * 0.5**0.9])
    assert lrs[99] == pytest.approx([max(0.01 * 0.01**0.9, 1e-6), max(0.1 * 0.01**0.9, 1e-6)])
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-6, 1e-6])


# -- synchronised BatchNorm (real gloo process group, 2 processes) ------------------------------
def _syncbn_rank(rank, world, port, q):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    ref = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4, momentum=0.01),
        nn.ReLU(),
        nn.Conv2d(4, 2, 1),
        nn.BatchNorm2d(2),
    )
    m = convert_to_distributed_bn(copy.deepcopy(ref))
    x = torch.randn(4, 3, 9, 9)
    xs = x[rank * 2 : (rank + 1) * 2].clone().requires_grad_()
    y = m(xs)
    (y**2).mean().backward()
    xr = x.clone().requires_grad_()
    y_ref = ref(xr)
    # data parallel optimises the mean of the ranks' losses
    ((y_ref[:2] ** 2).mean() / 2 + (y_ref[2:] ** 2).mean() / 2).backward()
    grads = [p.grad.clone() for p in m.parameters()]
    for g in grads:
        dist.all_reduce(g)
        g /= world
    errs = {
        "out": (y.detach() - y_ref[rank * 2 : (rank + 1) * 2]).abs().max().item(),
        "grad_x": (xs.grad - xr.grad[rank * 2 : (rank + 1) * 2]).abs().max().item(),
        "grad_p": max(
            (a - p.grad).abs().max().item() for a, p in zip(grads, ref.parameters(), strict=True)
        ),
        "running": (m[1].running_var - ref[1].running_var).abs().max().item(),
    }
    q.put((rank, errs))
    dist.barrier()
    dist.destroy_process_group()


def test_distributed_batchnorm_equals_one_process_on_the_whole_batch():
    ctx = mp.get_context("spawn")
    q = ctx.SimpleQueue()
    procs = [ctx.Process(target=_syncbn_rank, args=(r, 2, 29571, q)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(q.get() for _ in procs)
    for p in procs:
        p.join(60)
    for rank, errs in results.items():
        assert errs["out"] < 1e-5 and errs["grad_x"] < 2e-5 and errs["grad_p"] < 1e-5, (rank, errs)
        assert errs["running"] < 1e-6, (rank, errs)


def test_deepspeed_config_is_generated_from_the_job():
    from cadist.train.engine import deepspeed_config

    job = load_job(
        os.path.join(JOBS, "deeplabv3_r101_os8.yaml"),
        ["cluster.num_workers=4", "deepspeed.zero_stage=2"],
    )
    gpu, cpu = deepspeed_config(job, True), deepspeed_config(job, False)
    assert (gpu["train_batch_size"], gpu["train_micro_batch_size_per_gpu"]) == (8, 2)
    assert gpu["zero_optimization"] == {"stage": 2} and gpu["gradient_clipping"] == 0.0
    assert gpu["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
    assert not gpu["bf16"]["enabled"]
    assert "torch_autocast" not in cpu and not cpu["bf16"]["enabled"]  # fp32 on the CPU accelerator
    forced = deepspeed_config(
        load_job(os.path.join(JOBS, "demo.yaml"), ["deepspeed.bf16=true"]), False
    )
    assert forced["torch_autocast"]["enabled"]
    acc = deepspeed_config(
        load_job(
            os.path.join(JOBS, "deeplabv3_r101_os8.yaml"),
            ["cluster.num_workers=2", "deepspeed.gradient_accumulation_steps=2"],
        ),
        True,
    )
    assert (
        acc["train_batch_size"],
        acc["train_micro_batch_size_per_gpu"],
        acc["gradient_accumulation_steps"],
    ) == (8, 2, 2)


def test_deepspeed_is_imported_without_mlflow_which_stays_importable():
    """A worker's `import deepspeed` leaves out its autotuner's `import mlflow` (≈ 1.2 CPU-s per
    worker start); MLflow imports afterwards as ever, and where it is loaded already DeepSpeed
    sees it."""
    import subprocess
    import sys

    code = (
        "import sys; from cadist.train.engine import _import_deepspeed; ds = _import_deepspeed(); "
        "from deepspeed.autotuning import autotuner as a; print('mlflow' in sys.modules, "
        "a.has_mlflow, ds.__name__); import mlflow; print(mlflow.__name__)"
    )
    env = os.environ | {"DS_ACCELERATOR": "cpu"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["False", "False", "deepspeed", "mlflow"], out.stdout
    code = "import mlflow; " + code
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.stdout.split() == ["True", "True", "deepspeed", "mlflow"], out.stderr[-3000:]


def test_a_run_without_ray_datasets_starts_no_dataset_manager():
    """cadist's trainer leaves out Ray Train's datasets callback (its dataset-manager actor: a new
    Python process per worker-group start) where there are no Ray Datasets, and only there; the
    rest of Ray Train's callbacks stay, in their order."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback

    from cadist.train.backend import CadistTrainer

    def names(cls, **kw):
        trainer = cls(lambda: None, scaling_config=ScalingConfig(num_workers=1),
                      run_config=RunConfig(name="x", storage_path="/nonexistent"), **kw)  # fmt: skip
        return [type(c).__name__ for c in trainer._create_default_callbacks()]

    ray_own = names(TorchTrainer)
    assert DatasetsCallback.__name__ in ray_own  # (else the override has nothing left to do)
    assert names(CadistTrainer) == [n for n in ray_own if n != DatasetsCallback.__name__]
    with_data = names(CadistTrainer, datasets={"train": lambda: None})
    assert with_data == names(TorchTrainer, datasets={"train": lambda: None})
    assert DatasetsCallback.__name__ in with_data


def test_worker_environment_pins_the_cpu_accelerator_only_for_cpu_workers():
    from cadist.cluster.ray import worker_env

    assert (
        worker_env(False)["DS_ACCELERATOR"] == "cpu" and worker_env(False)["OMP_NUM_THREADS"] == "1"
    )
    assert "DS_ACCELERATOR" not in worker_env(True) and "OMP_NUM_THREADS" not in worker_env(True)


def test_a_job_that_cannot_fit_the_ray_cluster_is_one_clear_error():
    from cadist.cluster.ray import check_resources, placeable

    job = load_job(os.path.join(JOBS, "demo.yaml"), ["cluster.num_workers=4"])
    assert placeable([{"CPU": 2.0}], {"CPU": 1.0}) == 2
    two = [{"CPU": 3.0, "GPU": 2.0}, {"CPU": 1.0, "GPU": 4.0, "memory": 1e9}]
    assert placeable(two, {"CPU": 1.0, "GPU": 1.0}) == 3  # min(3, 2) + min(1, 4)
    assert placeable(two, {"CPU": 1.5}) == 2 and placeable([], {"CPU": 1.0}) == 0
    with pytest.raises(
        ConfigError,
        match=r"^demo\.yaml: cluster\.num_workers 4 needs 4 workers of 1 CPU each and the Ray "
        r"cluster holds 2 \(2 CPUs and 0 GPUs on 1 node\); lower cluster\.num_workers, or add "
        r"nodes \(or set cluster\.autoscale=true",
    ):
        check_resources(job, "demo.yaml", [{"CPU": 2.0}])
    assert check_resources(job, "demo.yaml", [{"CPU": 2.0}], workers=2) is None
    assert check_resources(job, "demo.yaml", [{"CPU": 2.0}, {"CPU": 2.0}]) is None
    gpu = load_job(
        os.path.join(JOBS, "demo.yaml"), ["cluster.use_gpu=true", "cluster.num_workers=4"]
    )
    with pytest.raises(
        ConfigError, match=r"cluster\.use_gpu is true and the Ray cluster has no GPU"
    ):
        check_resources(gpu, "demo.yaml", [{"CPU": 16.0}])
    with pytest.raises(ConfigError, match=r"holds 3 \(4 CPUs and 6 GPUs on 2 nodes\)"):
        check_resources(gpu, "demo.yaml", two)
    wait = load_job(
        os.path.join(JOBS, "demo.yaml"), ["cluster.use_gpu=true", "cluster.autoscale=true"]
    )
    msg = check_resources(wait, "demo.yaml", [{"CPU": 16.0}])
    assert msg.startswith("waiting for the autoscaler: cluster.use_gpu is true")
    # a sweep runs at once only as many trials as the nodes hold (queued ones would time out)
    from cadist.cluster.ray import trial_slots

    pair = load_job(os.path.join(JOBS, "demo.yaml"), ["cluster.num_workers=2"])
    assert trial_slots(pair, [{"CPU": 2.0}], 4) == 1
    assert trial_slots(pair, [{"CPU": 4.0}, {"CPU": 3.0}], 4) == 3
    assert trial_slots(pair, [{"CPU": 16.0}], 2) == 2
    assert trial_slots(wait, [{"CPU": 16.0}], 5) == 5  # autoscaling: as asked


def test_sweep_file_errors_name_the_file_and_key(tmp_path):
    import yaml

    from cadist.errors import ConfigError
    from cadist.results.pareto import pareto
    from cadist.sweep.spec import load_sweep

    demo = Path(__file__).resolve().parents[2] / "jobs" / "demo.yaml"

    def write(**kw):
        base = {
            "name": "s",
            "job": str(demo),
            "search": {"model.edge_threshold": {"uniform": [0.1, 0.3]}},
        }
        base.update(kw)
        (tmp_path / "s.yaml").write_text(yaml.safe_dump(base))
        return tmp_path / "s.yaml"

    with pytest.raises(ConfigError, match=r"s.yaml: search.*model.trimap_width: value 0 fails"):
        load_sweep(write(set={"model.name": "deeplabv3_batch_ap_resnet_tiny"},
                         search={"model.trimap_width": {"randint": [0, 5]}}))  # fmt: skip
    with pytest.raises(ConfigError, match=r"search.*model.nope.*unknown key"):
        load_sweep(write(search={"model.nope": {"choice": [1]}}))
    with pytest.raises(ConfigError, match=r"search: .*loguniform needs 0 < low < high"):
        load_sweep(write(search={"model.edge_threshold": {"loguniform": [0, 1]}}))
    with pytest.raises(ConfigError, match=r"objectives: macs/backbone_gmac is reported only by"):
        load_sweep(write(objectives={"val/miou": "max", "macs/backbone_gmac": "min"}))
    with pytest.raises(ConfigError, match=r"objectives: .*val/loss: not a reported metric"):
        load_sweep(write(objectives={"val/loss": "min"}))
    with pytest.raises(ConfigError, match=r"s\.yaml: scheduler asha stops trials on one metric"):
        load_sweep(write(set={"model.name": "deeplabv3_batch_ap_resnet_tiny"}, scheduler="asha",
                         objectives={"val/miou": "max", "macs/backbone_gmac": "min"}))  # fmt: skip
    sweep, fixed, _ = load_sweep(write(), ("num_samples=3",))
    assert sweep.num_samples == 3 and fixed["model"]["name"] == "deeplabv3_resnet_tiny"
    # a dotted --set fixes a job key for every trial (plain, or as the sweep's set.<key>)
    sweep, fixed, _ = load_sweep(
        write(set={"train.iterations": 200}), ("train.iterations=40", "set.eval.interval=20")
    )
    assert (fixed["train"]["iterations"], fixed["eval"]["interval"]) == (40, 20)
    assert sweep.set == {"train.iterations": 40, "eval.interval": 20}
    with pytest.raises(
        ConfigError, match=r"--set model.edge_threshold: model.edge_threshold is searched"
    ):
        load_sweep(write(), ("model.edge_threshold=0.2",))
    with pytest.raises(ConfigError, match=r"s\.yaml: set: .*train.iterations.*"):
        load_sweep(write(), ("train.iterations=0",))
    rows = [{"metrics": {"a": a, "b": b}} for a, b in ((0.5, 10), (0.6, 12), (0.4, 11), (0.6, 12))]
    assert pareto(rows, {"a": "max", "b": "min"}) == [True, True, False, True]
    rows.append({"metrics": {"a": 0.9}})  # a failed trial without the second objective
    assert pareto(rows, {"a": "max", "b": "min"})[-1] is False
