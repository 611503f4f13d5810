"""Learned-mask mode (method.md §7): a small CNN on the layer2 features decides, per 2×2 block of
OS8 cells, whether layer3/layer4 run at OS8 or OS16.

* Training network (§7.3, "dense simulation"): two dense copies of layer3+layer4 — OS8 ("high")
  and OS16 ("low") — share every convolution weight and every BN affine parameter but keep their
  own BN running statistics; the hard Gumbel sample of the mask selects per OS8 cell which branch's
  output the OS8 head sees. Loss: cross-entropy + (r − ρ)², r the low-res share of a second,
  independent hard sample (§7.4).
* Inference network (§7.5): the adaptive (irregular) backbone of §4.1 driven by the sampled mask,
  with the *low* branch's weights and running statistics (`inference_state`).

Parameter names follow the reference checkpoint (§7.6): `backbone.layer3_high_res.*`,
`backbone.layer3_low_res.*`, …, `backbone.mask_estimator.{0,2,5,7}.*`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from cadist.models.resnet import ResNet, ResNetSpec

Sampling = Literal["gumbel", "argmax"]


class MaskEstimator(nn.Sequential):
    """(B, C, H/8, W/8) layer2 features → (B, 2, H/16, W/16) logits; channel 0 = keep OS8,
    channel 1 = downsample to OS16 (§7.1). Indices 0, 2, 5, 7 are the convolutions."""

    def __init__(self, cin: int):
        super().__init__(
            nn.Conv2d(cin, 128, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(128, 64, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2, 2),
            nn.Conv2d(64, 64, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(64, 2, 3, padding=1),
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):  # biases keep PyTorch's default init (§7.1)
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


def sample_mask(z: torch.Tensor, tau: float = 1.0, sampling: Sampling = "gumbel") -> torch.Tensor:
    """(B, 2, h, w) logits → hard one-hot sample (float32) whose gradient is that of the soft
    sample softmax((z + g)/τ) (straight-through, §7.2). "argmax": no noise, no gradient."""
    if sampling == "argmax":
        return F.one_hot(z.argmax(1), 2).permute(0, 3, 1, 2).float()
    g = -torch.empty(z.shape, dtype=torch.float32, device=z.device).exponential_().log()
    soft = torch.softmax((z.float() + g) / tau, dim=1)
    hard = torch.zeros_like(soft).scatter_(1, soft.argmax(1, keepdim=True), 1.0)
    return hard - soft.detach() + soft


def up2(x: torch.Tensor) -> torch.Tensor:
    """Replicate every cell to a 2×2 block (OS16 → OS8)."""
    return x.repeat_interleave(2, -2).repeat_interleave(2, -1)


def pooling_mask(m: torch.Tensor) -> torch.Tensor:
    """(B, 2, h, w) hard sample → (B, 2h, 2w) int64 pooling mask on the OS8 grid (1 = OS16)."""
    return up2(m[:, 1].detach()).round().long()


def tie_parameters(src: nn.Module, dst: nn.Module) -> None:
    """Make every parameter of `dst` the very same tensor as `src`'s (same structure); buffers
    (BN running statistics) stay separate."""
    for (name_s, ms), (name_d, md) in zip(src.named_modules(), dst.named_modules(), strict=True):
        assert name_s == name_d and type(ms) is type(md), f"{name_s} vs {name_d}"
        for pname in list(md._parameters):
            md._parameters[pname] = ms._parameters[pname]


class LearnedResNet(nn.Module):
    """Training backbone (§7.3): (B, 3, H, W) → OS8 features of the mixed branches, plus the mask
    logits z and the hard sample m used for the mixing (set on `last_logits`, `last_sample`)."""

    def __init__(self, spec: ResNetSpec, tau: float = 1.0, sampling: Sampling = "gumbel"):
        super().__init__()
        hi, lo = ResNet(spec, 8), ResNet(spec, 16)
        self.spec, self.tau, self.eval_sampling = spec, tau, sampling
        self.conv1, self.bn1, self.relu, self.maxpool = hi.conv1, hi.bn1, hi.relu, hi.maxpool
        self.layer1, self.layer2 = hi.layer1, hi.layer2
        self.layer3_high_res, self.layer4_high_res = hi.layer3, hi.layer4
        self.layer3_low_res, self.layer4_low_res = lo.layer3, lo.layer4
        tie_parameters(self.layer3_high_res, self.layer3_low_res)
        tie_parameters(self.layer4_high_res, self.layer4_low_res)
        self.mask_estimator = MaskEstimator(spec.layer2_channels)

    def sample(self, z: torch.Tensor) -> torch.Tensor:
        return sample_mask(z, self.tau, "gumbel" if self.training else self.eval_sampling)

    def branches(
        self, x: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(high branch at OS8, low branch at OS16, hard sample m (B, 2, H/16, W/16)); `mask`
        (B, H/16, W/16) in {0, 1} replaces the sample (1 = low branch), for tests."""
        f = self.layer2(self.layer1(self.maxpool(self.relu(self.bn1(self.conv1(x))))))
        z = self.mask_estimator(f)
        if mask is None:
            m = self.sample(z)
        else:
            m = F.one_hot(mask.long(), 2).permute(0, 3, 1, 2).to(f.dtype)
        hi = self.layer4_high_res(self.layer3_high_res(f))
        lo = self.layer4_low_res(self.layer3_low_res(f))
        if hi.shape[-2:] != up2(lo).shape[-2:]:
            raise ValueError(
                f"input {tuple(x.shape[-2:])}: the learned-mask network needs H and W divisible "
                "by 16 (OS16 branch and 2×2 mask blocks)"
            )
        self.last_logits, self.last_sample = z, m
        return hi, lo, m

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The mixed OS8 features the dense head sees; `mask` as in `branches`."""
        hi, lo, m = self.branches(x, mask)
        m8 = up2(m).to(hi.dtype)
        return m8[:, :1] * hi + m8[:, 1:] * up2(lo)


class LearnedDeepLabV3(nn.Module):
    """Training network of the learned mode: (B, 3, H, W) → logits; after each forward
    `aux_loss` holds the ratio term (r − ρ)² (§7.4) and `last_mask` the (B, H/8, W/8) pooling mask
    (1 = OS16) that selected the branches."""

    def __init__(
        self,
        backbone: LearnedResNet,
        classifier: nn.Module,
        target_low_res: float = 0.3,
        head: str = "dense",
    ):
        super().__init__()
        self.backbone, self.classifier = backbone, classifier
        self.target_low_res = target_low_res
        self.head = head
        self.aux_loss: torch.Tensor | None = None
        self.last_mask: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.head == "adaptive":
            return self._adaptive_head(x, mask)
        feats = self.backbone(x, mask)
        logits = self.classifier(feats)
        self._ratio_term()
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)

    def _adaptive_head(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Dense simulation of the adaptive head (as §7.3 simulates the backbone): the head at OS8
        on the high branch, the same head at OS16 (`dense_head_at`) on the low branch, each
        upsampled to the input size, mixed per pixel by the sample of its OS8 cell's block."""
        from cadist.adaptive.head import dense_head_at

        hi, lo, m = self.backbone.branches(x, mask)
        size = x.shape[-2:]
        up = [F.interpolate(y, size=size, mode="bilinear", align_corners=False)
              for y in (self.classifier(hi), dense_head_at(self.classifier, lo, 2))]  # fmt: skip
        mf = F.interpolate(m.to(up[0].dtype), size=size, mode="nearest")
        self._ratio_term()
        return mf[:, :1] * up[0] + mf[:, 1:] * up[1]

    def _ratio_term(self) -> None:
        z = self.backbone.last_logits
        r = sample_mask(z, self.backbone.tau)[:, 1].mean()  # a second, independent draw
        self.aux_loss = (r - self.target_low_res) ** 2
        self.last_mask = pooling_mask(self.backbone.last_sample)


# -- checkpoint layouts ------------------------------------------------------------------------
_BRANCH = re.compile(r"^backbone\.(layer[34])_(high|low)_res\.(.*)$")


def is_training_layout(sd: Mapping[str, torch.Tensor]) -> bool:
    return any(_BRANCH.match(k) for k in sd)


def without_leftovers(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop `backbone.fc.*`, the unused ImageNet classifier the reference checkpoint carries."""
    return {k: v for k, v in sd.items() if not k.startswith("backbone.fc.")}


def inference_state(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Training-network state dict → the inference network's (§7.5): the low branch becomes the
    adaptive layer3/layer4 (weights and running statistics), the high branch is dropped."""
    out = {}
    for k, v in without_leftovers(sd).items():
        m = _BRANCH.match(k)
        if m is None:
            out[k] = v
        elif m.group(2) == "low":
            out[f"backbone.{m.group(1)}.{m.group(3)}"] = v
    return out


def expand_imagenet(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An ImageNet ResNet backbone state dict (layer3.*, layer4.*) → both branches' names."""
    out = {}
    for k, v in sd.items():
        m = re.match(r"^(layer[34])\.(.*)$", k)
        if m is None:
            out[k] = v
            continue
        for branch in ("high", "low"):
            out[f"{m.group(1)}_{branch}_res.{m.group(2)}"] = v
    return out
