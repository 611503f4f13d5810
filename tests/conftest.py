import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")


def tiny_shards(root, num_train: int = 8, num_val: int = 2, seed: int = 3):
    """Generated 64×128 Cityscapes-format scenes as WebDataset shards of 2 samples under `root`;
    returns the (train, val) manifest paths."""
    from cadist.data.shards import build_shards
    from cadist.data.synthetic import write_tree

    write_tree(root / "cs", num_train=num_train, num_val=num_val, height=64, width=128, seed=seed)
    for split in ("train", "val"):
        build_shards(root / "cs", split, root / "shards", samples_per_shard=2, progress=False)
    return root / "shards" / "train-manifest.json", root / "shards" / "val-manifest.json"


def registered_checkpoint(run_dir) -> bool:
    """Whether Ray Train has registered a checkpoint of the run in `run_dir` (a folder on disk may
    not be registered yet; a crash then restarts from the one before)."""
    snap = run_dir / "checkpoint_manager_snapshot.json"
    try:
        return snap.is_file() and "checkpoint_dir_name" in snap.read_text()
    except OSError:
        return False
