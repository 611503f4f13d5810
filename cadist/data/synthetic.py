"""Procedurally generated street scenes in the exact Cityscapes layout.

Each scene is a perspective street: sky, buildings with windows, trees, a road with lane markings
towards a vanishing point, sidewalks, terrain, cars, persons, poles carrying traffic signs or lights,
and void regions (ego vehicle, static clutter). Every class has its own colour family and texture and
is drawn with sharp boundaries, so a segmentation network learns it within a few hundred steps, and
class edges exist where the edge mask of the method fires. Deterministic by (seed, split, index).
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from cadist.data.cityscapes import image_path, label_path

# Cityscapes labelIds used by the generator.
UNLABELED, EGO, STATIC, DYNAMIC = 0, 1, 4, 5
ROAD, SIDEWALK, BUILDING, WALL, FENCE = 7, 8, 11, 12, 13
POLE, TLIGHT, TSIGN, VEGETATION, TERRAIN, SKY = 17, 19, 20, 21, 22, 23
PERSON, CAR = 24, 26

CITIES = {"train": ("synthburg", "genstadt", "pixelheim"), "val": ("valdorf",), "test": ("testau",)}
_SPLIT_ID = {"train": 0, "val": 1, "test": 2}

# Texture noise (std, of 255) per labelId: low like a real camera's, so that the edge mask (§6, τ ≈ 9
# grey levels) fires at object boundaries and textured vegetation, not everywhere.
_NOISE = {
    ROAD: 2.0,
    SIDEWALK: 2.0,
    BUILDING: 1.5,
    WALL: 1.5,
    VEGETATION: 8.0,
    TERRAIN: 1.5,
    SKY: 1.0,
    CAR: 1.5,
    PERSON: 2.0,
    POLE: 1.0,
    TSIGN: 1.0,
    TLIGHT: 1.0,
    FENCE: 2.0,
    EGO: 1.0,
    STATIC: 3.0,
}


@dataclass
class _Canvas:
    lab: np.ndarray  # (H, W) uint8 labelIds
    col: np.ndarray  # (H, W, 3) float32 base colour 0..255
    rng: np.random.Generator

    @property
    def hw(self) -> tuple[int, int]:
        return self.lab.shape

    def paint(
        self, mask: np.ndarray | None, label: int, colour, box=None, shade: float = 0.0
    ) -> None:
        """Paint `label` and `colour` where `mask` is true (None: the whole box); `box` =
        (y0, y1, x0, x1) of the mask, clipped to the image (an empty box paints nothing).

        `shade` > 0 darkens the region linearly towards its bottom (simple vertical shading).
        """
        y0, y1, x0, x1 = box if box is not None else (0, self.hw[0], 0, self.hw[1])
        if y1 <= y0 or x1 <= x0:
            return
        lab = self.lab[y0:y1, x0:x1]
        col = self.col[y0:y1, x0:x1]
        if mask is None:
            mask = np.ones(lab.shape, bool)
        lab[mask] = label
        c = np.asarray(colour, dtype=np.float32)
        if shade:
            ramp = 1.0 - shade * np.linspace(0, 1, y1 - y0, dtype=np.float32)[:, None, None]
            col[mask] = (c[None, None, :] * ramp * np.ones((1, x1 - x0, 1), np.float32))[mask]
        else:
            col[mask] = c


def _clip_box(h, w, y0, y1, x0, x1):
    return max(0, int(y0)), min(h, int(y1)), max(0, int(x0)), min(w, int(x1))


def _grid(box):
    y0, y1, x0, x1 = box
    return np.ogrid[y0:y1, x0:x1]


def _jitter(rng, base, amount=25):
    return np.clip(np.asarray(base, np.float32) + rng.uniform(-amount, amount, 3), 0, 255)


def _smooth_noise(rng, h, w, cell):
    """Low-frequency noise in [-1, 1], bilinear from a coarse random grid, shape (h, w)."""
    gh, gw = h // cell + 2, w // cell + 2
    g = rng.uniform(-1, 1, (gh, gw)).astype(np.float32)
    ys = np.arange(h, dtype=np.float32) / cell
    xs = np.arange(w, dtype=np.float32) / cell
    y0, x0 = ys.astype(int), xs.astype(int)
    fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
    top = g[y0][:, x0] * (1 - fx) + g[y0][:, x0 + 1] * fx
    bot = g[y0 + 1][:, x0] * (1 - fx) + g[y0 + 1][:, x0 + 1] * fx
    return top * (1 - fy) + bot * fy


def _draw_ground(cv: _Canvas, horizon: int, vx: float) -> tuple[np.ndarray, np.ndarray]:
    """Sky, road, sidewalks and terrain. Returns per-row road edges (left, right), shape (H,)."""
    h, w = cv.hw
    rng = cv.rng
    cv.paint(
        np.ones((horizon, w), bool),
        SKY,
        _jitter(rng, (110, 160, 215), 20),
        (0, horizon, 0, w),
        shade=-0.25,
    )
    rows = np.arange(h, dtype=np.float32)
    t = np.clip((rows - horizon) / max(1, h - horizon), 0, 1)  # 0 at horizon, 1 at bottom
    left_b, right_b = w * rng.uniform(-0.25, 0.15), w * rng.uniform(0.85, 1.25)
    left = vx + (left_b - vx) * t
    right = vx + (right_b - vx) * t
    walk = w * rng.uniform(0.12, 0.3) * t  # sidewalk width grows towards the camera
    yy, xx = np.ogrid[0:h, 0:w]
    below = yy >= horizon
    road = below & (xx >= left[:, None]) & (xx < right[:, None])
    walk_m = below & ~road & (xx >= (left - walk)[:, None]) & (xx < (right + walk)[:, None])
    terr = below & ~road & ~walk_m
    cv.paint(terr, TERRAIN, _jitter(rng, (120, 150, 70), 20))
    cv.paint(walk_m, SIDEWALK, _jitter(rng, (185, 170, 175), 20))
    cv.paint(road, ROAD, _jitter(rng, (95, 90, 100), 15))
    # Dashed centre line: still road in the labels, bright in the image.
    centre = (left + right) / 2
    lw = np.maximum(1, 0.012 * (right - left))
    dash = ((rows - horizon) // max(4, h // 24)) % 2 == 0
    line = road & (np.abs(xx - centre[:, None]) < lw[:, None]) & dash[:, None]
    cv.col[line] = (235, 235, 225)
    return left - walk, right + walk


def _draw_buildings(cv: _Canvas, horizon: int) -> None:
    h, w = cv.hw
    rng = cv.rng
    x = -int(rng.uniform(0, 0.05) * w)
    while x < w:
        bw = int(w * rng.uniform(0.06, 0.2))
        if rng.random() < 0.18:  # a gap: sky shows through
            x += bw // 2
            continue
        top = int(horizon - h * rng.uniform(0.08, 0.38))
        bottom = horizon + int(h * rng.uniform(0.0, 0.03))
        box = _clip_box(h, w, top, bottom, x, x + bw)
        label = WALL if rng.random() < 0.08 else BUILDING
        base = (150, 130, 115) if label == BUILDING else (120, 120, 150)
        m = None
        cv.paint(m, label, _jitter(rng, base, 30), box, shade=0.15)
        if label == BUILDING:  # windows: darker grid, same label
            ys, xs = _grid(box)
            ph, pw = max(4, int(h * 0.03)), max(4, int(w * 0.018))
            win = ((ys - box[0]) % ph < ph * 0.55) & ((xs - box[2]) % pw < pw * 0.5)
            win &= (ys - box[0] > ph // 2) & (ys < box[1] - ph // 2)
            region = cv.col[box[0] : box[1], box[2] : box[3]]
            region[win] = region[win] * 0.45 + 15
        x += bw


def _draw_tree(cv: _Canvas, x: int, ground: int, size: float) -> None:
    h, w = cv.hw
    rng = cv.rng
    green = _jitter(rng, (70, 120, 45), 25)
    tw = max(2, int(size * 0.08))
    trunk = _clip_box(h, w, ground - size * 0.9, ground, x - tw // 2, x + tw // 2 + 1)
    cv.paint(None, VEGETATION, (90, 70, 50), trunk)
    cy, cx = ground - size * 1.05, x
    ry, rx = size * 0.55, size * rng.uniform(0.35, 0.6)
    box = _clip_box(h, w, cy - ry, cy + ry + 1, cx - rx, cx + rx + 1)
    ys, xs = _grid(box)
    wobble = 1 + 0.15 * np.sin(np.arctan2(ys - cy, xs - cx) * rng.integers(3, 7))
    m = ((ys - cy) / ry) ** 2 + ((xs - cx) / rx) ** 2 <= wobble
    cv.paint(m, VEGETATION, green, box, shade=0.2)


def _draw_pole(cv: _Canvas, x: int, ground: int, size: float) -> None:
    h, w = cv.hw
    rng = cv.rng
    pw = max(2, int(size * 0.035))
    top = ground - size * 1.6
    box = _clip_box(h, w, top, ground, x - pw // 2, x + pw // 2 + 1)
    cv.paint(None, POLE, _jitter(rng, (120, 120, 125), 20), box)
    s = max(4, int(size * rng.uniform(0.18, 0.3)))
    if rng.random() < 0.7:  # traffic sign: disc, triangle or square
        sb = _clip_box(h, w, top - s, top + s // 4, x - s // 2, x + s // 2 + 1)
        ys, xs = _grid(sb)
        cy, cx, r = top - s / 2 + s / 8, x, s / 2
        kind = rng.integers(3)
        if kind == 0:
            m = (ys - cy) ** 2 + (xs - cx) ** 2 <= r * r
        elif kind == 1:
            m = (np.abs(xs - cx) <= (ys - (cy - r)) * 0.6) & (ys <= cy + r)
        else:
            m = None
        colour = [(220, 200, 40), (235, 235, 235), (40, 80, 200), (200, 40, 40)][rng.integers(4)]
        cv.paint(m, TSIGN, _jitter(rng, colour, 15), sb)
    else:  # traffic light: dark box with one lit lamp
        lb = _clip_box(h, w, top - s * 1.4, top, x - s // 3, x + s // 3 + 1)
        cv.paint(None, TLIGHT, (35, 35, 30), lb)
        lamp = rng.integers(3)
        ly = lb[0] + (lb[1] - lb[0]) * (lamp + 0.5) / 3
        ys, xs = _grid(lb)
        m = (ys - ly) ** 2 + (xs - x) ** 2 <= (s / 5) ** 2
        reg = cv.col[lb[0] : lb[1], lb[2] : lb[3]]
        reg[m] = [(230, 40, 30), (240, 190, 30), (40, 220, 80)][lamp]


def _draw_car(cv: _Canvas, x: float, ground: int, size: float) -> None:
    h, w = cv.hw
    rng = cv.rng
    cw, ch = size * rng.uniform(1.4, 2.2), size * rng.uniform(0.6, 0.8)
    body = _clip_box(h, w, ground - ch * 0.7, ground - ch * 0.12, x - cw / 2, x + cw / 2)
    colour = _jitter(
        rng,
        [(30, 40, 120), (160, 20, 20), (200, 200, 205), (20, 20, 25), (60, 110, 60)][
            rng.integers(5)
        ],
        30,
    )
    cv.paint(None, CAR, colour, body, shade=0.3)
    cab = _clip_box(h, w, ground - ch, ground - ch * 0.68, x - cw * 0.3, x + cw * 0.3)
    cv.paint(None, CAR, (40, 55, 70), cab)
    for wx in (x - cw * 0.3, x + cw * 0.3):  # wheels
        r = ch * 0.16
        wb = _clip_box(h, w, ground - 2 * r, ground + 1, wx - r, wx + r + 1)
        ys, xs = _grid(wb)
        m = (ys - (ground - r)) ** 2 + (xs - wx) ** 2 <= r * r
        cv.paint(m, CAR, (15, 15, 15), wb)


def _draw_person(cv: _Canvas, x: float, ground: int, size: float) -> None:
    h, w = cv.hw
    rng = cv.rng
    ph = size * rng.uniform(1.3, 1.8)
    pw = ph * 0.28
    box = _clip_box(h, w, ground - ph, ground, x - pw / 2, x + pw / 2 + 1)
    ys, xs = _grid(box)
    cy = ground - ph * 0.45
    body = ((ys - cy) / (ph * 0.4)) ** 2 + ((xs - x) / (pw / 2)) ** 2 <= 1
    head = (ys - (ground - ph * 0.9)) ** 2 + (xs - x) ** 2 <= (pw * 0.35) ** 2
    legs = (ys > cy) & (np.abs(xs - x) < pw * 0.3)
    cloth = _jitter(
        rng, [(180, 30, 60), (30, 30, 30), (60, 60, 160), (200, 160, 40)][rng.integers(4)], 30
    )
    cv.paint(body | legs, PERSON, cloth, box)
    cv.paint(head, PERSON, _jitter(rng, (210, 170, 140), 20), box)


def _draw_void(cv: _Canvas) -> None:
    """Ego-vehicle bonnet at the bottom and a few static/dynamic clutter boxes (all ignored)."""
    h, w = cv.hw
    rng = cv.rng
    yy, xx = np.ogrid[0:h, 0:w]
    hood = yy >= h * (1 - rng.uniform(0.04, 0.09)) + (h * 0.05) * ((xx - w / 2) / (w / 2)) ** 2
    cv.paint(hood, EGO, _jitter(rng, (30, 30, 35), 10))
    for _ in range(rng.integers(1, 4)):
        bh, bw = h * rng.uniform(0.02, 0.06), w * rng.uniform(0.01, 0.04)
        y0, x0 = rng.uniform(0.45, 0.85) * h, rng.uniform(0, 1) * w
        box = _clip_box(h, w, y0, y0 + bh, x0, x0 + bw)
        label = STATIC if rng.random() < 0.6 else DYNAMIC
        cv.paint(None, label, _jitter(rng, (130, 100, 80), 60), box)


def render_scene(
    height: int, width: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """One street scene: (image (H, W, 3) uint8 RGB, labelIds (H, W) uint8)."""
    h, w = height, width
    cv = _Canvas(np.zeros((h, w), np.uint8), np.zeros((h, w, 3), np.float32), rng)
    horizon = int(h * rng.uniform(0.36, 0.5))
    vx = w * rng.uniform(0.35, 0.65)
    walk_l, walk_r = _draw_ground(cv, horizon, vx)
    _draw_buildings(cv, horizon)

    # Objects stand on the ground; their size follows perspective (distance below the horizon).
    def scale(ground):
        return max(3.0, (ground - horizon) * 0.9)

    things = []
    for _ in range(rng.integers(2, 6)):
        things.append(("tree", rng.uniform(0.03, 0.2) * h))
    for _ in range(rng.integers(2, 6)):
        things.append(("pole", rng.uniform(0.03, 0.3) * h))
    for _ in range(rng.integers(1, 5)):
        things.append(("car", rng.uniform(0.04, 0.45) * h))
    for _ in range(rng.integers(1, 6)):
        things.append(("person", rng.uniform(0.04, 0.35) * h))
    things.sort(key=lambda t: t[1])  # far (small offset below horizon) first
    for kind, off in things:
        ground = min(h - 1, int(horizon + off))
        side = rng.random() < 0.5
        edge = walk_l[ground] if side else walk_r[ground]
        if kind == "car":
            x = vx + (edge - vx) * rng.uniform(0.2, 0.8)
            _draw_car(cv, x, ground, scale(ground))
        elif kind == "person":
            x = edge + (1 if side else -1) * rng.uniform(0.0, 0.1) * w
            _draw_person(cv, x, ground, scale(ground))
        elif kind == "pole":
            _draw_pole(cv, int(edge + (1 if side else -1) * 0.01 * w), ground, scale(ground))
        else:
            _draw_tree(
                cv,
                int(edge + (-1 if side else 1) * rng.uniform(0.0, 0.08) * w),
                ground,
                scale(ground),
            )
    _draw_void(cv)

    # Texture: per-class pixel noise plus low-frequency illumination; boundaries stay sharp.
    amp = np.zeros(256, np.float32)
    for k, v in _NOISE.items():
        amp[k] = v
    noise = rng.standard_normal((h, w), dtype=np.float32) * amp[cv.lab]
    light = 1.0 + 0.12 * _smooth_noise(rng, h, w, max(8, min(h, w) // 6))
    img = cv.col * (light * rng.uniform(0.75, 1.15))[..., None] + noise[..., None]
    return np.clip(img, 0, 255).astype(np.uint8), cv.lab


def _scene_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, _SPLIT_ID[split], index])


def _write_one(args) -> str:
    root, split, index, height, width, seed = args
    cities = CITIES[split]
    city = cities[index % len(cities)]
    stem = f"{city}_{index // len(cities):06d}_{19:06d}"
    img, lab = render_scene(height, width, _scene_rng(seed, split, index))
    for path, arr in (
        (image_path(root, split, city, stem), img),
        (label_path(root, split, city, stem), lab),
    ):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        Image.fromarray(arr).save(tmp, format="PNG")  # default zlib level, like the real dataset
        os.replace(tmp, path)
    return stem


def write_tree(
    out: str | Path,
    num_train: int = 60,
    num_val: int = 20,
    height: int = 256,
    width: int = 512,
    seed: int = 0,
    workers: int = 1,
    progress: bool = False,
) -> dict:
    """Write `num_train` + `num_val` scenes as a Cityscapes tree under `out`.

    Files are written under temporary names and renamed, so an interrupted run leaves only whole
    files. Returns {"train": n, "val": m}.
    """
    jobs = [
        (Path(out), split, i, height, width, seed)
        for split, n in (("train", num_train), ("val", num_val))
        for i in range(n)
    ]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(jobs), unit="img", desc="synth")
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            for _ in pool.map(_write_one, jobs, chunksize=4):
                bar and bar.update()
    else:
        for job in jobs:
            _write_one(job)
            bar and bar.update()
    if bar:
        bar.close()
    return {"train": num_train, "val": num_val}
