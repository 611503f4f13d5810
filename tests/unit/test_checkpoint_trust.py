"""Nothing from the storage path runs code: DeepSpeed's checkpoint files are read tensor-only with
an allow-list (real DeepSpeed on the CPU), and a checkpoint folder is checked against the manifest
that committed it before anything in it is loaded."""

import json
import os
import pickle

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ..conftest import free_port
from .test_reshard import _model


class Planted:
    """What someone with write access to the storage path could put there: unpickling it runs
    code (here: creates a marker file)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _rank(rank, d, marker, port):
    from cadist.errors import CheckpointError
    from cadist.train.engine import make_engine

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0")  # fmt: skip
    dist.init_process_group("gloo", rank=0, world_size=1)

    def engine():
        m = _model()
        opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        return make_engine(m, opt, sched, {
            "train_batch_size": 2, "train_micro_batch_size_per_gpu": 2,
            "zero_optimization": {"stage": 1}, "zero_allow_untested_optimizer": True,
            "gradient_clipping": 0.0, "steps_per_print": 10**9,
        })  # fmt: skip

    e = engine()
    e.backward(e(torch.randn(2, 3, 9, 9)).square().mean())
    e.step()
    e.save_checkpoint(d, tag="state", client_state={"cadist": {"step": 1, "best_miou": 0.5}})
    # the real files load, ZeRO optimizer state (with its allow-listed DeepSpeed classes) included
    _, client = engine().load_checkpoint(d, tag="state")
    assert client["cadist"] == {"step": 1, "best_miou": 0.5}
    model_file = os.path.join(d, "state", "mp_rank_00_model_states.pt")
    optim_file = os.path.join(d, "state", "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    for target, content in (
        (model_file, pickle.dumps({"module": Planted(marker)})),  # a planted pickle
        (optim_file, pickle.dumps(Planted(marker))),
        (model_file, b""),  # 0 bytes
        (model_file, os.urandom(4096)),  # not a checkpoint at all
    ):
        saved = open(target, "rb").read()
        with open(target, "wb") as f:
            f.write(content)
        try:
            engine().load_checkpoint(d, tag="state")
            raise AssertionError(f"{target} with {content[:20]!r} loaded")
        except CheckpointError as exn:
            msg = str(exn)
            assert msg.startswith(f"{target}: refused to load") and "--restart" in msg, msg
        finally:
            with open(target, "wb") as f:
                f.write(saved)
    assert not os.path.exists(marker)
    dist.destroy_process_group()


def test_planted_pickle_in_deepspeed_state_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "ran"
    # the planted object does run code when unpickled the way DeepSpeed itself loads its files
    (tmp_path / "p.pt").write_bytes(pickle.dumps(Planted(str(marker))))
    with pytest.raises(RuntimeError, match="magic number"):  # after running the planted code
        torch.load(tmp_path / "p.pt", weights_only=False)
    assert marker.exists()
    marker.unlink()
    mp.spawn(_rank, args=(str(tmp_path / "ckpt"), str(marker), free_port()), nprocs=1)
    assert not marker.exists()


def test_manifest_names_what_differs(tmp_path):
    from cadist.train.checkpoint import MANIFEST, file_digests, verify

    d = tmp_path / "step_00000010"
    (d / "state").mkdir(parents=True)
    (d / "model.pt").write_bytes(b"weights")
    for r in (0, 1):
        (d / "state" / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt").write_bytes(b"o" * r)
    assert verify(d) == "it has no manifest.json (its save did not finish)"
    (d / MANIFEST).write_text(json.dumps({"format": 1, "files": file_digests(d)}))
    assert verify(d) is None
    listed = json.loads((d / MANIFEST).read_text())["files"]
    assert sorted(listed) == ["model.pt", "state/zero_pp_rank_0_mp_rank_00_optim_states.pt",
                              "state/zero_pp_rank_1_mp_rank_00_optim_states.pt"]  # fmt: skip
    assert listed["model.pt"]["bytes"] == 7 and len(listed["model.pt"]["sha256"]) == 64
    (d / "model.pt").write_bytes(b"weightz")  # same size, other content
    (d / "state" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    (d / "state" / "extra.pt").write_bytes(b"x")
    assert verify(d) == (
        "missing state/zero_pp_rank_1_mp_rank_00_optim_states.pt; changed model.pt; "
        "not listed state/extra.pt"
    )
    (d / MANIFEST).write_text("[1]")
    assert verify(d) == "its manifest.json is not a cadist manifest"
