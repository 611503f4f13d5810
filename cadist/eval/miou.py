"""The §9 confusion matrix: rows = ground truth, columns = prediction, 255 skipped.

Accumulate per rank with `update`, sum across ranks with `all_reduce` (exact: integer counts in
int64), then read IoU per class, mIoU (NaN classes excluded), pixel and class accuracies.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist


class ConfusionMatrix:
    def __init__(self, num_classes: int = 19, device: str | torch.device = "cpu"):
        self.n = num_classes
        self.mat = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """pred, target: integer tensors of equal shape, e.g. (B, H, W); targets outside 0..n−1 are skipped."""
        if pred.shape != target.shape:
            raise ValueError(
                f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ"
            )
        t = target.reshape(-1).to(self.mat.device)
        p = pred.reshape(-1).to(self.mat.device)
        keep = (t >= 0) & (t < self.n)
        idx = t[keep].long() * self.n + p[keep].long()
        self.mat += torch.bincount(idx, minlength=self.n * self.n).reshape(self.n, self.n)

    def all_reduce(self) -> None:
        """Sum the matrices of all ranks (no-op without an initialised process group)."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(self.mat, op=dist.ReduceOp.SUM)

    def iou(self) -> list[float]:
        """IoU per class; NaN for a class absent from both ground truth and predictions."""
        m = self.mat.double()
        tp = m.diag()
        denom = m.sum(0) + m.sum(1) - tp
        return [float(tp[c] / denom[c]) if denom[c] > 0 else math.nan for c in range(self.n)]

    def miou(self) -> float:
        vals = [v for v in self.iou() if not math.isnan(v)]
        return sum(vals) / len(vals) if vals else math.nan

    def pixel_accuracy(self) -> float:
        total = self.mat.sum().item()
        return self.mat.diag().sum().item() / total if total else math.nan

    def mean_class_accuracy(self) -> float:
        m = self.mat.double()
        rows = m.sum(1)
        accs = [float(m[c, c] / rows[c]) for c in range(self.n) if rows[c] > 0]
        return sum(accs) / len(accs) if accs else math.nan

    def frequency_weighted_iou(self) -> float:
        m = self.mat.double()
        freq = m.sum(1) / m.sum().clamp_min(1)
        iou = torch.tensor([0.0 if math.isnan(v) else v for v in self.iou()], dtype=torch.float64)
        return float((freq * iou).sum())

    def summary(self, class_names: tuple[str, ...] | list[str] | None = None) -> dict:
        names = class_names or [str(c) for c in range(self.n)]
        return {
            "miou": self.miou(),
            "pixel_accuracy": self.pixel_accuracy(),
            "mean_class_accuracy": self.mean_class_accuracy(),
            "fw_iou": self.frequency_weighted_iou(),
            "iou": dict(zip(names, self.iou(), strict=True)),
        }


def val_metrics(summary: dict) -> dict[str, float]:
    """A `ConfusionMatrix.summary` as the metrics training and `cadist eval --log` record."""
    return {
        "val/miou": summary["miou"],
        "val/pixel_accuracy": summary["pixel_accuracy"],
        "val/mean_class_accuracy": summary["mean_class_accuracy"],
    } | {f"val/iou/{name}": v for name, v in summary["iou"].items()}


def iou_csv(summary: dict) -> str:
    """Per-class IoU as `class,iou` lines (empty for a class absent from labels and predictions)."""
    return "class,iou\n" + "".join(
        f"{n},{'' if math.isnan(v) else f'{v:.4f}'}\n" for n, v in summary["iou"].items()
    )
