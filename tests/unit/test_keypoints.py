"""Keypoints (method §11, §12): D2-Net's dense variants, APD2Net's equivalences (E6), the keypoint
mask, preprocessing, SIFT selection, descriptor sampling and the HPatches MMA."""

import json

import cv2
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from cadist.cli import main
from cadist.errors import DataError
from cadist.eval.hpatches import evaluate, mutual_nn, reprojection_errors, write_sequences
from cadist.keypoints.d2net import APD2Net, D2NetDense, load_d2net_weights
from cadist.keypoints.extract import CAFFE_MEANS, preprocess, sample, sift_keypoints
from cadist.keypoints.masks import check_windows, keypoint_mask


@pytest.fixture(scope="module")
def os8():
    torch.manual_seed(0)
    net = D2NetDense(8).eval()
    for m in net.modules():  # keep activations O(1) through 10 random layers
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.normal_(m.weight, std=(2 / (9 * m.in_channels)) ** 0.5)
    return net


def test_dense_variants_and_released_names(os8, tmp_path):
    names = {k.split(".")[2] for k in os8.state_dict()}
    assert names == {"0", "2", "5", "7", "10", "12", "14", "17", "19", "21"}
    x = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        for s in (1, 2, 4, 8):
            net = D2NetDense(s).eval()
            net.load_state_dict(os8.state_dict())
            y = net(x)
            assert y.shape == (1, 512, 32 // s, 48 // s) and (y >= 0).all()
    torch.save({"model": os8.state_dict()}, tmp_path / "d2_tf.pth")
    other = D2NetDense(4)
    load_d2net_weights(other, tmp_path / "d2_tf.pth")
    assert torch.equal(other.state_dict()["dense_feature_extraction.model.21.weight"],
                       os8.state_dict()["dense_feature_extraction.model.21.weight"])  # fmt: skip


@pytest.mark.parametrize("s", [1, 2, 4])
def test_e6_adaptive_network_equals_dense_at_both_extremes(os8, s):
    ap = APD2Net(s).eval()
    ap.load_state_dict(os8.state_dict())
    dense_s = D2NetDense(s).eval()
    dense_s.load_state_dict(os8.state_dict())
    x = torch.randn(1, 3, 32, 48)
    h, w = 32 // s, 48 // s
    with torch.no_grad():
        ref = dense_s(x)
        got = ap(x, torch.zeros(1, h, w, dtype=torch.long))
        assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()
        ref8 = os8(x).repeat_interleave(8 // s, -2).repeat_interleave(8 // s, -1)
        got = ap(x, torch.full((1, h, w), ap.num_steps, dtype=torch.long))
        assert (got - ref8).abs().max() <= 1e-5 * ref8.abs().max()


def test_keypoint_mask_hand_cases():
    # s = 4, d0 = 3: the keypoint (9, 9) touches sampled pixel (8, 8) = grid cell (2, 2);
    # its aligned 2×2 block (rows 2-3, cols 2-3) stays at OS4, the rest is pooled once
    m = keypoint_mask(torch.tensor([[9, 9]]), 32, 32, 4, (3,))
    expect = torch.ones(8, 8, dtype=torch.long)
    expect[2:4, 2:4] = 0
    assert torch.equal(m, expect)
    # a keypoint whose 3×3 window holds no sampled pixel changes nothing
    assert torch.equal(
        keypoint_mask(torch.tensor([[6, 6]]), 32, 32, 4, (3,)), torch.ones(8, 8).long()
    )
    # s = 2, (3, 11): inner 2×2 block at level 0 inside a 4×4 block at level 1, OS8 elsewhere
    m = keypoint_mask(torch.tensor([[8, 8]]), 32, 32, 2, (3, 11))
    assert m[4, 4] == 0 and m[4:6, 4:6].eq(0).all() and m[:, :].max() == 2
    assert set(m[0:8, 0:8].unique().tolist()) <= {0, 1} and m[0, 12] == 2
    for bad, msg in (((4,), "odd"), ((11, 3), "shrink"), ((3, 0), "followed by a 0"), ((), "need")):
        with pytest.raises(ValueError, match=msg):
            check_windows(bad, max(1, len(bad)) if bad else 1)


def test_preprocess_sizes_and_caffe_normalisation():
    rgb = np.zeros((1001, 1503, 3), np.uint8)
    rgb[0, 0] = (10, 20, 30)
    p = preprocess(rgb)
    assert p.x.shape == (1, 3, 1000, 1496)  # sum 2504 ≤ 2800: only trimmed to multiples of 8
    big = preprocess(np.zeros((1600, 2400, 3), np.uint8))  # sum 4000 → × 0.7, already /8 → kept
    assert big.x.shape[-2:] == (1120, 1680) and big.scale_x == pytest.approx(2400 / 1680)
    small = preprocess(rgb[:16, :24])
    assert torch.allclose(
        small.x[0, :, 0, 0], torch.tensor([30.0, 20.0, 10.0]) - torch.from_numpy(CAFFE_MEANS)
    )


def test_sift_selection_and_sampling():
    rng = np.random.default_rng(0)
    rgb = (rng.random((96, 128, 3)) * 255).astype(np.uint8)
    rgb = cv2.GaussianBlur(rgb, (5, 5), 1.5)
    x = preprocess(rgb).x
    pts = sift_keypoints(x, limit=20)
    assert 0 < len(pts) <= 20 and len({tuple(p) for p in pts}) == len(pts)
    assert [tuple(p) for p in pts] == sorted((tuple(p) for p in pts), key=lambda p: (p[1], p[0]))
    # the grey image is 0.299·B + 0.587·G + 0.114·R (the reference's channel-order quirk)
    grey = (0.299 * rgb[..., 2] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 0]).astype(np.uint8)
    strongest = sorted(cv2.SIFT_create().detect(grey, None), key=lambda k: -k.response)
    first = (int(np.round(strongest[0].pt[0])), int(np.round(strongest[0].pt[1])))
    assert first in {tuple(p) for p in pts}
    feats = torch.arange(2 * 3 * 4, dtype=torch.float32).view(2, 3, 4)  # C=2, Hf=3, Wf=4
    d = sample(feats, np.array([[0, 0], [31, 15], [10, 8]]), height=16, width=32)
    # corner-aligned: x 31 → col 3, y 15 → row 2; x 10 → round(10·3/31) = 1, y 8 → round(8·2/15) = 1
    assert d.tolist() == [[0, 12], [11, 23], [5, 17]]


def test_matching_errors_and_mma_with_an_exact_describer(tmp_path):
    d1 = np.array([[1.0, 0], [0, 1], [1, 1]])
    d2 = np.array([[0.0, 2], [3, 0]])
    assert mutual_nn(d1, d2).tolist() == [[0, 1], [1, 0]]  # row 2's best (col 1) prefers row 0
    kp = np.array([[10.0, 20, 1], [30, 40, 1]])
    h = np.array([[1.0, 0, 5], [0, 1, -2], [0, 0, 1]])
    assert reprojection_errors(kp, kp + [5, -2, 0], np.array([[0, 0], [1, 1]]), h).tolist() == [
        0,
        0,
    ]
    seqs = write_sequences(tmp_path, illumination=1, viewpoint=1, height=64, width=96, seed=1)
    homs = {s.name: [np.eye(3)] + [np.loadtxt(s / f"H_1_{k}") for k in range(2, 7)] for s in seqs}
    grid = np.array([[x, y, 1.0] for y in range(8, 56, 8) for x in range(8, 88, 8)])
    order = [(s.name, k) for s in sorted(seqs) for k in range(6)]

    calls = iter(order)

    def exact(_rgb):
        name, k = next(calls)
        p = grid @ homs[name][k].T
        return {"keypoints": p / p[:, 2:], "descriptors": np.eye(len(grid))}

    r = evaluate(tmp_path, exact)
    assert r["sequences"] == {"i": 1, "v": 1} and r["mma"] == [1.0] * 15
    assert r["features_per_image"] == len(grid) and r["matches_per_pair"] == len(grid)
    (seqs[1] / "H_1_4").unlink()
    with pytest.raises(DataError, match="missing H_1_4"):
        evaluate(tmp_path, exact)


def test_hpatches_cli_scores_and_logs_and_adaptive_with_full_windows_equals_dense(tmp_path):
    torch.manual_seed(0)
    net = D2NetDense(8)
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.normal_(m.weight, std=(2 / (9 * m.in_channels)) ** 0.5)
    torch.save({"model": net.state_dict()}, tmp_path / "d2.pth")
    r = CliRunner().invoke(main, ["hpatches", "synth", "--out", str(tmp_path / "hp"), "--illumination",
                                  "1", "--viewpoint", "1", "--height", "64", "--width", "96"])  # fmt: skip
    assert r.exit_code == 0, r.output
    common = ["hpatches", "eval", "--root", str(tmp_path / "hp"), "--weights", str(tmp_path / "d2.pth"),
              "--device", "cpu", "--json"]  # fmt: skip
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    feats = tmp_path / "feats"
    r = CliRunner().invoke(
        main,
        [*common, "--network", "d2net", "--output-stride", "2", "--tracking-uri", uri,
         "--save-features", str(feats), "--save-results", str(tmp_path / "d2net_os2.npy")],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    dense = json.loads(r.stdout)
    assert 0 <= dense["mma@3"] <= 1 and 0 < dense["features_per_image"] <= 512
    saved = np.load(feats / "v_generated000" / "3.ppm.d2net_os2.npz")
    k = len(saved["keypoints"])
    assert saved["keypoints"].shape == (k, 3) and saved["descriptors"].shape == (k, 512)
    assert saved["descriptors"].dtype == np.float32 and (saved["scores"] == 1).all()
    assert dense["gmac_per_image"] > 0
    assert all(
        a <= b for a, b in zip(dense["mma"], dense["mma"][1:], strict=False)
    )  # monotone in θ
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("hpatches").experiment_id])
    assert run.data.metrics["hpatches/mma_3px"] == pytest.approx(dense["mma@3"])
    # the §12 results file: read back to the printed scores, and an artifact of the run
    from cadist.eval.hpatches_results import read_results, summarise

    assert summarise(read_results(tmp_path / "d2net_os2.npy"))["mma"] == dense["mma"]
    arts = [a.path for a in client.list_artifacts(run.info.run_id, "hpatches")]
    assert "hpatches/d2net_os2.npy" in arts
    # windows wider than the image keep every cell at the start stride: the dense OS2 result
    r = CliRunner().invoke(
        main, [*common, "--network", "apd2net", "--start-stride", "2", "--windows", "255,255"]
    )
    assert r.exit_code == 0, r.output
    ada = json.loads(r.stdout)
    assert ada["high_res_fraction"] == 1.0
    assert (
        ada["mma"] == pytest.approx(dense["mma"])
        and ada["matches_per_pair"] == dense["matches_per_pair"]
    )


def test_keypoint_network_macs_follow_the_counting_rules():
    from cadist.keypoints.d2net import count_gmac

    h, w = 480, 640
    convs = [(3, 64, 1), (64, 64, 1), (64, 128, 2), (128, 128, 2), (128, 256, 4), (256, 256, 4),
             (256, 256, 4), (256, 512, 8), (512, 512, 8), (512, 512, 8)]  # fmt: skip

    def dense_os8():  # convs with bias + ReLUs + pools (input values), by hand
        m = 0
        for ci, co, s in convs:
            n = (h // s) * (w // s)
            m += 9 * ci * co * n + co * n + co * n  # weights, bias, ReLU
        m += 64 * h * w + 128 * (h // 2) * (w // 2) + 256 * (h // 4) * (w // 4)  # pools
        return m / 1e9

    assert count_gmac("d2net", 8, h, w) == pytest.approx(dense_os8(), rel=1e-12)
    for s, levels in ((1, 3), (2, 2), (4, 1)):
        full = torch.full((1, h // s, w // s), levels, dtype=torch.long)
        assert count_gmac("apd2net", s, h, w, full) == pytest.approx(dense_os8(), rel=1e-12)
        zero = torch.zeros(1, h // s, w // s, dtype=torch.long)
        # all at the start stride: the dense OS s network plus the pools, charged over the full
        # canvases although nothing is pooled (§10.2)
        pools = sum((h // s >> (k - 1)) * (w // s >> (k - 1)) * c
                    for k, c in zip(range(1, levels + 1), (64, 128, 256)[3 - levels:], strict=True))  # fmt: skip
        assert count_gmac("apd2net", s, h, w, zero) == pytest.approx(
            count_gmac("d2net", s, h, w) + pools / 1e9, rel=1e-12
        )


def test_hpatches_table_runs_each_method_once_on_shared_sift_keypoints(tmp_path, monkeypatch):
    from cadist.eval.hpatches_results import PAPER_MMA3
    from cadist.keypoints import extract
    from cadist.keypoints.extract import Method

    for name in PAPER_MMA3:  # the paper's method names parse and print back
        assert Method.from_name(name).name == name
    with pytest.raises(ValueError, match="apd2net_s2_21-21"):
        Method.from_name("apd2net_two")
    torch.manual_seed(0)
    torch.save({"model": D2NetDense(8).state_dict()}, tmp_path / "d2.pth")
    write_sequences(tmp_path / "hp", illumination=1, viewpoint=1, height=64, width=96, seed=3)
    calls = []
    real = extract.sift_keypoints
    monkeypatch.setattr(extract, "sift_keypoints", lambda x: calls.append(1) or real(x))
    extract._SIFT_CACHE.clear()
    cmd = ["hpatches", "table", "--root", str(tmp_path / "hp"), "--weights", str(tmp_path / "d2.pth"),
           "--out", str(tmp_path / "res"), "--methods", "d2net_os8,apd2net_s4_3", "--device", "cpu",
           "--json"]  # fmt: skip
    r = CliRunner().invoke(main, cmd)
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)["results"]
    assert [x["method"] for x in rows] == ["d2net_os8", "apd2net_s4_3"]
    assert [x["paper_mma@3"] for x in rows] == [0.5500, 0.5563]
    assert len(calls) == 12  # 2 sequences × 6 images, SIFT once per image for both methods
    assert sorted(p.name for p in (tmp_path / "res").iterdir()) == [
        "apd2net_s4_3.npy",
        "d2net_os8.npy",
    ]
    again = CliRunner().invoke(main, cmd)  # rerun: both files kept, the same table
    assert again.exit_code == 0 and again.stderr.count("exists, kept") == 2
    assert json.loads(again.stdout)["results"] == rows and len(calls) == 12
    bad = CliRunner().invoke(main, [*cmd[:8], "--methods", "d2net_os3x"])
    assert bad.exit_code != 0 and "--methods: method 'd2net_os3x'" in bad.output
