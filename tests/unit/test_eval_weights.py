"""An evaluation during training sees the weights of its step: the adaptive model's irregular
convolutions lay their weights out once per evaluation, and DeepSpeed ZeRO-1/2 write the weights
through a flat buffer without bumping their version — the second evaluation of a run must not
reuse the first one's layout (found on the demo: the logged mIoU differed from `cadist eval`)."""

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ..conftest import free_port


def _rank(_index: int, port: int, out: str) -> None:
    from cadist.config.jobfile import load_job
    from cadist.nets.build import build_model
    from cadist.train.engine import build_engine, train_step

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0")  # fmt: skip
    dist.init_process_group("gloo", rank=0, world_size=1)
    cpu = torch.device("cpu")
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 255, (2, 3, 64, 128), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 19, (2, 64, 128), generator=g)
    probe = torch.randn(1, 3, 64, 128, generator=g)
    gaps = {}
    for stage in (0, 1, 2):
        job = load_job(
            os.path.join(os.path.dirname(__file__), "..", "..", "jobs", "demo.yaml"),
            ["model.name=deeplabv3_batch_ap_resnet_tiny", f"deepspeed.zero_stage={stage}",
             "train.batch_size=2", "cluster.num_workers=1"],
        )  # fmt: skip
        engine = build_engine(job, False, 1, cpu)
        model = engine.module
        with torch.no_grad():
            first = model.eval()(probe)  # the first evaluation lays the weights out
        model.train()
        for _ in range(3):
            train_step(engine, {"image": x, "label": y}, cpu, torch.float32)
        with torch.no_grad():
            second = model.eval()(probe)
        fresh = build_model(**job.model.build_kwargs())
        fresh.load_state_dict(model.state_dict())
        with torch.no_grad():
            expected = fresh.eval()(probe)
        gaps[stage] = (
            (second - expected).abs().max().item(),
            (first - expected).abs().max().item(),
        )
    torch.save(gaps, out)
    dist.destroy_process_group()


def test_an_evaluation_during_training_uses_the_weights_of_its_step(tmp_path):
    out = str(tmp_path / "gaps.pt")
    mp.spawn(_rank, args=(free_port(), out), nprocs=1)  # its own process group, away from pytest's
    gaps = torch.load(out, weights_only=True)
    for stage, (gap, moved) in gaps.items():
        assert moved > 1e-3, (stage, moved)  # the training steps changed the outputs
        assert gap < 1e-6, (stage, gap)  # …and the second evaluation saw the change
