"""The trade-off figure: one point per run or trial at (cost, quality) — e.g. backbone GMac per image
against val mIoU — labelled, with the Pareto front drawn as a line. PNG via matplotlib's Agg backend
(no display needed), written to a temporary name and renamed."""

from __future__ import annotations

import os
from pathlib import Path

AXIS_NAMES = {
    "backbone_gmac": "backbone GMac per image",
    "macs/backbone_gmac": "backbone GMac per image",
    "total_gmac": "total GMac per image",
    "macs/total_gmac": "total GMac per image",
    "miou": "val mIoU",
    "val/miou": "val mIoU",
    "val/miou_inference": "val mIoU (inference network)",
    "val/high_res_fraction": "high-res fraction",
}
"""Metric keys → axis titles (other keys are shown as they are)."""

# label positions tried around a point, in points: right-above first, then the other corners,
# then further up and down on either side
_OFFSETS = [(4, 4, "left"), (4, -11, "left"), (-4, 4, "right"), (-4, -11, "right")] + [
    (sx * 4, dy, ha)
    for k in range(1, 6)
    for dy in (4 + 9 * k, -11 - 9 * k)
    for sx, ha in ((1, "left"), (-1, "right"))
]


def place_labels(ax, points: list[tuple[float, float, str]]) -> list:
    """Annotate each (x, y, text) beside its point: at the first position of `_OFFSETS` where the
    text stays inside the axes and covers no label placed before and no other point — or, where
    none is free, inside the axes covering the fewest. Call once the axes' limits and layout are
    final. Returns the labels' display-space boxes."""
    fig = ax.figure
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    pad = 4.0 * fig.dpi / 72  # about half a marker, in pixels
    dots = [ax.transData.transform((px, py)) for px, py, _ in points]
    area = ax.bbox
    boxes = []
    for i, (px, py, text) in enumerate(points):
        others = [d for j, d in enumerate(dots) if j != i]
        best = None
        for k, (dx, dy, ha) in enumerate(_OFFSETS):
            label = ax.annotate(text, (px, py), textcoords="offset points", xytext=(dx, dy),
                                fontsize=7, ha=ha)  # fmt: skip
            box = label.get_window_extent(renderer)
            inside = (
                area.x0 <= box.x0 and box.x1 <= area.x1 and area.y0 <= box.y0 <= box.y1 <= area.y1
            )
            hits = sum(box.overlaps(b) for b in boxes) + sum(
                box.x0 - pad < ox < box.x1 + pad and box.y0 - pad < oy < box.y1 + pad
                for ox, oy in others
            )
            score = (not inside, hits)
            if best is None or score < best[0]:
                if best is not None:
                    best[1].remove()
                best = (score, label, box, k)
            else:
                label.remove()
            if score == (False, 0):
                break
        if best[3] >= 4:  # away from its point: a thin leader line says whose label it is
            dx, dy, ha = _OFFSETS[best[3]]
            best[1].remove()
            ax.annotate(text, (px, py), textcoords="offset points", xytext=(dx, dy), fontsize=7,
                        ha=ha, arrowprops={"arrowstyle": "-", "lw": 0.5, "color": "0.5"})  # fmt: skip
        boxes.append(best[2])
    return boxes


def tradeoff_png(
    points: list[dict], path: str | Path, x: str, y: str, x_dir: str = "min", y_dir: str = "max",
    title: str = "", references: list[dict] | None = None,
) -> list[str]:  # fmt: skip
    """`points`: [{"label", x, y}, …] (points missing x or y are left out); `references`: points
    of the same shape drawn apart (grey diamonds, e.g. the dense baselines), not on the front.
    Returns the labels on the Pareto front in order of increasing x."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cadist.results.pareto import pareto

    pts = [p for p in points if p.get(x) is not None and p.get(y) is not None]
    front = pareto([{"metrics": {x: p[x], y: p[y]}} for p in pts], {x: x_dir, y: y_dir})
    on = sorted((p for p, f in zip(pts, front, strict=True) if f), key=lambda p: p[x])
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    try:
        ax.scatter([p[x] for p in pts], [p[y] for p in pts], color="tab:blue", zorder=2)
        refs = [p for p in references or [] if p.get(x) is not None and p.get(y) is not None]
        if refs:
            ax.scatter([p[x] for p in refs], [p[y] for p in refs], color="0.35", marker="D",
                       label="reference", zorder=2)  # fmt: skip
        if on:
            ax.plot([p[x] for p in on], [p[y] for p in on], "-o", color="tab:red",
                    label="Pareto front", zorder=3)  # fmt: skip
        if on or refs:
            ax.legend(loc="best")
        ax.margins(0.15)  # room for the labels of the outermost points
        ax.set_xlabel(AXIS_NAMES.get(x, x))
        ax.set_ylabel(AXIS_NAMES.get(y, y))
        ax.set_title(title)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        place_labels(ax, [(p[x], p[y], str(p["label"])) for p in pts + refs])
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp.png")
        fig.savefig(tmp)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
    return [str(p["label"]) for p in on]
