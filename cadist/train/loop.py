"""The plain-torch parts of training and evaluation (no Ray, no DeepSpeed): parameter groups, the
poly schedule of method §8, the loss, seeding (evaluation: `cadist.eval.loop`)."""

from __future__ import annotations

import random
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cadist.data.cityscapes import IGNORE_INDEX


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
