"""The plain-torch parts of training and evaluation (no Ray, no DeepSpeed): parameter groups, the
poly schedule of method §8, the loss, seeding, and evaluation into a §9 confusion matrix."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cadist.config.passes import Augmentation, Pass
from cadist.data.cityscapes import IGNORE_INDEX
from cadist.eval.miou import ConfusionMatrix
from cadist.eval.tta import (
    high_res_fraction,
    plan_passes,
    predict_augmented,
    size_multiple,
)


def param_groups(
    model: nn.Module, lr_backbone: float, lr_head: float, lr_mask: float = 0.001
) -> list[dict]:
    """Backbone parameters at `lr_backbone`, the head at `lr_head`, and — for learned-mask models —
    the mask estimator at `lr_mask` (a third group, last). Shared (tied) parameters appear once.

    Weight decay applies to all parameters, BN and biases included (§8)."""
    backbone, head, mask = [], [], []
    for name, p in model.named_parameters():  # named_parameters() skips tied duplicates
        if name.startswith("backbone.mask_estimator."):
            mask.append(p)
        else:
            (backbone if name.startswith("backbone.") else head).append(p)
    groups = [
        {"params": backbone, "lr": lr_backbone, "name": "backbone"},
        {"params": head, "lr": lr_head, "name": "head"},
    ]
    if mask:
        groups.append({"params": mask, "lr": lr_mask, "name": "mask_estimator"})
    return groups


def poly_lambdas(
    groups: list[dict], iterations: int, power: float, min_lr: float
) -> list[Callable[[int], float]]:
    """LambdaLR factors: lr_t = max(lr0·(1 − t/T)^power, min_lr), t = 0 for the first step."""

    def make(lr0):
        return lambda t: max((1 - min(t, iterations) / iterations) ** power, min_lr / lr0)

    return [make(g["lr"]) for g in groups]


def make_optimizer(model: nn.Module, t) -> tuple[torch.optim.Optimizer, object]:
    """The §8 optimiser and schedule for `model`: SGD (momentum, weight decay on everything) over
    backbone/head groups, poly LambdaLR. `t` is a `TrainConfig` (any object with its fields)."""
    groups = param_groups(model, t.lr_backbone, t.lr_head, getattr(t, "lr_mask_estimator", 1e-3))
    opt = torch.optim.SGD(groups, lr=t.lr_head, momentum=t.momentum, weight_decay=t.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, poly_lambdas(groups, t.iterations, t.poly_power, t.min_lr)
    )
    return opt, sched


def segmentation_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over valid pixels (255 ignored), mean; logits (B, C, H, W), labels (B, H, W)."""
    return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX)


def training_loss(model: nn.Module, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The segmentation loss plus the model's own term of this forward pass, if it has one (the
    learned-mask ratio loss (r − ρ)², §7.4, weight 1)."""
    loss = segmentation_loss(logits, labels)
    aux = getattr(model, "aux_loss", None)
    return loss if aux is None else loss + aux


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[dict],
    device: torch.device,
    num_classes: int = 19,
    keep: int = 0,
    tta: Augmentation | None = None,
    per_image: list[dict] | None = None,
) -> tuple[ConfusionMatrix, list[dict], dict]:
    """Predict every batch at full resolution (with `tta`: the mean probabilities of its passes,
    see `cadist.eval.tta`).

    Returns the local confusion matrix, the first `keep` samples as {"key", "image", "label",
    "pred"[, "mask"]} (CPU tensors) for logging, and sums for adaptive models:
    {"images": n, "high_res_sum": Σ per-image high-res fraction (0 for dense models; with `tta`
    each image's mean over the passes), "passes": {Pass: (images, Σ per-image high-res fraction
    or None)}} — without `tta` one unmirrored pass per input size. A `per_image` list gets one record per image: {"key", "miou",
    "pixel_accuracy", "pixels"[, "high_res_fraction"]}."""
    was_training = model.training
    model.eval()
    dtype = next(model.parameters()).dtype
    cm = ConfusionMatrix(num_classes, device)
    kept, images, high_res, passes = [], 0, 0.0, {}
    for batch in batches:
        x = batch["image"].to(device, non_blocking=True)
        x = x.to(dtype) if x.is_floating_point() else x
        if tta is None:
            pred = model(x).argmax(1)
            mask = getattr(model, "last_mask", None)
            fractions = None if mask is None else high_res_fraction(mask)
            _count(passes, Pass(*x.shape[-2:], False), x.shape[0], fractions)
        else:
            pred, fractions, mask = _augmented(model, x, tta, passes)
        images += x.shape[0]
        if fractions is not None:
            high_res += float(fractions.sum())
        y = batch["label"].to(device, non_blocking=True)
        cm.update(pred, y)
        if per_image is not None:
            per_image += _per_image(pred, y, batch["key"], fractions, num_classes)
        for i in range(min(len(batch["key"]), keep - len(kept))):
            item = {
                "key": batch["key"][i],
                "image": batch["image"][i].float().cpu(),
                "label": batch["label"][i].cpu(),
                "pred": pred[i].cpu(),
            }
            if mask is not None:
                item["mask"] = mask[i].cpu()
            kept.append(item)
    model.train(was_training)
    return cm, kept, {"images": images, "high_res_sum": high_res, "passes": passes}


def _augmented(model: nn.Module, x: torch.Tensor, tta: Augmentation, passes: dict):
    """The augmented prediction (B, H, W) of x, each image's mean high-res fraction over the
    passes (B,) (None for dense models) and the mask of its unmirrored pass at the input's own
    size (with a window the crops' put together; None if no pass runs at that size) — the one
    logged over the image; adds each pass's images and high-res sum to `passes`."""
    plan = plan_passes(*x.shape[-2:], tta.scales, tta.flip, size_multiple(model), tta.window)
    probs, masks, per_pass = predict_augmented(model, x, plan, tta.window)
    own = [m for p, m in zip(plan, masks, strict=True)
           if not p.flip and (p.height, p.width) == x.shape[-2:]]  # fmt: skip
    for p, f in zip(plan, per_pass, strict=True):
        _count(passes, p, x.shape[0], f)
    fractions = [f for f in per_pass if f is not None]
    mean = torch.stack(fractions).mean(0) if fractions else None
    return probs.argmax(1), mean, own[0] if own else None


def _count(passes: dict, p: Pass, images: int, fractions: torch.Tensor | None) -> None:
    """Adds a batch's images (and their high-res fractions' sum, adaptive models) to pass p's."""
    n, s = passes.get(p, (0, None))
    if fractions is not None:
        s = (s or 0.0) + float(fractions.sum())
    passes[p] = (n + images, s)


def _per_image(pred, target, keys, fractions, num_classes: int) -> list[dict]:
    """Each image's mIoU and pixel accuracy (§9 on that image alone) and high-res fraction."""
    out = []
    for i, key in enumerate(keys):
        cm = ConfusionMatrix(num_classes, pred.device)
        cm.update(pred[i], target[i])
        rec = {"key": key, "miou": cm.miou(), "pixel_accuracy": cm.pixel_accuracy(),
               "pixels": int(cm.mat.sum())}  # fmt: skip
        if fractions is not None:
            rec["high_res_fraction"] = float(fractions[i])
        out.append(rec)
    return out
