"""Training checkpoints: what every rank writes, the manifest that commits them, and the resume.

A checkpoint is Ray Train's folder `step_<n>/` on the storage path: DeepSpeed's state under `state/`,
each rank's RNG and node, rank 0's `model.pt` export. Once every rank has uploaded its part, rank 0
writes `manifest.json` (the sha256 and size of every file) last: a folder without it is not
committed. A resume verifies the manifest before loading anything; a checkpoint that does not match
it is skipped, with a warning naming what differed, for the newest earlier one that does. The files
themselves are read tensor-only (`engine.load_state_file`): the storage path is shared, and whoever
can write there must not be able to run code in the workers.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import socket
import tempfile
from pathlib import Path

import numpy as np
import ray.train
import torch
import torch.distributed as dist

from cadist.config.schema import JobConfig
from cadist.data.shards import sha256_file
from cadist.errors import CheckpointError
from cadist.nets.weights import save_weights
from cadist.redact import redact
from cadist.storage.store import Storage
from cadist.train.engine import load_resharded
from cadist.train.loop import rng_state, set_rng_state
from cadist.train.resume import zero_world

CKPT_TAG = "state"
MANIFEST = "manifest.json"
log = logging.getLogger("cadist.train")


def recorded(job: JobConfig) -> dict:
    """What an export records of its model, for predict, eval and serving to rebuild it
    (credentials in its values shown as ***, see `cadist.redact`)."""
    return {
        "model": job.model.name,
        "model_config": redact(job.model.model_dump()),
        "output_stride": job.model.output_stride,
    }


def file_digests(folder: str | Path) -> dict[str, dict]:
    """{relative path: {"sha256", "bytes"}} of every file under `folder` but the manifest."""
    root = Path(folder)
    return {
        p.relative_to(root).as_posix(): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.relative_to(root).as_posix() != MANIFEST
    }


def verify(folder: str | Path) -> str | None:
    """None where the checkpoint folder matches its manifest, else what differs (one line)."""
    root = Path(folder)
    try:
        listed = json.loads((root / MANIFEST).read_text())["files"]
    except FileNotFoundError:
        return f"it has no {MANIFEST} (its save did not finish)"
    except (ValueError, KeyError, TypeError):
        return f"its {MANIFEST} is not a cadist manifest"
    found = file_digests(root)
    missing = sorted(set(listed) - set(found))
    extra = sorted(set(found) - set(listed))
    changed = sorted(k for k in set(listed) & set(found) if listed[k] != found[k])
    parts = [
        f"{what} {', '.join(names[:4])}{' …' if len(names) > 4 else ''}"
        for what, names in (("missing", missing), ("changed", changed), ("not listed", extra))
        if names
    ]
    return "; ".join(parts) or None


def save_checkpoint(engine, job: JobConfig, state: dict, rank: int, metrics: dict) -> None:
    """Every rank writes its part (DeepSpeed state, its RNG); Ray merges them into one checkpoint.
    Its `model.pt` records the model like an export, so `cadist predict --ckpt <step folder>` needs
    no --model. Rank 0 then commits it with the manifest."""
    name = f"step_{state['step']:08d}"
    with tempfile.TemporaryDirectory() as d:
        engine.save_checkpoint(d, tag=CKPT_TAG, client_state={"cadist": dict(state)})
        (Path(d) / f"rng_rank{rank}.json").write_text(json.dumps(_rng_to_json(rng_state())))
        # where this rank ran: which node, and the interface its process group used
        where = {"rank": rank, "node_ip": ray.util.get_node_ip_address(),
                 "hostname": socket.gethostname(),
                 "interface": os.environ.get("GLOO_SOCKET_IFNAME")}  # fmt: skip
        (Path(d) / f"node_rank{rank}.json").write_text(json.dumps(where))
        if rank == 0:
            save_weights(engine.module, Path(d) / "model.pt", **recorded(job), step=state["step"])
        parts = [file_digests(d)]
        if dist.is_initialized() and dist.get_world_size() > 1:
            parts = [None] * dist.get_world_size()
            dist.all_gather_object(parts, file_digests(d))
        ray.train.report(
            metrics, checkpoint=ray.train.Checkpoint.from_directory(d), checkpoint_dir_name=name
        )
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()  # every rank's upload is done
    if rank == 0:
        files: dict[str, dict] = {}
        for r, part in enumerate(parts):
            for k, v in part.items():
                if files.setdefault(k, v) != v:
                    raise CheckpointError(f"{name}: ranks wrote different files {k} (rank {r})")
        manifest = {"format": 1, "step": state["step"], "world": len(parts), "files": files}
        Storage(job.cluster.storage_path).write_json(f"{job.name}/{name}/{MANIFEST}", manifest)


def _candidates(ckpt, job: JobConfig):
    """Ray Train's checkpoint to resume from, then the earlier committed ones, newest first."""
    yield ckpt
    step = int(posixpath.basename(ckpt.path.rstrip("/"))[5:])
    parent = posixpath.dirname(ckpt.path.rstrip("/"))
    for s, key in reversed(Storage(job.cluster.storage_path).checkpoints(job.name)):
        if s < step:
            yield ray.train.Checkpoint(
                path=posixpath.join(parent, posixpath.basename(key)), filesystem=ckpt.filesystem
            )


def restore_checkpoint(engine, job: JobConfig, rank: int) -> dict | None:
    """Load the newest checkpoint that matches its manifest; None where the run starts afresh."""
    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return None
    skipped = []
    for c in _candidates(ckpt, job):
        with c.as_directory() as d:
            problem = verify(d)
            if problem is None:
                step = _agree(c.path)
                if skipped and rank == 0:
                    log.warning("cadist: resuming from %s instead: %s", c.path, "; ".join(skipped))
                return _load(engine, d, rank, step)
        skipped.append(f"{c.path} does not match its manifest ({problem})")
    if all(MANIFEST in s and "save did not finish" in s for s in skipped):
        if rank == 0:  # nothing was committed: as if no checkpoint had been reported
            log.warning("cadist: starting over: %s", "; ".join(skipped))
        return None
    raise CheckpointError(
        f"job {job.name}: no checkpoint to resume from matches its manifest: "
        f"{'; '.join(skipped)}; remove the damaged checkpoint folders or rerun with --restart "
        f"to start over"
    )


def _agree(path: str) -> str:
    """Every rank resumes from the same checkpoint (each verified its own download)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        paths = [None] * dist.get_world_size()
        dist.all_gather_object(paths, path)
        if len(set(paths)) > 1:
            raise CheckpointError(
                f"ranks found different checkpoints intact ({', '.join(sorted(set(paths)))}): "
                f"the storage path changed during the resume; rerun"
            )
    return path


def _load(engine, d: str, rank: int, where: str) -> dict:
    saved_world = zero_world(Path(d))  # ZeRO 1/2 optimizer state split over that many ranks
    if saved_world and saved_world != dist.get_world_size():
        client = load_resharded(engine, d, CKPT_TAG, saved_world)
    else:
        _, client = engine.load_checkpoint(d, tag=CKPT_TAG)
    if client is None or "cadist" not in client:
        raise CheckpointError(f"{where}: DeepSpeed state without cadist's training state")
    rng = Path(d) / f"rng_rank{rank}.json"
    if rng.exists():
        set_rng_state(_rng_from_json(json.loads(rng.read_text())))
    return client["cadist"]


def _rng_to_json(state: dict) -> dict:
    np_state = state["numpy"]
    return {
        "python": [state["python"][0], list(state["python"][1]), state["python"][2]],
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": state["torch"].tolist(),
    }


def _rng_from_json(d: dict) -> dict:
    py = d["python"]
    return {
        "python": (py[0], tuple(py[1]), py[2]),
        "numpy": (d["numpy"][0], np.array(d["numpy"][1], dtype=np.uint32), *d["numpy"][2:]),
        "torch": torch.tensor(d["torch"], dtype=torch.uint8),
    }
