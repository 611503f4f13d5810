"""Per-image statistics of adaptive models: pooling masks, high-res fraction and MACs over an image
or a shard set (mean ± std), as `cadist macs` reports them."""

from __future__ import annotations

import functools
import statistics
from dataclasses import dataclass

import torch

from cadist.data.transforms import normalized_input
from cadist.nets.macs import count_adaptive


def _images(image: str | None, shards: str | None, limit: int | None):
    if image:
        from cadist.data.images import load_rgb

        yield load_rgb(image)
        return
    from cadist.data.stream import ShardStream, make_loader

    stream = ShardStream(shards, train=False, batch_size=1, normalize=False)
    for i, batch in enumerate(make_loader(stream)):
        if limit and i >= limit:
            return
        yield batch["image"][0].permute(1, 2, 0).numpy()


def count_images(
    model,
    name: str,
    mode: str,
    image: str | None = None,
    shards: str | None = None,
    limit: int | None = None,
    mask_file: str | None = None,
    size: tuple[int, int] | None = None,
) -> dict:
    """Mean and std over images of the high-res fraction and GMac (method's rules and computed).
    `mask_file`: this pooling mask (`.npy`) instead of the model's, for `image` or, without one,
    an input of `size` (H, W). The head counts as the model has it (dense or adaptive)."""
    from cadist.adaptive.head import AdaptiveDeepLabHead
    from cadist.adaptive.model import mask_from_file

    head = "adaptive" if isinstance(model.classifier, AdaptiveDeepLabHead) else "dense"
    rows = []
    if mask_file is not None and image is None and size is not None:  # no image: the mask alone
        mask = mask_from_file(model, mask_file, *size)
        rows.append(count_adaptive(name, mask, *size, mode, head=head))
    images = _images(image, shards, limit) if not rows else []
    for img in images:
        x = normalized_input(img).unsqueeze(0)
        if mask_file is not None:
            mask = mask_from_file(model, mask_file, x.shape[2], x.shape[3])
        else:
            mask = model.make_mask(x)
        rows.append(count_adaptive(name, mask, x.shape[2], x.shape[3], mode, head=head))
    if not rows:
        raise ValueError("no images to count")
    out = {
        "model": name,
        "adaptive_mode": mode,
        "num_images": len(rows),
        "input_hw": rows[0]["input_hw"],
        "head": head,
    }
    for key in ("edge_gmac", "mask_estimator_gmac"):  # edge-mask / learned-mask models
        if key in rows[0]:
            out[key] = rows[0][key]
    for key in (
        "high_res_fraction",
        "head_gmac",
        "backbone_gmac",
        "backbone_gmac_actual",
        "total_gmac",
        "total_gmac_actual",
    ):
        vals = [r[key] for r in rows]
        out[key] = statistics.fmean(vals)
        out[key + "_std"] = statistics.pstdev(vals) if len(vals) > 1 else 0.0
    return out


@dataclass(frozen=True)
class MacLine:
    """Backbone GMac as a function of the high-res fraction p for one input size: every count of
    the method is linear in the number of elements per level, so two counts (p = 0 and p = 1)
    give the line exactly: gmac(p) = low + (high − low)·p."""

    low: float
    high: float
    low_actual: float
    high_actual: float
    head_gmac: float  # the head at p = 0 (the dense head: at every p)
    head_high: float | None = None  # the adaptive head at p = 1 (its count is linear in p too)

    def backbone(self, p: float, actual: bool = False) -> float:
        lo, hi = (self.low_actual, self.high_actual) if actual else (self.low, self.high)
        return lo + (hi - lo) * p

    def head(self, p: float) -> float:
        if self.head_high is None:
            return self.head_gmac
        return self.head_gmac + (self.head_high - self.head_gmac) * p


@functools.lru_cache(maxsize=32)
def mac_line(name: str, mode: str, height: int, width: int, head: str = "dense") -> MacLine:
    from cadist.adaptive.resnet import MODES

    finest = MODES[mode][0]
    low_value = 2 if mode == "os8to32" else 1
    h0, w0 = height // finest, width // finest
    low = torch.full((1, h0, w0), low_value, dtype=torch.long)
    lo = count_adaptive(name, low, height, width, mode, head=head)
    hi = count_adaptive(name, torch.zeros_like(low), height, width, mode, head=head)
    return MacLine(
        lo["backbone_gmac"],
        hi["backbone_gmac"],
        lo["backbone_gmac_actual"],
        hi["backbone_gmac_actual"],
        lo["head_gmac"],
        hi["head_gmac"] if head == "adaptive" else None,
    )
