"""`cadist eval`: evaluate weights on a job's validation shards (one process, CPU or GPU)."""

from __future__ import annotations

from pathlib import Path

import torch

from cadist.checkpoints import resolve_weights
from cadist.config import JobConfig
from cadist.data.cityscapes import CLASS_NAMES
from cadist.data.stream import ShardStream, make_loader
from cadist.models.build import build_model, is_learned
from cadist.models.weights import load_weights
from cadist.train.loop import evaluate


def evaluate_job(job: JobConfig, ckpt: str | Path, device: str = "cpu") -> dict:
    """mIoU, accuracies and per-class IoU of `ckpt` on `job.data.val_shards` (method §9); `ckpt`:
    a weights file, checkpoint folder or MLflow URI (read from the job's tracking store)."""
    uri = job.mlflow.tracking_uri if job.mlflow.enabled else None
    ckpt = resolve_weights(ckpt, uri)
    model = build_model(**job.model.build_kwargs())
    load_weights(model, ckpt, expect_name=job.model.name)
    model.to(device)
    val = ShardStream(
        job.data.val_shards,
        train=False,
        batch_size=job.eval.batch_size,
        num_workers=min(job.data.num_workers, 1),
        skip_bad=job.data.skip_bad,
        allow_pipe=job.data.allow_pipe,
    )
    cm, _, extra = evaluate(model, make_loader(val), torch.device(device))
    out = cm.summary(CLASS_NAMES)
    out["pixels"] = int(cm.mat.sum())
    out["images"] = extra["images"]
    if getattr(model, "last_mask", None) is not None:
        out["high_res_fraction"] = extra["high_res_sum"] / max(1, extra["images"])
    if is_learned(job.model.name) and job.eval.learned_inference:
        # the irregular inference network of the same weights (§7.5), as training logs it
        net = build_model(**job.model.build_kwargs() | {"network": "inference"})
        load_weights(net, ckpt, expect_name=job.model.name)
        cm_i, _, extra_i = evaluate(net.to(device), make_loader(val), torch.device(device))
        out["high_res_fraction_train"] = out["high_res_fraction"]
        out["miou_inference"] = cm_i.miou()
        out["high_res_fraction"] = extra_i["high_res_sum"] / max(1, extra_i["images"])
    return out
