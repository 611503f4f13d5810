"""The content-adaptive method: equivalences E1/E2/E2b/E2c, the fast irregular convolution against a
tap-by-tap oracle, batching, the edge mask, checkpoint layouts and MAC counting."""

import numpy as np
import pytest
import torch
from torch import nn

from cadist.adaptive.convert import from_reference, to_reference
from cadist.adaptive.layout import MixedLayout
from cadist.adaptive.masks import EdgeMask
from cadist.adaptive.ops import irregular_conv
from cadist.nets.build import build_model
from cadist.nets.macs import count_adaptive
from cadist.nets.weights import load_weights

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def _randomise_bn(model):
    g = torch.Generator().manual_seed(3)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) * 0.2 - 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.bias.shape, generator=g) * 0.2 - 0.1)


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    dense8 = build_model("deeplabv3_resnet_tiny", 8).eval()
    _randomise_bn(dense8)
    ada = build_model("deeplabv3_batch_ap_resnet_tiny").eval()
    ada.load_state_dict(dense8.state_dict())  # dense OS8 weights load unchanged
    return dense8, ada


def up2(x):
    return x.repeat_interleave(2, -2).repeat_interleave(2, -1)


# -- equivalences (§5) ------------------------------------------------------------------------
def test_e1_all_high_res_equals_dense_os8(pair):
    dense8, ada = pair
    x = torch.randn(2, 3, 64, 128)
    with torch.no_grad():
        got = ada(x, mask=torch.zeros(2, 8, 16, dtype=torch.long))
        assert (got - dense8(x)).abs().max() < 1e-4
    # training mode too (all masks ≡ 0: no padding, same statistics)
    dense8.train(), ada.train()
    try:
        with torch.no_grad():
            a = ada.backbone(x, torch.zeros(2, 8, 16, dtype=torch.long))
            d = dense8.backbone(x)
        assert (a - d).abs().max() < 1e-4
    finally:
        dense8.eval(), ada.eval()


def test_e2_all_low_res_equals_dense_os16_backbone_and_e2b_aspp(pair):
    dense8, ada = pair
    dense16 = build_model("deeplabv3_resnet_tiny", 16).eval()
    dense16.load_state_dict(dense8.state_dict())
    x = torch.randn(2, 3, 64, 128)
    ones = torch.ones(2, 8, 16, dtype=torch.long)
    with torch.no_grad():
        f16 = dense16.backbone(x)
        fa = ada.backbone(x, ones)
        assert (fa - up2(f16)).abs().max() < 1e-4  # E2
        aspp8, aspp16 = ada.classifier.classifier[0], dense16.classifier.classifier[0]
        assert (aspp8(fa) - up2(aspp16(f16))).abs().max() < 1e-4  # E2b
        diff = (ada(x, mask=ones) - dense16(x)).abs().max()
        assert diff > 1e-3  # E2c: not equal
    ada.train(), dense16.train()
    try:
        with torch.no_grad():  # E2 in training mode: BN sees the same multiset
            assert (ada.backbone(x, ones) - up2(dense16.backbone(x))).abs().max() < 1e-4
    finally:
        ada.eval()


def batch_equals_images_one_by_one(model) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Three 64×128 images with masks of about 20, 50 and 90 % OS16 (4×4-cell blocks): the batch's
    logits equal each image's alone (≤ 1e-4). Returns (images, masks, batch logits)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 3, 64, 128, generator=g)
    masks = (torch.rand(3, 2, 4, generator=g) < torch.tensor([0.2, 0.5, 0.9]).view(3, 1, 1)).long()
    masks = masks.repeat_interleave(4, 1).repeat_interleave(4, 2)
    with torch.no_grad():
        batch = model(x, mask=masks)
        for i in range(3):
            assert (batch[i] - model(x[i : i + 1], mask=masks[i : i + 1])[0]).abs().max() < 1e-4
    return x, masks, batch


def test_batch_of_different_masks_equals_images_one_by_one(pair):
    batch_equals_images_one_by_one(pair[1])


# -- the fast irregular convolution vs a tap-by-tap oracle -------------------------------------
def _random_mask(g, h, w):
    """Multi-level mask (values 0..2) satisfying the block constraint."""
    m2 = (
        (torch.rand(h // 4, w // 4, generator=g) < 0.3)
        .repeat_interleave(4, 0)
        .repeat_interleave(4, 1)
    )
    m1 = (
        (torch.rand(h // 2, w // 2, generator=g) < 0.5)
        .repeat_interleave(2, 0)
        .repeat_interleave(2, 1)
    )
    return (m1 | m2).long() + m2.long()


def _oracle_elements(mask, k):
    cur = np.minimum(mask.numpy(), k)
    h, w = cur.shape
    elems = []
    for lvl in range(k + 1):
        s = 2**lvl
        for y in range(0, h, s):
            for x in range(0, w, s):
                if (cur[y : y + s, x : x + s] == lvl).all():
                    elems.append((lvl, y, x))
    lookup = {}
    for i, (lvl, y, x) in enumerate(elems):
        for dy in range(2**lvl):
            for dx in range(2**lvl):
                lookup[(y + dy, x + dx)] = i
    return elems, lookup


def _oracle_conv(mask, k, t, feats, weight):
    """3×3 conv on the elements, one tap at a time; `t`: the tap spacing in finest cells, or a
    function of the element's level giving it."""
    elems, lookup = _oracle_elements(mask, k)
    h, w = mask.shape
    spacing = t if callable(t) else lambda _level: t
    out = []
    for lvl, y, x in elems:
        off, s = 2**lvl // 2, spacing(lvl)
        acc = torch.zeros(weight.shape[0], dtype=feats.dtype)
        for i in (-1, 0, 1):
            for j in (-1, 0, 1):
                py, px = y + off + s * i, x + off + s * j
                if 0 <= py < h and 0 <= px < w:
                    acc = acc + weight[:, :, i + 1, j + 1] @ feats[lookup[(py, px)]]
        out.append(acc)
    return torch.stack(out)


@pytest.mark.parametrize("k,t", [(0, 1), (1, 2), (2, 4), (2, 2)])
def test_fast_irregular_conv_equals_tap_by_tap_oracle(k, t):
    g = torch.Generator().manual_seed(10 * k + t)
    masks = torch.stack([_random_mask(g, 8, 12) for _ in range(2)])
    layout = MixedLayout(masks, 2)
    e = layout.elements(k)
    n0, n1 = (int(c) for c in e.counts)
    assert [n0, n1] == [len(_oracle_elements(m, k)[0]) for m in masks]
    x = torch.randn(e.n, 5, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(4, 5, 3, 3, dtype=torch.float64, generator=g, requires_grad=True)
    fast = irregular_conv(x, w, layout.table(k, t))
    slow = torch.cat(
        [_oracle_conv(masks[0], k, t, x[:n0], w), _oracle_conv(masks[1], k, t, x[n0:], w)]
    )
    assert torch.allclose(fast, slow, atol=1e-10)
    r = torch.randn(fast.shape, dtype=torch.float64, generator=g)
    gx_f, gw_f = torch.autograd.grad((fast * r).sum(), (x, w))
    gx_s, gw_s = torch.autograd.grad((slow * r).sum(), (x, w))
    assert torch.allclose(gx_f, gx_s, atol=1e-10) and torch.allclose(gw_f, gw_s, atol=1e-10)


def test_strided_step_keeps_the_top_left_member():
    g = torch.Generator().manual_seed(5)
    mask = _random_mask(g, 8, 12)[None]
    layout = MixedLayout(mask, 2)
    for k in (1, 2):
        prev, _ = _oracle_elements(mask[0], k - 1)
        cur, _ = _oracle_elements(mask[0], k)
        _, prev_lookup = _oracle_elements(mask[0], k - 1)
        expect = [prev_lookup[(y, x)] for (_, y, x) in cur]
        assert layout.selection(k).tolist() == expect
        e = layout.elements(k)
        assert list(zip(e.level.tolist(), e.y0.tolist(), e.x0.tolist(), strict=True)) == cur


def test_layout_rejects_invalid_masks():
    with pytest.raises(ValueError, match="block constraint"):
        MixedLayout(torch.tensor([[[1, 0], [0, 0]]]), 1)
    with pytest.raises(ValueError, match="not divisible"):
        MixedLayout(torch.zeros(1, 6, 6, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="outside 0..1"):
        MixedLayout(torch.full((1, 4, 4), 2), 1)


# -- edge mask (§6), golden cases derived by hand ------------------------------------------------
def _normalised(rgb01):
    return (rgb01 - MEAN) / STD


def test_edge_mask_uniform_grey_marks_top_and_left_strips():
    x = _normalised(torch.full((1, 3, 128, 256), 0.5))  # g ≈ 0.183 > τ = 0.15
    m = EdgeMask()(x)[0]
    expect = torch.ones(16, 32, dtype=torch.long)
    expect[:4, :] = 0  # the top 32-pixel strip (zero padding above fires)
    expect[:, :4] = 0  # the left 32-pixel strip
    assert torch.equal(m, expect)
    assert int(EdgeMask(variant="corrected")(x).sum()) == 16 * 32  # no border artefacts


def test_edge_mask_black_image_is_all_low_res():
    # right/bottom borders fire (g < −τ) but the widened response never reaches a sampled pixel
    x = _normalised(torch.zeros(1, 3, 128, 256))
    assert int(EdgeMask()(x).sum()) == 16 * 32


def test_edge_mask_single_bright_pixel():
    img = torch.zeros(1, 3, 128, 256)
    img[:, :, 40, 44] = 1.0  # edges at (40, 43) (gx) and (39, 44) (gy)
    m = EdgeMask()(_normalised(img))[0]
    expect = torch.ones(16, 32, dtype=torch.long)
    expect[4:8, 4:8] = 0  # sampled pixels (40, 40), (40, 48) → cells (5, 5), (5, 6) → block (1, 1)
    assert torch.equal(m, expect)


def test_edge_mask_one_sided_threshold_and_subsampling():
    dark_to_bright = torch.zeros(1, 3, 128, 256)
    dark_to_bright[:, :, :, 100:] = 1.0
    bright_to_dark = 0.6 * (1.0 - dark_to_bright)
    up = EdgeMask()(_normalised(dark_to_bright))[0]
    down = EdgeMask()(_normalised(bright_to_dark))[0]
    assert (up[:, 12] == 0).all()  # cells around column 100 px keep high resolution
    assert (down[4:, 8:16] == 1).all()  # a bright→dark step is not detected by the reference…
    assert (
        EdgeMask(variant="corrected")(_normalised(bright_to_dark))[0][:, 12] == 0
    ).all()  # …but is here
    # trimap 3: an edge whose widened response misses the sampled top-left pixels is lost
    img = torch.zeros(1, 3, 128, 256)
    img[:, :, 44, 44] = 1.0
    assert int(EdgeMask(trimap_width=3)(_normalised(img)).sum()) == 16 * 32
    assert int(EdgeMask(trimap_width=3, variant="corrected")(_normalised(img)).sum()) < 16 * 32


# -- checkpoints (§4.4) -------------------------------------------------------------------------
def test_reference_edge_checkpoint_layout_round_trips(tmp_path, pair):
    _, ada = pair
    ref_sd = to_reference(ada.state_dict())
    assert ref_sd["backbone.layer3.0.conv2.conv.weight"].shape == (64, 64, 9, 1)
    assert ref_sd["backbone.layer3.0.conv1.weight"].shape == (64, 128, 1)
    assert "backbone.layer4.0.downsample.norm1.running_var" in ref_sd
    assert ref_sd["backbone.layer2.0.conv1.weight"].dim() == 4  # dense stages untouched
    w = ada.state_dict()["backbone.layer3.0.conv2.weight"]
    assert torch.equal(
        ref_sd["backbone.layer3.0.conv2.conv.weight"][:, :, 3 * 0 + 2, 0], w[:, :, 0, 2]
    )
    back = from_reference(ref_sd)
    assert set(back) == set(ada.state_dict())
    assert all(torch.equal(back[k], v) for k, v in ada.state_dict().items())
    name = "best_deeplabv3_batch_ap_resnet_tiny_cityscapes_modeedges_os16till8.pth"
    torch.save({"model_state": ref_sd, "cur_itrs": 5, "best_score": 0.5}, tmp_path / name)
    fresh = build_model("deeplabv3_batch_ap_resnet_tiny").eval()
    load_weights(fresh, tmp_path / name)
    x = torch.randn(1, 3, 64, 128)
    with torch.no_grad():
        assert torch.equal(fresh(x), ada(x))


# -- MACs (§10) ---------------------------------------------------------------------------------
def test_adaptive_backbone_macs_follow_the_reference_formula():
    g = torch.Generator().manual_seed(0)
    for share in (0.0, 0.3, 0.7, 1.0):
        blocks = torch.rand(1, 32, 64, generator=g) < share
        mask = (~blocks).long().repeat_interleave(4, 1).repeat_interleave(4, 2)
        r = count_adaptive("deeplabv3_batch_ap_resnet101", mask, 1024, 2048)
        p = r["high_res_fraction"]
        assert p == pytest.approx(float(blocks.float().mean()))
        assert r["backbone_gmac"] == pytest.approx(431.25 + 992.33 * p, abs=0.01)
        # cadist evaluates the strided conv at the kept elements only: 9·256·256·(N_in − N_out)
        saved = 9 * 256 * 256 * (32768 - (p * 32768 + (1 - p) * 8192)) / 1e9
        assert r["backbone_gmac"] - r["backbone_gmac_actual"] == pytest.approx(saved, abs=0.01)
        assert r["head_gmac"] == pytest.approx(511.48, abs=0.005)
        assert r["edge_gmac"] == pytest.approx(0.0377, abs=1e-4)


def test_irregular_conv_under_bf16_autocast_is_close_to_fp32():
    g = torch.Generator().manual_seed(7)
    masks = torch.stack([_random_mask(g, 8, 12) for _ in range(2)])
    layout = MixedLayout(masks, 2)
    idx = layout.table(1, 2)
    x = torch.randn(layout.elements(1).n, 16, generator=g, requires_grad=True)
    w = torch.randn(8, 16, 3, 3, generator=g, requires_grad=True)
    ref = irregular_conv(x, w, idx)
    gx_ref, gw_ref = torch.autograd.grad(ref.sum(), (x, w))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = irregular_conv(x, w, idx)
    assert out.dtype == torch.bfloat16
    gx, gw = torch.autograd.grad(out.float().sum(), (x, w))
    assert gx.dtype == torch.float32 and gw.dtype == torch.float32
    rel = (out.float() - ref).abs().max() / ref.abs().max()
    assert rel < 2e-2
    assert (gw - gw_ref).abs().max() / gw_ref.abs().max() < 2e-2
    assert (gx - gx_ref).abs().max() / gx_ref.abs().max() < 2e-2


def test_max_pool_step_equals_dense_pooling_and_the_oracle():
    from cadist.adaptive.ops import max_pool_step

    g = torch.Generator().manual_seed(11)
    # uniform mask ≡ 2: two max-pool steps equal two dense 2×2 max-pools (raster order per image)
    x = torch.randn(2, 3, 8, 12, generator=g)
    layout = MixedLayout(torch.full((2, 8, 12), 2), 2)
    f = MixedLayout.from_dense(x)
    f = max_pool_step(max_pool_step(f, layout.pool_members(1)), layout.pool_members(2))
    dense = nn.functional.max_pool2d(nn.functional.max_pool2d(x, 2), 2)
    assert torch.equal(f, dense.permute(0, 2, 3, 1).reshape(-1, 3))
    # random multi-level mask: each new element is the max of its quadrant elements (oracle)
    mask = _random_mask(g, 8, 12)[None]
    layout = MixedLayout(mask, 2)
    for k in (1, 2):
        prev, prev_lookup = _oracle_elements(mask[0], k - 1)
        cur, _ = _oracle_elements(mask[0], k)
        feats = torch.randn(len(prev), 4, generator=g)
        got = max_pool_step(feats, layout.pool_members(k))
        for i, (lvl, y, x0) in enumerate(cur):
            if lvl == k:
                h = 2 ** (k - 1)
                quads = [prev_lookup[(y + a, x0 + b)] for a in (0, h) for b in (0, h)]
                assert torch.equal(got[i], feats[quads].amax(0))
            else:
                assert torch.equal(got[i], feats[prev_lookup[(y, x0)]])


@pytest.mark.parametrize("mode,dense_os", [("os16to32", 16), ("os8to32", 8)])
def test_other_modes_equal_the_dense_backbone_when_nothing_is_downsampled(mode, dense_os):
    from cadist.adaptive.resnet import AdaptiveResNet
    from cadist.models.resnet import SPECS, ResNet

    torch.manual_seed(0)
    dense = ResNet(SPECS["resnet_tiny"], dense_os).eval()
    _randomise_bn(dense)
    ada = AdaptiveResNet(SPECS["resnet_tiny"], mode).eval()
    ada.load_state_dict(dense.state_dict())
    x = torch.randn(2, 3, 128, 128)
    h0 = 128 // dense_os
    with torch.no_grad():
        assert (ada(x, torch.zeros(2, h0, h0, dtype=torch.long)) - dense(x)).abs().max() < 1e-4
        # everything downsampled: the dense OS32 backbone, replicated to the finest grid
        d32 = ResNet(SPECS["resnet_tiny"], 32).eval()
        d32.load_state_dict(dense.state_dict())
        low = 2 if mode == "os8to32" else 1
        rep = 32 // dense_os
        ref = d32(x).repeat_interleave(rep, 2).repeat_interleave(rep, 3)
        assert (ada(x, torch.full((2, h0, h0), low)) - ref).abs().max() < 1e-4


def test_predict_and_macs_cli_for_the_edge_model(tmp_path, pair):
    import json

    from click.testing import CliRunner
    from PIL import Image

    from cadist.cli import main
    from cadist.nets.weights import save_weights

    _, ada = pair
    save_weights(ada, tmp_path / "edge.pt", model="deeplabv3_batch_ap_resnet_tiny")
    img = np.zeros((64, 128, 3), np.uint8)
    img[20:40, 30:90] = 255  # a bright rectangle: its dark→bright edges keep high resolution
    Image.fromarray(img).save(tmp_path / "rect.png")

    def predict(out, *extra):
        return CliRunner().invoke(
            main,
            ["predict", "--model", "deeplabv3_batch_ap_resnet_tiny", "--ckpt",
             str(tmp_path / "edge.pt"), "--image", str(tmp_path / "rect.png"), "--out",
             str(tmp_path / out), "--save-mask", *extra],
        )  # fmt: skip

    r = predict("o", "--device", "cpu")
    assert r.exit_code == 0, r.output
    mask = np.load(tmp_path / "o" / "rect_mask.npy")
    assert mask.dtype == np.uint8 and mask.shape == (8, 16)
    expect = EdgeMask()(_normalised(torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255))[0]
    assert np.array_equal(mask, expect.numpy().astype(np.uint8))
    assert 0 < mask.mean() < 1
    # bf16 inference: same mask (computed in float32), logits close to float32's
    for precision in ("fp32", "bf16"):
        r = predict(precision, "--save-logits", "--precision", precision)
        assert r.exit_code == 0, r.output
        assert np.array_equal(np.load(tmp_path / precision / "rect_mask.npy"), mask)
    l32, l16 = (np.load(tmp_path / p / "rect_logits.npy") for p in ("fp32", "bf16"))
    assert np.linalg.norm(l16 - l32) / np.linalg.norm(l32) < 3e-2
    with torch.no_grad():
        ref = ada(_normalised(torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255))[0]
    assert np.abs(l32 - ref.numpy()).max() <= 1e-4 * np.abs(l32).max()
    r = CliRunner().invoke(
        main,
        [
            "macs",
            "--model",
            "deeplabv3_batch_ap_resnet_tiny",
            "--image",
            str(tmp_path / "rect.png"),
            "--json",
        ],
    )
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["high_res_fraction"] == pytest.approx(1 - mask.mean())
    assert d["num_images"] == 1 and d["input_hw"] == [64, 128]
    r = CliRunner().invoke(
        main,
        [
            "predict",
            "--model",
            "deeplabv3_resnet_tiny",
            "--ckpt",
            str(tmp_path / "edge.pt"),
            "--image",
            str(tmp_path / "rect.png"),
            "--out",
            str(tmp_path / "o2"),
            "--save-mask",
        ],
    )
    assert r.exit_code == 2 and "dense model and has no pooling mask" in r.output


def test_evaluation_reuses_laid_out_weights_until_they_change():
    """Without autograd, IrregularConv3x3 lays its weights out for the GEMM once per update; an
    optimiser step, load_state_dict or a dtype change under autocast must not see stale ones."""
    from cadist.adaptive.ops import IrregularConv3x3

    g = torch.Generator().manual_seed(3)
    masks = torch.stack([_random_mask(g, 8, 12) for _ in range(2)])
    layout = MixedLayout(masks, 2)
    idx = layout.table(1, 2)
    conv = IrregularConv3x3(6, 4, bias=True)
    x = torch.randn(layout.elements(1).n, 6, generator=g)

    def reference():
        return irregular_conv(x, conv.weight.detach(), idx, conv.bias.detach())

    with torch.no_grad():
        first = conv(x, idx)
        assert torch.equal(first, reference())
        assert conv._w9_cache[1] is conv._w9(torch.float32)  # reused, not rebuilt
    opt = torch.optim.SGD(conv.parameters(), lr=0.5)
    conv(x.requires_grad_(), idx).square().sum().backward()  # the autograd path
    opt.step()
    x = x.detach()
    with torch.inference_mode():
        after_step = conv(x, idx)
    assert not torch.allclose(after_step, first) and torch.equal(after_step, reference())
    conv.load_state_dict({"weight": torch.randn(4, 6, 3, 3, generator=g), "bias": conv.bias})
    with torch.no_grad():
        fp32 = conv(x, idx)
        assert torch.equal(fp32, reference())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = conv(x, idx)  # products in bf16 (the bias add promotes, as on the autograd path)
            assert torch.equal(low, irregular_conv(x, conv.weight, idx, conv.bias))
            assert not torch.equal(low, fp32)
