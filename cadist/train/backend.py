"""Ray Train's torch backend with one step first: every worker names the network interface of its
Ray node IP for gloo/NCCL (`cadist.cluster.network`) before the process group is created; and the
TorchTrainer cadist runs, which starts no Ray Data actor for a run that has no Ray Datasets."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import ray
from ray.train.torch import TorchConfig, TorchTrainer
from ray.train.torch.config import _TorchBackend
from ray.train.v2._internal.callbacks.datasets import DatasetsCallback

from cadist.cluster.network import choose_interface

log = logging.getLogger("cadist.train")


def _choose(configured: str | None, several_nodes: bool) -> dict:
    return choose_interface(ray.util.get_node_ip_address(), configured, several_nodes)


class _Backend(_TorchBackend):
    def on_start(self, worker_group, backend_config: CadistTorchConfig):
        nodes = set(worker_group.execute(ray.util.get_node_ip_address))
        picked = worker_group.execute(
            _choose, configured=backend_config.network_interface, several_nodes=len(nodes) > 1
        )
        for i, p in enumerate(picked):
            if p["warning"]:
                log.warning(f"[cadist] rank {i}: {p['warning']}")
        super().on_start(worker_group, backend_config)


@dataclass
class CadistTorchConfig(TorchConfig):
    """TorchConfig plus `network_interface` (None: the interface of each worker's node IP)."""

    network_interface: str | None = None

    @property
    def backend_cls(self):
        return _Backend


class CadistTrainer(TorchTrainer):
    """TorchTrainer whose runs without Ray Datasets (cadist streams its shards itself) leave out
    Ray Train's datasets callback: it starts a dataset-manager actor per worker-group start (a new
    Python process, ≈1.3 CPU-s) whatever the datasets, and sends each worker Ray Data's context."""

    def _create_default_callbacks(self):
        callbacks = super()._create_default_callbacks()
        if self.datasets:
            return callbacks
        return [c for c in callbacks if not isinstance(c, DatasetsCallback)]
