"""Cityscapes layout, generated scenes, shards and the streaming loader — on real tars."""

import json
import re
import shutil

import numpy as np
import pytest
import torch
from cityscapesscripts.helpers import labels as cs_labels
from click.testing import CliRunner
from PIL import Image

from cadist.cli import main
from cadist.data import cityscapes as cs
from cadist.data.manifest import read_manifest, verify_shards
from cadist.data.shards import build_shards
from cadist.data.stream import ShardStream, decode, iter_raw_samples, make_loader
from cadist.data.synthetic import render_scene, write_tree
from cadist.data.transforms import TrainTransform, normalized_input
from cadist.errors import DataError, ShardError

H, W = 64, 128


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("cs")
    write_tree(root, num_train=16, num_val=10, height=H, width=W, seed=3)
    return root


@pytest.fixture(scope="module")
def shards(tree, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    build_shards(tree, "train", out, samples_per_shard=2, workers=2, progress=False)
    build_shards(tree, "val", out, samples_per_shard=3, workers=1, progress=False)
    return out


def all_samples(root, split):
    samples, missing = cs.list_samples(root, split)
    assert not missing
    return samples


# -- labels -----------------------------------------------------------------------------------
def test_label_mapping_agrees_with_cityscapesscripts_for_every_id():
    lut = cs.label_lut()
    table = {lab.id: lab for lab in cs_labels.labels}
    for label_id in range(256):
        lab = table.get(label_id)
        expected = lab.trainId if lab is not None and 0 <= lab.trainId < 19 else 255
        assert lut[label_id] == expected, label_id
    assert cs.CLASS_NAMES[0] == "road" and cs.CLASS_NAMES[18] == "bicycle"
    assert sorted(v for v in cs.label_id_to_train_id().values() if v != 255) == list(range(19))
    # the method's table (§1.1) for a few ids
    assert (lut[7], lut[11], lut[23], lut[26], lut[33], lut[0], lut[29]) == (
        0,
        2,
        10,
        13,
        18,
        255,
        255,
    )


# -- generated scenes -------------------------------------------------------------------------
def test_synth_writes_cityscapes_layout_deterministically(tree, tmp_path):
    samples = all_samples(tree, "train")
    assert len(samples) == 16
    pat = re.compile(r"^[a-z]+_\d{6}_\d{6}$")
    for s in samples:
        assert pat.match(s.stem), s.stem
        assert s.image == tree / "leftImg8bit" / "train" / s.city / f"{s.stem}_leftImg8bit.png"
        assert s.label == tree / "gtFine" / "train" / s.city / f"{s.stem}_gtFine_labelIds.png"
        assert Image.open(s.image).mode == "RGB" and Image.open(s.label).mode == "L"
        assert Image.open(s.image).size == (W, H)
    again = tmp_path / "again"
    write_tree(again, num_train=2, num_val=0, height=H, width=W, seed=3)
    for s in all_samples(again, "train"):
        ref = tree / s.image.relative_to(again)
        assert np.array_equal(np.asarray(Image.open(s.image)), np.asarray(Image.open(ref)))
    other = render_scene(H, W, np.random.default_rng([4, 0, 0]))[0]
    assert not np.array_equal(other, np.asarray(Image.open(all_samples(again, "train")[0].image)))


def test_synth_scenes_hold_the_street_classes_void_and_edges():
    counts = np.zeros(256, np.int64)
    edges = []
    for i in range(8):
        img, lab = render_scene(256, 512, np.random.default_rng([0, 0, i]))
        counts += np.bincount(lab.ravel(), minlength=256)
        boundary = lab[:, 1:] != lab[:, :-1]
        step = np.abs(img[:, 1:].astype(int) - img[:, :-1].astype(int)).sum(-1)
        edges.append(step[boundary].mean() / max(1.0, step[~boundary].mean()))
    for name in (
        "road",
        "sidewalk",
        "building",
        "vegetation",
        "sky",
        "car",
        "person",
        "pole",
        "traffic sign",
    ):
        assert counts[cs_labels.name2label[name].id] > 0, name
    void = sum(counts[i] for i in range(256) if cs.label_lut()[i] == 255)
    assert 0.01 < void / counts.sum() < 0.3
    assert all(e > 3 for e in edges), edges  # colour steps are sharp at class boundaries


# -- shards -----------------------------------------------------------------------------------
def test_manifest_describes_the_shards(shards):
    m = read_manifest(shards / "train-manifest.json")
    assert m["num_samples"] == 16 and len(m["shards"]) == 8 and m["image_format"] == "jpeg"
    assert [e["name"] for e in m["shards"]] == [f"train-{i:06d}.tar" for i in range(8)]
    assert m["label_mapping"]["26"] == 13 and m["label_mapping"]["0"] == 255
    assert verify_shards(shards / "train-manifest.json") == []
    assert read_manifest(shards / "val-manifest.json")["image_format"] == "png"
    assert not list(shards.glob(".staging*")) and not list(shards.glob("*.tmp"))


def test_round_trip_keeps_labels_and_lossless_images_exactly(tree, shards):
    lut = cs.label_lut()
    sources = {s.stem: s for s in all_samples(tree, "val")}
    seen = set()
    for b in make_loader(ShardStream(shards / "val-manifest.json", train=False, batch_size=2)):
        for img, lab, key in zip(b["image"], b["label"], b["key"], strict=True):
            src = sources[key]
            ref_img = normalized_input(np.asarray(Image.open(src.image)))
            ref_lab = lut[np.asarray(Image.open(src.label))]
            assert torch.equal(img, ref_img)
            assert np.array_equal(lab.numpy(), ref_lab.astype(np.int64))
            seen.add(key)
    assert seen == set(sources)
    # JPEG training images: labels exact, images close
    sources = {s.stem: s for s in all_samples(tree, "train")}
    for raw in iter_raw_samples(str(shards / "train-000003.tar")):
        img, lab = decode(raw)
        src = sources[raw["__key__"]]
        assert np.array_equal(lab, lut[np.asarray(Image.open(src.label))])
        diff = np.abs(img.astype(int) - np.asarray(Image.open(src.image)).astype(int))
        assert diff.mean() < 3.5, diff.mean()  # q95 on noisy 64×128 textures; ≈1.5 at 1024×2048
        assert json.loads(raw["json"])["city"] == src.city


def test_train_stream_readers_are_disjoint_and_complete_2_ranks_x_2_workers(shards):
    all_keys = {s for s in _keys_of(shards, "train")}
    by_rank, shard_owner = [], {}
    for rank in range(2):
        stream = ShardStream(
            shards / "train-manifest.json",
            train=True,
            batch_size=1,
            rank=rank,
            world_size=2,
            num_workers=2,
            steps_per_epoch=40,
            transform=TrainTransform(32, 32),
            shuffle_buffer=2,
            seed=5,
        )
        keys = set()
        for i, b in enumerate(make_loader(stream)):
            keys.update(b["key"])
            for url in b["shard"]:
                owner = (rank, i % 2)  # DataLoader hands out batches round robin over workers
                assert shard_owner.setdefault(url, owner) == owner, url
            assert b["image"].shape == (1, 3, 32, 32) and b["label"].dtype == torch.int64
        assert i + 1 == 40
        by_rank.append(keys)
    assert not by_rank[0] & by_rank[1]
    assert by_rank[0] | by_rank[1] == all_keys
    assert len(shard_owner) == 8 and len(set(shard_owner.values())) == 4


def _keys_of(out, split):
    keys = []
    for e in read_manifest(out / f"{split}-manifest.json")["shards"]:
        keys += [r["__key__"] for r in iter_raw_samples(str(out / e["name"]))]
    return keys


@pytest.mark.parametrize("per_shard", [1, 3, 10])
@pytest.mark.parametrize("workers", [0, 2])
def test_validation_reads_every_sample_once_with_3_ranks(tree, tmp_path, per_shard, workers):
    out = tmp_path / "v"
    build_shards(tree, "val", out, samples_per_shard=per_shard, workers=1, progress=False)
    keys = []
    for rank in range(3):
        s = ShardStream(
            out / "val-manifest.json",
            train=False,
            batch_size=2,
            rank=rank,
            world_size=3,
            num_workers=workers,
        )
        for b in make_loader(s):
            assert b["image"].shape[-2:] == (H, W)  # full resolution
            keys += b["key"]
    assert len(keys) == 10
    assert sorted(keys) == sorted(_keys_of(out, "val"))


def test_resumed_stream_continues_exactly(shards):
    def run(start, workers):
        s = ShardStream(
            shards / "train-manifest.json",
            train=True,
            batch_size=2,
            num_workers=workers,
            steps_per_epoch=6,
            transform=TrainTransform(32, 48),
            seed=1,
            epoch=2,
            start_batch=start,
        )
        return [b for b in make_loader(s)]

    for workers in (0, 2):
        full, tail = run(0, workers), run(4, workers)
        assert len(tail) == 2
        for a, b in zip(full[4:], tail, strict=True):
            assert a["key"] == b["key"]
            assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])


def test_augmentation_moves_image_and_label_together():
    rng = np.random.default_rng(0)
    lab = rng.integers(0, 19, (40, 60)).astype(np.uint8)
    palette = rng.integers(0, 256, (256, 3)).astype(np.uint8)
    img = palette[lab]
    t = TrainTransform(24, 24, jitter=0.0, flip_p=0.5)
    flips = 0
    for seed in range(20):
        x, y = t(img, lab, np.random.default_rng(seed))
        back = (
            x * torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
            + torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
        ) * 255
        assert torch.allclose(
            back.round(), torch.from_numpy(palette[y.numpy()]).permute(2, 0, 1).float(), atol=1e-3
        )
        # the crop is a window of the original label, possibly mirrored
        found = _find_window(lab, y.numpy())
        assert found is not None
        flips += found
    assert 3 < flips < 17


def _find_window(big, win):
    h, w = win.shape
    for flipped, cand in ((0, win), (1, win[:, ::-1])):
        for y in range(big.shape[0] - h + 1):
            for x in range(big.shape[1] - w + 1):
                if np.array_equal(big[y : y + h, x : x + w], cand):
                    return flipped
    return None


def test_colour_jitter_definitions():
    from cadist.data.transforms import adjust_brightness, adjust_contrast, adjust_saturation

    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (8, 8, 3)).astype(np.uint8)
    xf = x.astype(np.float64)
    grey = 0.299 * xf[..., 0] + 0.587 * xf[..., 1] + 0.114 * xf[..., 2]

    def run(fn, f):
        return np.asarray(fn(Image.fromarray(x), f)).astype(np.float64)

    assert np.abs(run(adjust_brightness, 0.5) - xf * 0.5).max() <= 1
    assert np.abs(run(adjust_brightness, 1.4) - np.clip(xf * 1.4, 0, 255)).max() <= 1
    assert np.abs(run(adjust_contrast, 0.0) - round(grey.mean())).max() <= 1
    assert np.abs(run(adjust_contrast, 0.5) - (0.5 * xf + 0.5 * grey.mean())).max() <= 1.5
    assert np.abs(run(adjust_saturation, 0.0) - grey[..., None]).max() <= 1
    assert np.array_equal(run(adjust_saturation, 1.0), xf)
    with pytest.raises(ValueError, match="smaller than the 768×768 crop"):
        TrainTransform()(
            np.zeros((64, 64, 3), np.uint8), np.zeros((64, 64), np.uint8), np.random.default_rng(0)
        )


def test_jitter_draws_all_three_factors_in_random_order():
    img = np.full((16, 16, 3), 100, np.uint8)
    img[:, :8, 0] = 200
    outs = {
        tuple(
            TrainTransform(16, 16, jitter=0.5, flip_p=0)(
                img, img[..., 0], np.random.default_rng(s)
            )[0][:, 0, 0].tolist()
        )
        for s in range(10)
    }
    assert len(outs) == 10  # different factors per draw


# -- errors -----------------------------------------------------------------------------------
def test_truncated_shard_names_the_shard(shards, tmp_path):
    src = shards / "val-000000.tar"
    data = src.read_bytes()
    for cut in (len(data) // 2, 700):  # inside a member / inside the first header
        bad = tmp_path / f"val-cut{cut}.tar"
        bad.write_bytes(data[:cut])
        with pytest.raises(ShardError, match=re.escape(str(bad))):
            list(make_loader(ShardStream(str(bad), train=False)))
        s = ShardStream([str(bad), str(shards / "val-000001.tar")], train=False, skip_bad=True)
        got = [k for b in make_loader(s) for k in b["key"]]
        assert len(got) >= 3 and s.skipped["shards"] + s.skipped["samples"] >= 1


def test_missing_label_and_unknown_id_name_the_file(tree, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tree, bad)
    s0, s1 = all_samples(bad, "val")[:2]
    s0.label.unlink()
    with pytest.raises(DataError, match=re.escape(str(s0.image)) + ".*has no label"):
        build_shards(bad, "val", tmp_path / "o1", progress=False)
    lab = np.asarray(Image.open(s1.label)).copy()
    lab[0, 0] = 200
    Image.fromarray(lab).save(s1.label)
    shutil.copy(tree / s0.label.relative_to(bad), s0.label)
    with pytest.raises(DataError, match=re.escape(str(s1.label)) + r".*unknown labelIds \[200\]"):
        build_shards(bad, "val", tmp_path / "o2", workers=2, progress=False)
    assert not (tmp_path / "o2" / "val-manifest.json").exists()
    assert not list((tmp_path / "o2").glob("*.tar")) and not list(
        (tmp_path / "o2").glob(".staging*")
    )
    m = build_shards(bad, "val", tmp_path / "o3", skip_bad=True, progress=False)
    assert m["num_skipped"] == 1 and m["num_samples"] == 9 and "200" in m["skipped"][0]
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(s1.label)
    with pytest.raises(DataError, match="label is 5×5 but its image"):
        build_shards(bad, "val", tmp_path / "o4", progress=False)
    s1.image.write_bytes(b"not a png")
    with pytest.raises(DataError, match=re.escape(str(s1.image)) + ": cannot read image"):
        build_shards(bad, "val", tmp_path / "o5", progress=False)


def test_overwrite_protection(tree, tmp_path):
    out = tmp_path / "o"
    build_shards(tree, "val", out, samples_per_shard=4, progress=False)
    before = (out / "val-000000.tar").read_bytes()
    with pytest.raises(ShardError, match="--overwrite"):
        build_shards(tree, "val", out, samples_per_shard=5, progress=False)
    assert (out / "val-000000.tar").read_bytes() == before
    m = build_shards(tree, "val", out, samples_per_shard=5, overwrite=True, progress=False)
    assert len(m["shards"]) == 2 and sorted(p.name for p in out.glob("val-*.tar")) == [
        "val-000000.tar",
        "val-000001.tar",
    ]
    r = CliRunner().invoke(
        main,
        ["shards", "build", "--cityscapes-root", str(tree), "--split", "val", "--out", str(out)],
    )
    assert r.exit_code == 2 and r.output.count("\n") == 1 and r.output.startswith("error: ")


def test_stream_start_up_errors(shards):
    with pytest.raises(ShardError, match="8 training shards for 3 ranks × 4 loader workers = 12"):
        ShardStream(
            shards / "train-manifest.json",
            train=True,
            steps_per_epoch=1,
            world_size=3,
            num_workers=4,
        )
    with pytest.raises(ShardError, match="pipe: commands are disabled"):
        ShardStream("pipe:cat x.tar", train=False)
    with pytest.raises(ShardError, match="scheme 'ftp' is not allowed"):
        ShardStream("ftp://host/x.tar", train=False)
    with pytest.raises(ShardError, match="no such manifest"):
        ShardStream(shards / "nope-manifest.json", train=False)
    with pytest.raises(ShardError, match=r"val-999999.tar: no such shard; build shards with"):
        list(make_loader(ShardStream(str(shards / "val-999999.tar"), train=False)))


def test_pipe_urls_run_only_with_opt_in(shards):
    url = f"pipe:cat {shards / 'val-000000.tar'}"
    keys = [
        k for b in make_loader(ShardStream(url, train=False, allow_pipe=True)) for k in b["key"]
    ]
    assert len(keys) == 3


def test_cli_synth_and_build(tmp_path):
    r = CliRunner().invoke(
        main,
        [
            "data",
            "synth",
            "--out",
            str(tmp_path / "t"),
            "--num-train",
            "3",
            "--num-val",
            "1",
            "--height",
            "64",
            "--width",
            "128",
        ],
    )
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(
        main,
        [
            "shards",
            "build",
            "--cityscapes-root",
            str(tmp_path / "t"),
            "--split",
            "train",
            "--out",
            str(tmp_path / "s"),
            "--samples-per-shard",
            "2",
            "--image-format",
            "png",
        ],
    )
    assert r.exit_code == 0, r.output
    m = read_manifest(tmp_path / "s" / "train-manifest.json")
    assert m["num_samples"] == 3 and m["image_format"] == "png"
    r = CliRunner().invoke(main, ["shards", "verify", str(tmp_path / "s" / "train-manifest.json")])
    assert r.exit_code == 0 and "all shards match" in r.output


@pytest.mark.parametrize("hw", [(32, 64), (64, 128), (96, 96), (256, 512)])
def test_synth_renders_any_seed_and_size(hw):
    for i in range(60):
        img, lab = render_scene(*hw, np.random.default_rng([i, 7]))
        assert img.shape == (*hw, 3) and lab.shape == hw and img.dtype == lab.dtype == np.uint8
        assert not cs.unknown_label_ids(lab)


def test_uint8_batches_normalise_to_the_float_batches(shards):
    from cadist.data.transforms import normalize_uint8

    def run(normalize):
        s = ShardStream(
            shards / "train-manifest.json",
            train=True,
            batch_size=3,
            steps_per_epoch=2,
            transform=TrainTransform(32, 64),
            seed=9,
            normalize=normalize,
        )
        return list(make_loader(s))

    for f, u in zip(run(True), run(False), strict=True):
        assert u["image"].dtype == torch.uint8 and u["image"].shape == (3, 3, 32, 64)
        assert torch.allclose(normalize_uint8(u["image"]), f["image"], atol=1e-6)
        assert torch.equal(u["label"], f["label"])
