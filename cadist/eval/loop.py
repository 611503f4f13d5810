"""The evaluation pass (no Ray, no DeepSpeed): a model over validation batches into a §9 confusion
matrix, with test-time augmentation and per-image records; training and `cadist eval` both call it."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from cadist.config.passes import Augmentation, Pass
from cadist.eval.miou import ConfusionMatrix
from cadist.eval.tta import high_res_fraction, plan_passes, predict_augmented, size_multiple


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[dict],
    device: torch.device,
    num_classes: int = 19,
    keep: int = 0,
    tta: Augmentation | None = None,
    per_image: list[dict] | None = None,
    on_batch=None,
) -> tuple[ConfusionMatrix, list[dict], dict]:
    """Predict every batch at full resolution (with `tta`: the mean probabilities of its passes,
    see `cadist.eval.tta`).

    Returns the local confusion matrix, the first `keep` samples as {"key", "image", "label",
    "pred"[, "mask"]} (CPU tensors) for logging, and sums for adaptive models:
    {"images": n, "high_res_sum": Σ per-image high-res fraction (0 for dense models; with `tta`
    each image's mean over the passes), "passes": {Pass: (images, Σ per-image high-res fraction
    or None)}} — without `tta` one unmirrored pass per input size. A `per_image` list gets one record per image: {"key", "miou",
    "pixel_accuracy", "pixels"[, "high_res_fraction"]}. `on_batch(n)` after each batch of n images."""
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
        if on_batch is not None:
            on_batch(x.shape[0])
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
