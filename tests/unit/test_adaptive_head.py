"""The adaptive head (cadist.adaptive.head): all cells at OS8 → the dense OS8 model, all at OS16 → the
dense OS16 model, batches of different masks → images one by one, the head's every operation and
gradient against a tap-by-tap oracle, the learned model's training simulation, MAC counting."""

import pytest
import torch
import torch.nn.functional as F

from cadist.adaptive.head import AdaptiveDeepLabHead, upsample_levels
from cadist.adaptive.layout import MixedLayout
from cadist.nets.build import build_model
from cadist.nets.macs import count_adaptive, count_dense

from .test_adaptive import (
    _oracle_conv,
    _oracle_elements,
    _random_mask,
    _randomise_bn,
    batch_equals_images_one_by_one,
)


@pytest.fixture(scope="module")
def models():
    """Dense OS8 and OS16 tiny models and the edge model with the adaptive head, one set of weights
    (random BN statistics, so that nothing cancels)."""
    torch.manual_seed(0)
    dense8 = build_model("deeplabv3_resnet_tiny", 8).eval()
    _randomise_bn(dense8)
    dense16 = build_model("deeplabv3_resnet_tiny", 16).eval()
    dense16.load_state_dict(dense8.state_dict())
    ada = build_model("deeplabv3_batch_ap_resnet_tiny", head="adaptive").eval()
    ada.load_state_dict(dense8.state_dict())  # a dense OS8 checkpoint loads unchanged
    return dense8, dense16, ada


def test_all_os8_is_the_dense_os8_model_and_all_os16_the_dense_os16_model(models):
    dense8, dense16, ada = models
    x = torch.randn(2, 3, 64, 128)
    with torch.no_grad():
        zeros = torch.zeros(2, 8, 16, dtype=torch.long)
        assert (ada(x, mask=zeros) - dense8(x)).abs().max() < 1e-4
        # (with the dense head the all-OS16 model is not the OS16 model: method.md E2c)
        ones = torch.ones(2, 8, 16, dtype=torch.long)
        assert (ada(x, mask=ones) - dense16(x)).abs().max() < 1e-4


def test_a_batch_of_different_masks_equals_its_images_one_by_one(models):
    _, _, ada = models
    x, masks, batch = batch_equals_images_one_by_one(ada)
    with torch.no_grad():  # a mixed image is not the all-OS16 one: both levels reach the logits
        assert (ada(x[:1], mask=torch.ones_like(masks[:1])) - batch[:1]).abs().max() > 1e-3


# -- the head against a tap-by-tap oracle --------------------------------------------------------
def _bn(bn, x):
    return (x - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias


def _oracle_head(head, mask, k, feats):
    """The head of one image, element by element, with the head's parameters (eval mode)."""
    elems, _ = _oracle_elements(mask, k)
    h, w = mask.shape
    aspp, conv, bn, _, last = head.classifier
    c0, b0, _ = aspp.convs[0]
    outs = [F.relu(_bn(b0, feats @ c0.weight[:, :, 0, 0].T))]
    for rate, (c, b, _) in zip(aspp.rates, aspp.convs[1:4], strict=True):
        outs.append(F.relu(_bn(b, _oracle_conv(mask, k, lambda lvl, r=rate: r, feats, c.weight))))
    area = torch.tensor([4.0**lvl for lvl, _, _ in elems], dtype=feats.dtype)
    mean = (feats * area[:, None]).sum(0) / (h * w)
    _, cp, bp, _ = aspp.convs[4]
    pooled = F.relu(_bn(bp, cp.weight[:, :, 0, 0] @ mean))
    outs.append(pooled.expand(len(elems), -1))
    pc, pb, _, _ = aspp.project
    y = F.relu(_bn(pb, torch.cat(outs, 1) @ pc.weight[:, :, 0, 0].T))
    y = F.relu(_bn(bn, _oracle_conv(mask, k, lambda lvl: 2**lvl, y, conv.weight)))
    return y @ last.weight[:, :, 0, 0].T + last.bias


def test_the_head_and_its_gradients_equal_a_tap_by_tap_oracle():
    torch.manual_seed(5)
    g = torch.Generator().manual_seed(7)
    head = AdaptiveDeepLabHead(6, 3, (1, 2, 3), ch=4).double().eval()
    for m in head.modules():  # random statistics and affine parameters
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.2, 0.2), m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5), m.bias.data.uniform_(-0.2, 0.2)
    head.classifier[4].bias.data.uniform_(-1, 1)
    masks = torch.stack([_random_mask(g, 8, 12).clamp(max=1) for _ in range(2)])
    for k in (1, 2):  # (k = 2: the layer4 step found nothing to do, as in OS 8→16)
        layout = MixedLayout(masks, 2)
        n0 = int(layout.elements(k).counts[0])
        x = torch.randn(layout.elements(k).n, 6, dtype=torch.float64, generator=g,
                        requires_grad=True)  # fmt: skip
        fast = head(x, layout, k)
        slow = torch.cat([_oracle_head(head, masks[0], k, x[:n0]),
                          _oracle_head(head, masks[1], k, x[n0:])])  # fmt: skip
        assert torch.allclose(fast, slow, atol=1e-10), (fast - slow).abs().max()
        r = torch.randn(fast.shape, dtype=torch.float64, generator=g)
        params = [p for p in head.parameters()]
        grads_f = torch.autograd.grad((fast * r).sum(), [x, *params])
        grads_s = torch.autograd.grad((slow * r).sum(), [x, *params])
        for gf, gs in zip(grads_f, grads_s, strict=True):
            assert torch.allclose(gf, gs, atol=1e-10), (gf - gs).abs().max()


def test_upsampling_takes_each_pixel_from_its_own_level():
    """Logits 0 on every OS8 element and 1 on every OS16 one: a pixel whose cell lies inside a
    region of one level (3 cells of margin: the bilinear support on either canvas) reads exactly
    its level's value; at a border it lies in between (each canvas reads the other level there)."""
    g = torch.Generator().manual_seed(2)
    masks = torch.stack([_random_mask(g, 16, 24).clamp(max=1) for _ in range(2)])
    layout = MixedLayout(masks, 2)
    e = layout.elements(2)
    logits = e.level.double()[:, None].expand(-1, 2)
    out = upsample_levels(logits, layout, 2, (128, 192))
    m = masks[:, None].double()
    same = F.max_pool2d(m, 7, 1, 3) == -F.max_pool2d(-m, 7, 1, 3)  # no other level within 3 cells
    inside = same[:, 0].repeat_interleave(8, 1).repeat_interleave(8, 2)
    want = m[:, 0].repeat_interleave(8, 1).repeat_interleave(8, 2)
    assert inside.any() and (~inside).any()
    assert torch.equal(out[:, 0][inside], want[inside]) and torch.equal(out[:, 1], out[:, 0])
    assert bool(((out >= 0) & (out <= 1)).all())


def test_learned_training_simulation_is_the_inference_network_on_an_all_os16_mask():
    from cadist.adaptive.learned import inference_state

    torch.manual_seed(4)
    train = build_model("deeplabv3_ad_resnet_tiny", head="adaptive").eval()
    _randomise_bn(train)
    infer = build_model("deeplabv3_ad_resnet_tiny", head="adaptive", network="inference").eval()
    infer.load_state_dict(inference_state(train.state_dict()))
    x = torch.randn(1, 3, 64, 128)
    with torch.no_grad():
        a = train(x, mask=torch.ones(1, 4, 8, dtype=torch.long))
        b = infer(x, mask=torch.ones(1, 8, 16, dtype=torch.long))
    assert (a - b).abs().max() < 1e-4
    # and the mask still gets its gradient through the mixing (straight-through)
    train.train()
    train(torch.randn(2, 3, 64, 128)).sum().backward()
    assert train.backbone.mask_estimator[7].weight.grad.abs().sum() > 0


def test_macs_of_the_adaptive_head_follow_the_levels():
    """ResNet-101 at 1024×2048: all OS8 → the dense OS8 head (511.48 GMac, method.md §10.3), all
    OS16 → the dense OS16 head (127.87), and the whole model within 1.10× of the dense OS16 one."""
    name = "deeplabv3_batch_ap_resnet101"
    zeros = count_adaptive(name, torch.zeros(1, 128, 256, dtype=torch.long), 1024, 2048,
                           head="adaptive")  # fmt: skip
    ones = count_adaptive(name, torch.ones(1, 128, 256, dtype=torch.long), 1024, 2048,
                          head="adaptive")  # fmt: skip
    dense8, dense16 = (count_dense("deeplabv3_resnet101", os, 1024, 2048) for os in (8, 16))
    assert zeros["head_gmac"] == pytest.approx(dense8["head_gmac"], rel=1e-9)
    assert ones["head_gmac"] == pytest.approx(dense16["head_gmac"], rel=1e-9)
    assert round(zeros["head_gmac"], 2) == 511.48 and round(ones["head_gmac"], 2) == 127.87
    assert ones["total_gmac"] <= 1.10 * dense16["total_gmac"]
    dense_head = count_adaptive(name, torch.ones(1, 128, 256, dtype=torch.long), 1024, 2048)
    assert dense_head["head_gmac"] == pytest.approx(dense8["head_gmac"], rel=1e-9)


def test_cli_adaptive_head_on_an_all_os8_mask_predicts_the_dense_os8_logits(tmp_path):
    """The issue's acceptance, ResNet-101: `predict --head adaptive --mask zeros.npy` of the edge
    model = `predict --output-stride 8` of the dense model from one dense OS8 checkpoint (logits
    within 1e-4); `macs --head adaptive --mask ones.npy` of a 2048×1024 image ≤ 1.10× the dense
    OS16 model; bad masks are one clear error each."""
    import json

    import numpy as np
    from click.testing import CliRunner
    from PIL import Image

    from cadist.cli import main
    from cadist.data.transforms import normalized_input

    torch.manual_seed(0)
    img = np.random.default_rng(0).integers(0, 255, (64, 128, 3), dtype=np.uint8)
    x = normalized_input(img).unsqueeze(0)
    dense = build_model("deeplabv3_resnet101", 8)
    # a well-conditioned checkpoint, as a trained one is: a random ResNet-101 is chaotic (float32
    # rounding differences between dense convolutions and gather-GEMM grow to ~1e-3 in its
    # logits), so each residual branch is damped (bn3 γ = 0.1, cf. Fixup/SkipInit) and the BN
    # statistics are those of a batch (as training leaves them)
    for name, m in dense.named_modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # (the cumulative mean of what it sees: here one batch)
            if name.endswith("bn3"):
                m.weight.data.fill_(0.1)
    with torch.no_grad():
        dense.train()(torch.cat([x, x.flip(-1)]))
    dense.eval()
    torch.save(dense.state_dict(), tmp_path / "os8.pt")
    Image.fromarray(img).save(tmp_path / "img.png")
    np.save(tmp_path / "zeros.npy", np.zeros((8, 16), np.uint8))

    def predict(out, *args):
        r = CliRunner().invoke(main, ["predict", "--ckpt", str(tmp_path / "os8.pt"), "--image",
                                      str(tmp_path / "img.png"), "--out", str(tmp_path / out),
                                      "--save-logits", "--device", "cpu", *args])  # fmt: skip
        assert r.exit_code == 0, r.output
        return np.load(tmp_path / out / "img_logits.npy")

    ada = predict("ada", "--model", "deeplabv3_batch_ap_resnet101", "--head", "adaptive",
                  "--mask", str(tmp_path / "zeros.npy"))  # fmt: skip
    ref = predict("dense", "--model", "deeplabv3_resnet101", "--output-stride", "8")
    assert ref.shape == (19, 64, 128) and np.abs(ref).max() > 0.1
    assert np.abs(ada - ref).max() < 1e-4

    Image.fromarray(np.zeros((1024, 2048, 3), np.uint8)).save(tmp_path / "big.png")
    np.save(tmp_path / "ones.npy", np.ones((128, 256), np.uint8))
    r = CliRunner().invoke(main, ["macs", "--model", "deeplabv3_batch_ap_resnet101", "--head",
                                  "adaptive", "--mask", str(tmp_path / "ones.npy"), "--image",
                                  str(tmp_path / "big.png"), "--json"])  # fmt: skip
    assert r.exit_code == 0, r.output
    got = json.loads(r.output)
    dense16 = count_dense("deeplabv3_resnet101", 16, 1024, 2048)
    assert got["head"] == "adaptive" and got["high_res_fraction"] == 0.0
    assert got["total_gmac"] <= 1.10 * dense16["total_gmac"]
    assert got["head_gmac"] == pytest.approx(dense16["head_gmac"], rel=1e-9)

    # bad masks: the file, what it holds, what was expected
    np.save(tmp_path / "shape.npy", np.zeros((4, 16), np.uint8))
    np.save(tmp_path / "values.npy", np.full((8, 16), 3, np.uint8))
    np.save(tmp_path / "blocks.npy", np.eye(8, 16, dtype=np.uint8))
    (tmp_path / "junk.npy").write_bytes(b"not numpy")
    for name, said in [("shape", "shape (4, 16), expected (8, 16) for a 64×128 input"),
                       ("values", "values [3], expected 0 (OS8) and 1 (OS16) only"),
                       ("blocks", "block constraint"), ("junk", "not a readable .npy array")]:  # fmt: skip
        r = CliRunner().invoke(main, ["macs", "--model", "deeplabv3_batch_ap_resnet_tiny",
                                      "--mask", str(tmp_path / f"{name}.npy"), "--image",
                                      str(tmp_path / "img.png")])  # fmt: skip
        assert r.exit_code == 2 and said in r.output and f"{name}.npy" in r.output, r.output
        assert "Traceback" not in r.output
