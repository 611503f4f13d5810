"""`cadist report`: the paper's table from an MLflow experiment — per training run its best
validation mIoU (the reference's "best during training", §8), the step it came at, the high-res
fraction and backbone GMac at that evaluation, beside the released models' numbers (§13.1)."""

from __future__ import annotations

import math

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


NONE = (None, "None", "")  # a param of a job key left unset (MLflow keeps str(None))


def _augmentation(params: dict) -> str:
    """The evaluation protocol of a run if not the paper's, e.g. "TTA 0.75,1.0,1.25 flip", "slide
    512x1024/341x683": a training run's from its job's `eval.*` keys, a `cadist eval --log` run's
    from what it ran (older ones logged `eval.tta_scales`/`eval.tta_flip`); "" for none."""
    from cadist.config.passes import Augmentation

    def param(key: str) -> str | None:
        value = params.get(key)
        return None if value in NONE else value

    scales = param("eval.tta_scales") or param("eval.scales") or "1"
    flip = (param("eval.tta_flip") or param("eval.flip")) == "True"
    window, _, stride = (param("eval.window") or "").partition("/")  # older: "HxW/SHxSW"
    return Augmentation.parse(scales, flip, window or None, stride or param("eval.stride")).label()


#: what a run's model label says of `model.head: adaptive` (beyond the paper: no paper figure)
ADAPTIVE_HEAD = " + adaptive head"


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
        label = model + ("" if adaptive else f" OS{os_}")
        if r["params"].get("model.head") == "adaptive":
            label, paper = label + ADAPTIVE_HEAD, None
        tta = _augmentation(r["params"])
        if tta:  # `cadist eval --scales/--flip/--window`: not the paper's protocol
            label, paper = f"{label} + {tta}", None
        row = {
            "run": r["name"],
            "model": label,
            "mask": mask_settings(model, r["params"]),
            "status": r["status"],
            "steps": max((s for s, _ in miou), default=0),
            "best_miou": best,
            "best_step": best_step,
            "paper_miou": paper,
        }
        data = r.get("datasets") or {}
        scored_on = data.get("validation") or data.get("evaluation")
        if scored_on:
            row["val_data"] = scored_on
        if best_step is not None:
            per_class = {_class_name(k.removeprefix("val/iou/")): dict(v).get(best_step)
                         for k, v in h.items() if k.startswith("val/iou/")}  # fmt: skip
            if per_class:
                row["per_class"] = per_class
            for key, col in (
                ("val/miou_inference", "miou_inference"),
                ("val/high_res_fraction", "high_res_fraction"),
                ("macs/backbone_gmac", "backbone_gmac"),
                ("macs/total_gmac", "total_gmac"),
                ("val/images_per_s", "images_per_s"),
            ):
                if key in h:
                    row[col] = _at(h[key], best_step)
        rows.append(row)
    return sorted(rows, key=lambda r: (r.get("backbone_gmac") or float("inf"), r["run"]))


def _class_name(key: str) -> str:
    """A class's name from its MLflow metric key (logged with "_" for " ": traffic_light)."""
    from cadist.data.cityscapes import CLASS_NAMES

    return {n.replace(" ", "_"): n for n in CLASS_NAMES}.get(key, key)


def mask_settings(model: str, params: dict) -> str:
    """How a run's model chooses its high-resolution cells: "edges τ 0.15, trimap 11" (edge mask,
    §6), "learned ρ 0.3" (learned mask, §7), "dense" (every cell at the output stride)."""
    if model.startswith("deeplabv3_batch_ap_"):
        return (
            f"edges τ {params.get('model.edge_threshold', '?')}, "
            f"trimap {params.get('model.trimap_width', '?')}"
        )
    if model.startswith("deeplabv3_ad_"):
        return f"learned ρ {params.get('model.target_low_res', '?')}"
    return "dense"


def mixed_validation(rows: list[dict]) -> str | None:
    """A note when the rows were scored on different validation shard sets (their mIoU then do
    not compare), naming each set and its runs; None when all that record one agree."""
    sets: dict[str, list[str]] = {}
    for r in rows:
        if r.get("val_data"):
            sets.setdefault(r["val_data"], []).append(r["run"])
    if len(sets) < 2:
        return None
    parts = "; ".join(f"{data}: {', '.join(runs)}" for data, runs in sorted(sets.items()))
    return f"note: these runs were scored on different validation shards ({parts}); their mIoU do not compare"


def markdown(rows: list[dict], cols: list[tuple[str, str]] | None = None) -> str:
    """The rows as a Markdown table: `cols` [(row key, title)], by default the report's."""
    cols = cols or [
        ("run", "run"), ("model", "model"), ("mask", "mask"), ("best_miou", "best val mIoU"),
        ("best_step", "at step"), ("miou_inference", "inference net mIoU"),
        ("high_res_fraction", "high-res p"), ("backbone_gmac", "backbone GMac"),
        ("total_gmac", "total GMac"), ("images_per_s", "val images/s"),
        ("paper_miou", "released mIoU"), ("status", "status"),
    ]  # fmt: skip

    def cell(key, v):
        if v is None:
            return "–"
        if key == "images_per_s":
            return f"{v:.1f}"
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(title for _, title in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(k, r.get(k)) for k, _ in cols) + " |" for r in rows]
    return "\n".join(lines)


def per_class_markdown(rows: list[dict], baseline: str | None = None) -> str:
    """Per-class IoU at each run's best evaluation: one row per Cityscapes class (in trainId order),
    one column per run; with `baseline` (a run's name) the other runs' cells add their difference
    to it, e.g. `0.7012 (-0.0154)` — which classes an adaptive network gives up, or gains."""
    from cadist.data.cityscapes import CLASS_NAMES

    runs = [r for r in rows if r.get("per_class")]
    base = next((r for r in runs if r["run"] == baseline), None)
    if baseline is not None and base is None:
        from cadist.errors import ConfigError

        there = ", ".join(r["run"] for r in runs) or "none with per-class IoU"
        raise ConfigError(f"--baseline {baseline}: no such run in the report (runs: {there})")

    def cell(r, v, ref):
        if v is None or math.isnan(v):
            return "–"
        if base is None or r is base or ref is None or math.isnan(ref):
            return f"{v:.4f}"
        return f"{v:.4f} ({v - ref:+.4f})"

    if base is not None:  # the baseline's column first
        runs = [base] + [r for r in runs if r is not base]
    head = [r["run"] + (" (baseline)" if r is base else "") for r in runs]
    lines = ["| class | " + " | ".join(head) + " |", "|" + "---|" * (len(runs) + 1)]
    names = list(CLASS_NAMES) + sorted({c for r in runs for c in r["per_class"]} - set(CLASS_NAMES))
    for name in names:
        ref = base["per_class"].get(name) if base else None
        cells = [cell(r, r["per_class"].get(name), ref) for r in runs]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    ref = base["best_miou"] if base else None
    lines.append("| **mIoU** | " + " | ".join(cell(r, r["best_miou"], ref) for r in runs) + " |")
    return "\n".join(lines)
