"""DeepSpeed: the config generated from the job, and the engine. The only `import deepspeed`."""

from __future__ import annotations

import importlib
import logging
import os
import sys
import tempfile
import warnings

import torch
from torch import nn

from cadist.config.schema import JobConfig
from cadist.data.transforms import normalize_uint8
from cadist.errors import CheckpointError
from cadist.nets.build import build_model
from cadist.nets.weights import load_backbone, load_weights
from cadist.storage.fetch import local_copy
from cadist.train.loop import make_optimizer, seed_everything, training_loss
from cadist.train.syncbn import convert_to_distributed_bn


def uses_bf16(job: JobConfig, on_gpu: bool) -> bool:
    return job.deepspeed.bf16 is True or (job.deepspeed.bf16 == "auto" and on_gpu)


def _precision(job: JobConfig, on_gpu: bool) -> dict:
    if not uses_bf16(job, on_gpu):
        return {"bf16": {"enabled": False}}
    # fp32 weights + autocast: DeepSpeed's bf16-weights mode was 3× slower per step (see config.py)
    return {"bf16": {"enabled": False}, "torch_autocast": {"enabled": True, "dtype": "bfloat16"}}


def deepspeed_config(job: JobConfig, on_gpu: bool, world: int | None = None) -> dict:
    """The DeepSpeed JSON for a job (never hand-edited) on `world` workers (default
    `cluster.num_workers`; elastic jobs run on fewer): batch split, ZeRO stage, precision."""
    return {
        "train_batch_size": job.train.batch_size,
        "train_micro_batch_size_per_gpu": job.micro_batch_for(world or job.cluster.num_workers),
        "gradient_accumulation_steps": job.deepspeed.gradient_accumulation_steps,
        "zero_optimization": {"stage": job.deepspeed.zero_stage},
        "zero_allow_untested_optimizer": True,  # torch SGD with two groups (§8) under ZeRO 1/2
        **_precision(job, on_gpu),
        "gradient_clipping": job.deepspeed.gradient_clipping,  # DeepSpeed defaults to 1.0
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def _import_deepspeed():
    """`import deepspeed`, less the `import mlflow` its autotuner (which cadist never runs) makes at
    import time: ≈ 1.2 of the 1.5 CPU-seconds the import takes, in every Ray Train worker — where
    MLflow is imported only by rank 0, and only when it logs. Workers import DeepSpeed before any
    thread of theirs might import MLflow (the tracker and its sampler start after the engine); a
    process that has MLflow already imports DeepSpeed as it is."""
    if "deepspeed" in sys.modules or "mlflow" in sys.modules:
        return importlib.import_module("deepspeed")
    sys.modules["mlflow"] = None  # the autotuner's `import mlflow` raises ImportError: not used
    try:
        return importlib.import_module("deepspeed")
    finally:
        if sys.modules.get("mlflow", 0) is None:
            del sys.modules["mlflow"]


def _skip_shm_op_build() -> None:
    """DeepSpeed JIT-compiles an inference-only shared-memory op at initialize on the CPU (35–60 s,
    and leaks /dev/shm); training does not use it."""
    importlib.import_module("deepspeed.comm.torch")
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None


def _quiet_known_notices() -> None:
    """Two notices every run would print that ask nothing of the user: DeepSpeed's warning about
    the SGD optimizer under ZeRO (allowed on purpose, see deepspeed_config) and torch's deprecation
    of a collective that DeepSpeed's ZeRO calls."""
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated")
    logging.getLogger("DeepSpeed").addFilter(_not_untested_optimizer)  # once: same object


def _not_untested_optimizer(record: logging.LogRecord) -> bool:
    return "untested optimizer" not in record.getMessage()


def _state_types() -> list:
    """The only classes (besides tensors and plain containers) DeepSpeed's checkpoint files of the
    configurations cadist generates hold: ZeRO 1/2 optimizer state records its stage, loss scaler
    and parameter fragment addresses."""
    _import_deepspeed()
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def load_state_file(path: str, map_location=None):
    """One DeepSpeed checkpoint file, unpickled with `weights_only=True` and the allow-list above
    (DeepSpeed itself loads them with `weights_only=False`: a file planted on the storage path would
    run its code in every worker). Anything else is refused, naming the file."""
    try:
        with torch.serialization.safe_globals(_state_types()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exn:  # pickle.UnpicklingError, RuntimeError (not a zip), EOFError …
        first = (str(exn).strip().splitlines() or [type(exn).__name__])[0]
        raise CheckpointError(
            f"{path}: refused to load: not a DeepSpeed checkpoint file as cadist writes them "
            f"(tensors, plain containers and {', '.join(t.__name__ for t in _state_types())} "
            f"only): {first[:300]}; someone or something else wrote it — remove that checkpoint "
            f"folder (or rerun with --restart to start over)"
        ) from None


def make_engine(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, config: dict):
    """Wrap model, optimizer and scheduler into a DeepSpeed engine on the existing process group;
    its checkpoint files are read by `load_state_file`."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    deepspeed = _import_deepspeed()
    _skip_shm_op_build()
    _quiet_known_notices()
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=config,
        dist_init_required=False,
    )
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    if not isinstance(engine.checkpoint_engine, TorchCheckpointEngine):  # (config never asks)
        raise RuntimeError(f"unexpected DeepSpeed checkpoint engine {engine.checkpoint_engine}")
    engine.checkpoint_engine.load = load_state_file
    return engine


def build_engine(job: JobConfig, on_gpu: bool, world: int, device: torch.device):
    seed_everything(job.train.seed)  # identical initialisation on every rank
    model = build_model(**job.model.build_kwargs())
    with tempfile.TemporaryDirectory() as tmp:  # start weights on object storage: fetched here
        if job.model.backbone_weights:
            load_backbone(model, local_copy(job.model.backbone_weights, f"{tmp}/backbone"))
        if job.model.weights:
            load_weights(model, local_copy(job.model.weights, tmp), expect_name=job.model.name)
    if world > 1:  # batch statistics over the global batch, on GPUs and on the CPU alike
        model = (
            nn.SyncBatchNorm.convert_sync_batchnorm(model)
            if on_gpu
            else convert_to_distributed_bn(model)
        )
    model.to(device)
    opt, sched = make_optimizer(model, job.train)
    return make_engine(model, opt, sched, deepspeed_config(job, on_gpu, world))


def train_step(engine, batch: dict, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Forward and backward of one (micro-)batch from the stream (uint8 images are normalised on the
    device); DeepSpeed steps the optimiser and the schedule at the last micro-batch of each step."""
    x = batch["image"].to(device, non_blocking=True)
    x = (normalize_uint8(x) if x.dtype == torch.uint8 else x).to(dtype)
    y = batch["label"].to(device, non_blocking=True)
    loss = training_loss(engine.module, engine(x), y)
    engine.backward(loss)
    engine.step()
    return loss


def load_resharded(engine, ckpt_dir: str, tag: str, saved_world: int) -> dict:
    """Resume a ZeRO 1/2 checkpoint written by `saved_world` ranks on another number of ranks.

    DeepSpeed refuses to load partitioned optimizer state on a new data-parallel size, and its
    universal-checkpoint converter handles Adam's state only. The recipe's SGD keeps one momentum
    buffer per parameter group, partitioned like the group's flat fp32 copy: the parameters laid end
    to end, zero padding at the end only. So: load weights, schedule and client state without the
    optimizer (DeepSpeed then rebuilds the fp32 partitions from the fp32 weights, exactly), set the
    learning rates from the schedule, join the saved momentum partitions and hand this rank its
    slice of the new partitioning.
    Returns the client state."""
    import torch.distributed as dist

    _, client = engine.load_checkpoint(ckpt_dir, tag=tag, load_optimizer_states=False)
    zero = engine.optimizer
    # the learning rates live in the optimizer state not loaded: take them from the schedule
    for group, lr in zip(
        zero.optimizer.param_groups, engine.lr_scheduler.get_last_lr(), strict=True
    ):
        group["lr"] = lr
    rank, world = dist.get_rank(), dist.get_world_size()
    saved = []
    for r in range(saved_world):
        path = os.path.join(ckpt_dir, tag, f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt")
        if not os.path.exists(path):
            raise CheckpointError(
                f"{ckpt_dir}: the ZeRO optimizer state of rank {r} ({os.path.basename(path)}) is "
                f"missing: the checkpoint was written by {saved_world} ranks and is incomplete; "
                f"remove that checkpoint folder to resume from the one before, or rerun with "
                f"--restart to start over"
            )
        saved.append(load_state_file(path, map_location="cpu")["optimizer_state_dict"])
    for i, flat in enumerate(zero.single_partition_of_fp32_groups):
        group = engine.optimizer.bit16_groups[i]
        total = sum(p.numel() for p in group)
        in_ckpt = sum(f.numel for sd in saved for f in sd["param_slice_mappings"][i].values())
        if in_ckpt != total or any(any(sd["param_alignment_paddings"][i]) for sd in saved):
            raise RuntimeError(
                f"{ckpt_dir}: ZeRO parameter group {i} holds {in_ckpt} values laid out for "
                f"{saved_world} ranks, the model's group {total}; this checkpoint cannot be "
                f"re-split: resume with cluster.num_workers={saved_world}"
            )
        states = [sd["base_optimizer_state"]["state"].get(i, {}) for sd in saved]
        if not all("momentum_buffer" in s for s in states):
            continue  # no momentum yet (or SGD without momentum): nothing to carry over
        full = torch.cat([s["momentum_buffer"].float() for s in states])[:total]
        size = flat.numel()
        padded = torch.zeros(size * world, dtype=flat.dtype, device=flat.device)
        padded[:total] = full.to(flat.device)
        zero.optimizer.state[flat]["momentum_buffer"] = padded[
            rank * size : (rank + 1) * size
        ].clone()
    return client
