"""What an evaluation protocol is, without torch: test-time scales, mirroring and a sliding window
(`Augmentation`, `Window`) and the forward passes they make (`Pass`). `cadist.eval.tta` runs them;
job configs (`eval.scales`, `eval.flip`, `eval.window`, `eval.stride`), the CLI options of the
same names and `cadist report`'s labels parse and name them here, with the same errors."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from cadist.errors import ConfigError

CLI_NAMES = ("--scales", "--window", "--stride")
JOB_NAMES = ("eval.scales", "eval.window", "eval.stride")


@dataclass(frozen=True)
class Pass:
    """One forward of the augmentation: the input size it runs at, whether it is mirrored, and
    with a sliding window the crop size (tile_h, tile_w) and how many crops cover the input."""

    height: int
    width: int
    flip: bool
    tile: tuple[int, int] | None = None
    tiles: int = 1


@dataclass(frozen=True)
class Window:
    """Sliding-window inference: crops of height × width pixels, one every stride_h rows and
    stride_w columns (the last crop of a row or column ends at the image's edge)."""

    height: int
    width: int
    stride_h: int
    stride_w: int

    @classmethod
    def parse(
        cls,
        window: str,
        stride: str | None = None,
        names: tuple[str, str] = CLI_NAMES[1:],
    ) -> Window:
        """From "512x1024" (`--window`) and "341x683" (`--stride`; default two thirds of the window,
        as mmsegmentation's Cityscapes configs), with one clear error naming `names` (the options,
        or a job's keys)."""
        h, w = _pair(window, names[0], "512x1024")
        sh, sw = (
            _pair(stride, names[1], "341x683") if stride else (round(h * 2 / 3), round(w * 2 / 3))
        )
        if sh > h or sw > w:
            raise ConfigError(
                f"{names[1]} {sh}x{sw}: larger than the window {h}x{w}, so some pixels would have no "
                f"prediction; use a stride of at most the window, e.g. {round(h * 2 / 3)}x{round(w * 2 / 3)}"
            )
        return cls(h, w, sh, sw)

    def label(self) -> str:
        return f"{self.height}x{self.width}/{self.stride_h}x{self.stride_w}"


@dataclass(frozen=True)
class Augmentation:
    """Test-time scales (factors of the image's sides), whether each is also run mirrored, and
    an optional sliding window each pass runs in."""

    scales: tuple[float, ...] = (1.0,)
    flip: bool = False
    window: Window | None = None

    @classmethod
    def parse(
        cls,
        scales: str | Sequence[float] | float,
        flip: bool,
        window: str | None = None,
        stride: str | None = None,
        names: tuple[str, str, str] = CLI_NAMES,
    ) -> Augmentation:
        """From a comma list like "0.75,1,1.25" or a list of factors (`--scales`, `eval.scales`),
        the flip, and the window and stride ("512x1024", "341x683"), with one clear error naming
        `names` (the CLI's options, or a job's keys, `JOB_NAMES`)."""
        values = parse_scales(scales, names[0])
        if stride and not window:
            raise ConfigError(
                f"{names[2]} {stride}: goes with {names[1]} (e.g. {names[1]} 512x1024)"
            )
        return cls(values, bool(flip), Window.parse(window, stride, names[1:]) if window else None)

    @property
    def plain(self) -> bool:
        """The paper's single-scale protocol: one unmirrored pass of the whole image."""
        return self.scales == (1.0,) and not self.flip and self.window is None

    def label(self) -> str:
        """How `cadist report` names it: e.g. "TTA 0.75,1.0,1.25 flip slide 512x1024/341x683";
        "" for the plain protocol."""
        tta = ""
        if self.scales != (1.0,) or self.flip:
            tta = f"TTA {','.join(map(str, self.scales))}" + (" flip" if self.flip else "")
        slide = f"slide {self.window.label()}" if self.window else ""
        return " ".join(filter(None, [tta, slide]))


def parse_scales(
    scales: str | Sequence[float] | float, name: str = "--scales"
) -> tuple[float, ...]:
    """Factors > 0 from "0.75,1,1.25", a number or a list, else one error naming `name`."""
    try:
        if isinstance(scales, str):
            values = tuple(float(v) for v in scales.split(",") if v.strip())
        elif isinstance(scales, int | float) and not isinstance(scales, bool):
            values = (float(scales),)
        else:
            values = tuple(float(v) for v in scales if not isinstance(v, bool))
    except (TypeError, ValueError):
        values = ()
    if not values or not all(v > 0 and math.isfinite(v) for v in values):
        raise ConfigError(
            f"{name} {scales!r}: expected factors > 0 separated by commas, e.g. 0.75,1,1.25"
        )
    return values


def _pair(text: str, option: str, example: str) -> tuple[int, int]:
    parts = str(text).lower().split("x")
    try:
        h, w = (int(v) for v in parts)
    except ValueError:
        h = w = 0
    if h <= 0 or w <= 0:
        raise ConfigError(f"{option} {text!r}: expected HEIGHTxWIDTH in pixels, e.g. {example}")
    return h, w
