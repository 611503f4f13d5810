"""`cadist report`: the paper's table from an MLflow experiment — per training run its best
validation mIoU (the reference's "best during training", §8), the step it came at, the high-res
fraction and backbone GMac at that evaluation, beside the released models' numbers (§13.1)."""

from __future__ import annotations

#: §13.1: (model name, output stride or None) → released val mIoU
PAPER_MIOU = {
    ("deeplabv3_resnet101", "16"): 0.762,
    ("deeplabv3_resnet101", "8"): 0.776,
    ("deeplabv3_batch_ap_resnet101", None): 0.773,
    ("deeplabv3_ad_resnet101", None): 0.775,
}


def _at(history: list[tuple[int, float]], step: int) -> float | None:
    """The value logged at `step`, else the latest one before it (e.g. dense GMac at step 0)."""
    before = [v for s, v in history if s <= step]
    return before[-1] if before else None


def summarise(runs: list[dict]) -> list[dict]:
    """One row per run, sorted by backbone GMac (then name)."""
    rows = []
    for r in runs:
        h = r["history"]
        miou = h.get("val/miou", [])
        best_step, best = max(miou, key=lambda sv: (sv[1], -sv[0])) if miou else (None, None)
        model = r["params"].get("model.name", "?")
        os_ = r["params"].get("model.output_stride")
        adaptive = model.startswith(("deeplabv3_batch_ap_", "deeplabv3_ad_"))
        paper = PAPER_MIOU.get((model, None if adaptive else os_))
        row = {
            "run": r["name"],
            "model": model + ("" if adaptive else f" OS{os_}"),
            "status": r["status"],
            "steps": max((s for s, _ in miou), default=0),
            "best_miou": best,
            "best_step": best_step,
            "paper_miou": paper,
        }
        if best_step is not None:
            for key, col in (
                ("val/miou_inference", "miou_inference"),
                ("val/high_res_fraction", "high_res_fraction"),
                ("macs/backbone_gmac", "backbone_gmac"),
            ):
                if key in h:
                    row[col] = _at(h[key], best_step)
        rows.append(row)
    return sorted(rows, key=lambda r: (r.get("backbone_gmac") or float("inf"), r["run"]))


def markdown(rows: list[dict]) -> str:
    cols = [
        ("run", "run"), ("model", "model"), ("best_miou", "best val mIoU"),
        ("best_step", "at step"), ("miou_inference", "inference net mIoU"),
        ("high_res_fraction", "high-res p"), ("backbone_gmac", "backbone GMac"),
        ("paper_miou", "released mIoU"), ("status", "status"),
    ]  # fmt: skip

    def cell(v):
        if v is None:
            return "–"
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(title for _, title in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(r.get(k)) for k, _ in cols) + " |" for r in rows]
    return "\n".join(lines)
