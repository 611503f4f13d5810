"""The Pareto front of results under one or two objectives (max or min each): which rows no other
row beats in all of them. Standard library only."""

from __future__ import annotations

import math


def pareto(rows: list[dict], objectives: dict[str, str]) -> list[bool]:
    """For each row, whether no other row is at least as good in every objective and better in
    one (rows missing an objective are never on the front)."""

    def key(r):
        return [
            r["metrics"].get(m, math.nan) * (1 if d == "max" else -1) for m, d in objectives.items()
        ]

    vals = [key(r) for r in rows]
    front = []
    for i, a in enumerate(vals):
        if any(math.isnan(x) for x in a):
            front.append(False)
            continue
        dominated = any(
            j != i
            and not any(math.isnan(x) for x in b)
            and all(x >= y for x, y in zip(b, a, strict=True))
            and any(x > y for x, y in zip(b, a, strict=True))
            for j, b in enumerate(vals)
        )
        front.append(not dominated)
    return front
