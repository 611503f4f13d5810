"""The trade-off figure: one point per run or trial at (cost, quality) — e.g. backbone GMac per image
against val mIoU — labelled, with the Pareto front drawn as a line. PNG via matplotlib's Agg backend
(no display needed), written to a temporary name and renamed."""

from __future__ import annotations

import os
from pathlib import Path


def tradeoff_png(
    points: list[dict], path: str | Path, x: str, y: str, x_dir: str = "min", y_dir: str = "max",
    title: str = "",
) -> list[str]:  # fmt: skip
    """`points`: [{"label", x, y}, …] (points missing x or y are left out). Returns the labels on
    the Pareto front in order of increasing x."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cadist.sweeps import pareto

    pts = [p for p in points if p.get(x) is not None and p.get(y) is not None]
    front = pareto([{"metrics": {x: p[x], y: p[y]}} for p in pts], {x: x_dir, y: y_dir})
    on = sorted((p for p, f in zip(pts, front, strict=True) if f), key=lambda p: p[x])
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    try:
        ax.scatter([p[x] for p in pts], [p[y] for p in pts], color="tab:blue", zorder=2)
        if on:
            ax.plot([p[x] for p in on], [p[y] for p in on], "-o", color="tab:red",
                    label="Pareto front", zorder=3)  # fmt: skip
            ax.legend(loc="best")
        for p in pts:
            ax.annotate(str(p["label"]), (p[x], p[y]), textcoords="offset points",
                        xytext=(4, 4), fontsize=7)  # fmt: skip
        ax.margins(0.15)  # room for the labels of the outermost points
        ax.set_xlabel(x)
        ax.set_ylabel(y)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp.png")
        fig.savefig(tmp)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
    return [str(p["label"]) for p in on]
