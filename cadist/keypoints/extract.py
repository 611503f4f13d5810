"""Keypoints and descriptors of one image (method.md §11.2, §11.3, §11.5): preprocessing, SIFT
keypoints (top 512 unique pixels), dense or adaptive D2-Net features, nearest-cell sampling."""

from __future__ import annotations

import functools
import hashlib
from collections import OrderedDict
from dataclasses import dataclass

import cv2
import numpy as np
import torch

from cadist.keypoints.d2net import APD2Net, D2NetDense, count_gmac
from cadist.keypoints.masks import keypoint_mask

CAFFE_MEANS = np.array([103.939, 116.779, 123.68], np.float32)  # B, G, R
MAX_KEYPOINTS = 512


@dataclass
class Prepared:
    """Network input (1, 3, h, w) caffe-normalised BGR, and original/resized scale per axis."""

    x: torch.Tensor
    scale_x: float
    scale_y: float


def preprocess(rgb: np.ndarray) -> Prepared:
    """(H, W, 3) uint8 RGB (grey images: replicate to 3 channels first) → network input (§11.2):
    sides summing to more than 2800 scaled down, each side of the *original* that is not a
    multiple of 8 truncated to one, area resizing, caffe normalisation."""
    h, w = rgb.shape[:2]
    th, tw = h, w
    if h + w > 2800:
        f = 2800 / (h + w)
        th, tw = int(h * f), int(w * f)
    if h % 8:
        th = th // 8 * 8
    if w % 8:
        tw = tw // 8 * 8
    img = rgb if (th, tw) == (h, w) else cv2.resize(rgb, (tw, th), interpolation=cv2.INTER_AREA)
    bgr = img[..., ::-1].astype(np.float32) - CAFFE_MEANS
    x = torch.from_numpy(np.ascontiguousarray(bgr.transpose(2, 0, 1)))[None]
    return Prepared(x, w / tw, h / th)


def sift_keypoints(x: torch.Tensor, limit: int = MAX_KEYPOINTS) -> np.ndarray:
    """(K, 2) int [x, y] keypoint pixels of the network input, in row-major order (§11.3):
    the grey image is rebuilt from the BGR input as 0.299·B + 0.587·G + 0.114·R (the reference's
    quirk), OpenCV SIFT with default parameters, strongest first, one per pixel, at most `limit`."""
    bgr = x[0].permute(1, 2, 0).cpu().numpy() + CAFFE_MEANS
    grey = (0.299 * bgr[..., 0] + 0.587 * bgr[..., 1] + 0.114 * bgr[..., 2]).astype(np.uint8)
    kps = sorted(cv2.SIFT_create().detect(grey, None), key=lambda k: -k.response)
    taken: list[tuple[int, int]] = []
    seen = set()
    for kp in kps:
        px = (int(np.round(kp.pt[0])), int(np.round(kp.pt[1])))
        if px in seen:
            continue
        seen.add(px)
        taken.append(px)
        if len(taken) == limit:
            break
    taken.sort(key=lambda p: (p[1], p[0]))
    return np.array(taken, np.int64).reshape(-1, 2)


def sample(features: torch.Tensor, points: np.ndarray, height: int, width: int) -> np.ndarray:
    """(C, Hf, Wf) features at (K, 2) [x, y] pixels of an H×W input: the nearest cell with the
    corner-aligned mapping of §11.5, raw values (no normalisation) → (K, C) float32."""
    c, hf, wf = features.shape
    rows = np.round(points[:, 1] * (hf - 1) / max(height - 1, 1)).astype(np.int64)
    cols = np.round(points[:, 0] * (wf - 1) / max(width - 1, 1)).astype(np.int64)
    return features[:, rows, cols].T.float().cpu().numpy()


@dataclass(frozen=True)
class Method:
    """A descriptor network: dense D2-Net at `output_stride`, or APD2Net at `start_stride` with
    window sizes `windows` (§11.4)."""

    network: str = "d2net"  # d2net | apd2net
    output_stride: int = 4
    start_stride: int = 4
    windows: tuple[int, ...] = (11,)

    @classmethod
    def from_name(cls, name: str) -> Method:
        """The inverse of `name`: `d2net_os4`, `apd2net_s2_21-21`, `apd2net_s1_25-51-51`."""
        try:
            if name.startswith("d2net_os"):
                return cls("d2net", output_stride=int(name.removeprefix("d2net_os")))
            if name.startswith("apd2net_s"):
                stride, windows = name.removeprefix("apd2net_s").split("_", 1)
                return cls("apd2net", start_stride=int(stride),
                           windows=tuple(int(w) for w in windows.split("-")))  # fmt: skip
        except ValueError:
            pass
        raise ValueError(
            f"method {name!r}: expected d2net_os<1|2|4|8> or apd2net_s<1|2|4>_<d0>-<d1>-…, "
            f"e.g. d2net_os4 or apd2net_s2_21-21"
        )

    @property
    def name(self) -> str:
        if self.network == "d2net":
            return f"d2net_os{self.output_stride}"
        return f"apd2net_s{self.start_stride}_" + "-".join(map(str, self.windows))

    def build(self) -> torch.nn.Module:
        if self.network == "d2net":
            return D2NetDense(self.output_stride)
        if self.network == "apd2net":
            return APD2Net(self.start_stride)
        raise ValueError(f"network {self.network!r}: expected d2net or apd2net")


_SIFT_CACHE: OrderedDict[bytes, np.ndarray] = OrderedDict()


def _keypoints_of(x: torch.Tensor, keep: int = 1024) -> np.ndarray:
    """`sift_keypoints` remembered by the input's content for the last `keep` images: every
    method of a table uses the same SIFT keypoints of the same image (§13.3), computed once."""
    key = hashlib.sha1(x.numpy().tobytes()).digest() + bytes(str(tuple(x.shape)), "ascii")
    if key in _SIFT_CACHE:
        _SIFT_CACHE.move_to_end(key)
        return _SIFT_CACHE[key]
    pts = sift_keypoints(x)
    _SIFT_CACHE[key] = pts
    while len(_SIFT_CACHE) > keep:
        _SIFT_CACHE.popitem(last=False)
    return pts


@functools.lru_cache(maxsize=64)
def _dense_gmac(stride: int, height: int, width: int) -> float:
    return count_gmac("d2net", stride, height, width)


@torch.no_grad()
def describe(net: torch.nn.Module, method: Method, rgb: np.ndarray, device="cpu") -> dict:
    """{keypoints (K, 3) [x, y, 1] in original pixels, scores (K,), descriptors (K, 512), gmac
    (the network's multiply-adds for this image, §10.2), high_res_fraction (adaptive only)}."""
    prep = preprocess(rgb)
    h, w = prep.x.shape[-2:]
    pts = _keypoints_of(prep.x)
    x = prep.x.to(device)
    out = {}
    if isinstance(net, APD2Net):
        mask = keypoint_mask(torch.from_numpy(pts), h, w, method.start_stride, method.windows)
        feats = net(x, mask[None].to(device))[0]
        out["high_res_fraction"] = float((mask == 0).float().mean())
        out["gmac"] = count_gmac("apd2net", method.start_stride, h, w, mask[None])
    else:
        feats = net(x)[0]
        out["gmac"] = _dense_gmac(method.output_stride, h, w)
    desc = sample(feats, pts, h, w)
    kp = np.ones((len(pts), 3), np.float32)
    kp[:, 0] = pts[:, 0] * prep.scale_x
    kp[:, 1] = pts[:, 1] * prep.scale_y
    return out | {
        "keypoints": kp,
        "scores": np.ones(len(pts), np.float32),
        "descriptors": desc.astype(np.float32),
    }
