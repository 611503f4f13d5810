"""Registered cadist models as MLflow pyfunc models: `mlflow.pyfunc.load_model("models:/<name>/<v>")`
and `mlflow models serve` predict Cityscapes class maps for RGB images.

`cadist.tracking.runs.register_best` writes each registered version as an MLflow model whose
`loader_module` is this module: MLflow imports it by name and calls `_load_pyfunc(data_path)`. Only
numpy, torch and cadist here; the weights are read with `weights_only=True` like every cadist load.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cadist.errors import CheckpointError, DataError


class SegmentationModel:
    """A cadist export rebuilt for inference (the model and mask options it records, BatchNorm
    folded; learned-mask models as their inference network)."""

    def __init__(self, weights: str | Path, device: str = "cpu"):
        from cadist.config.schema import ModelConfig
        from cadist.nets.build import build_model
        from cadist.nets.fold import fold_batchnorm
        from cadist.nets.weights import load_weights
        from cadist.tracking.sources import recorded_model

        weights = Path(weights)
        name, section = recorded_model(weights)
        if not name:
            raise CheckpointError(
                f"{weights}: not a cadist export (it records no model); register weights written "
                "by cadist training (checkpoints/best.pt of a run)"
            )
        known = {k: v for k, v in section.items() if k in ModelConfig.model_fields}
        cfg = ModelConfig.model_validate(known | {"name": name, "weights": None})
        torch.manual_seed(0)  # learned masks draw Gumbel noise (§7.2): the same on every load
        net = build_model(**cfg.build_kwargs(), network="inference")
        load_weights(net, weights, expect_name=name)
        self.name, self.device = name, torch.device(device)
        self.net = fold_batchnorm(net).to(self.device)

    @torch.no_grad()
    def predict(self, model_input, params: dict | None = None) -> np.ndarray:
        """(B, H, W) uint8 trainIds (0–18) for RGB images as (B, H, W, 3) or one (H, W, 3), values
        0–255 (uint8, or integers as JSON delivers them)."""
        from cadist.data.transforms import normalize_batch

        if isinstance(model_input, dict) and len(model_input) == 1:  # one named input
            (model_input,) = model_input.values()
        x = np.asarray(model_input)
        if x.ndim == 3:
            x = x[None]
        if x.ndim != 4 or x.shape[-1] != 3:
            raise DataError(
                f"{self.name}: expected RGB images shaped (B, H, W, 3) or (H, W, 3), got "
                f"{x.shape}; send pixels as rows of [r, g, b] values 0–255"
            )
        if x.dtype != np.uint8:
            if x.size and (x.min() < 0 or x.max() > 255):
                raise DataError(f"{self.name}: pixel values must lie in 0–255")
            x = x.astype(np.uint8)
        batch = normalize_batch(list(x)).to(self.device)
        return self.net(batch).argmax(1).to(torch.uint8).cpu().numpy()


def _load_pyfunc(data_path: str) -> SegmentationModel:
    """MLflow's hook: `data_path` is the model's copy of the export (`data/model.pt`)."""
    p = Path(data_path)
    return SegmentationModel(p / "model.pt" if p.is_dir() else p)
