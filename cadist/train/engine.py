"""DeepSpeed: the config generated from the job, and the engine. The only `import deepspeed`."""

from __future__ import annotations

import importlib
import os
import sys

import torch
from torch import nn

from cadist.config import JobConfig


def uses_bf16(job: JobConfig, on_gpu: bool) -> bool:
    return job.deepspeed.bf16 is True or (job.deepspeed.bf16 == "auto" and on_gpu)


def deepspeed_config(job: JobConfig, on_gpu: bool) -> dict:
    """The DeepSpeed JSON for a job (never hand-edited): batch split, ZeRO stage, precision."""
    return {
        "train_batch_size": job.train.batch_size,
        "train_micro_batch_size_per_gpu": job.per_worker_batch,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": job.deepspeed.zero_stage},
        "zero_allow_untested_optimizer": True,  # torch SGD with two groups (§8) under ZeRO 1/2
        "bf16": {"enabled": uses_bf16(job, on_gpu)},
        "gradient_clipping": job.deepspeed.gradient_clipping,  # DeepSpeed defaults to 1.0
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def _skip_shm_op_build() -> None:
    """DeepSpeed JIT-compiles an inference-only shared-memory op at initialize on the CPU (35–60 s,
    and leaks /dev/shm); training does not use it."""
    importlib.import_module("deepspeed.comm.torch")
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None


def make_engine(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, config: dict):
    """Wrap model, optimizer and scheduler into a DeepSpeed engine on the existing process group."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    _skip_shm_op_build()
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=config,
        dist_init_required=False,
    )
    return engine
