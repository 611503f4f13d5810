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


def log_evaluation(job: JobConfig, ckpt: str, result: dict, run_name: str | None = None) -> str:
    """`cadist eval --log`: the evaluation as an MLflow run in the job's experiment, shaped like a
    training run's evaluation at step 0 (params, `val/*`, `macs/*`, the IoU table), so that
    `cadist report` lists e.g. released checkpoints beside trained ones. Returns the run id."""
    from cadist import __version__
    from cadist.eval.miou import iou_csv, val_metrics
    from cadist.macs import count_dense
    from cadist.models.build import is_adaptive
    from cadist.tracking import Tracker, check_reachable, new_run, resolve_uri
    from cadist.train.driver import val_image_size

    uri = resolve_uri(job.mlflow.tracking_uri)
    check_reachable(uri)
    tags = {"cadist.job": job.name, "cadist.task": "eval", "cadist.weights_source": str(ckpt),
            "cadist.version": __version__}  # fmt: skip
    tracker = Tracker(
        uri, new_run(uri, job.mlflow.experiment, run_name or f"{job.name}-eval", tags)
    )
    tracker.log_params(job.flat() | {"eval.ckpt": str(ckpt)})
    metrics = val_metrics(result)
    hw = val_image_size(job)
    if hw and is_adaptive(job.model.name) and "high_res_fraction" in result:
        from cadist.adaptive.stats import mac_line

        line = mac_line(job.model.name, job.model.adaptive_mode, *hw)
        p = result["high_res_fraction"]
        metrics |= {"val/high_res_fraction": p, "macs/backbone_gmac": line.backbone(p),
                    "macs/backbone_gmac_computed": line.backbone(p, actual=True),
                    "macs/total_gmac": line.backbone(p) + line.head_gmac}  # fmt: skip
    elif hw and not is_adaptive(job.model.name):
        m = count_dense(job.model.name, job.model.output_stride, *hw)
        metrics |= {"macs/backbone_gmac": m["backbone_gmac"], "macs/total_gmac": m["total_gmac"]}
    if "miou_inference" in result:
        metrics["val/miou_inference"] = result["miou_inference"]
    tracker.log_metrics(metrics, 0)
    tracker.log_text(iou_csv(result), "eval/iou.csv")
    tracker.finish()
    return tracker.run_id
