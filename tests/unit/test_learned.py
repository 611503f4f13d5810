"""Learned-mask mode (method §7): the weight-sharing training network (E4), the irregular inference
network (E5), Gumbel straight-through sampling, the loss, parameter groups, checkpoint layouts
(§7.6), MAC counting (§10.3) and the CLI."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from cadist.adaptive.learned import inference_state, sample_mask, up2
from cadist.cli import main
from cadist.models.resnet import ResNet
from cadist.nets.build import build_model
from cadist.nets.macs import count_adaptive
from cadist.nets.weights import load_backbone, load_weights, save_weights
from cadist.train.loop import make_optimizer, training_loss

from .test_adaptive import _randomise_bn

NAME = "deeplabv3_ad_resnet_tiny"


def _branch(sd, keep, drop):
    """The state dict of one branch under dense names (stem, layer1/2, that branch, head)."""
    out = {}
    for k, v in sd.items():
        if drop in k or "mask_estimator" in k:
            continue
        out[k.replace(keep, "")] = v
    return out


@pytest.fixture(scope="module")
def trained():
    """A training network whose two branches have different BN running statistics."""
    torch.manual_seed(0)
    net = build_model(NAME).eval()
    _randomise_bn(net)
    return net


def test_e4_training_network_equals_dense_os8_and_os16(trained):
    sd = trained.state_dict()
    d8 = build_model("deeplabv3_resnet_tiny", 8).eval()
    d8.load_state_dict(_branch(sd, "_high_res", "_low_res"))
    d16 = ResNet(trained.backbone.spec, 16).eval()
    low = _branch(sd, "_low_res", "_high_res")
    d16.load_state_dict({k[9:]: v for k, v in low.items() if k.startswith("backbone.")})
    x = torch.randn(2, 3, 64, 128)
    with torch.no_grad():
        assert torch.allclose(trained(x, mask=torch.zeros(2, 4, 8)), d8(x), atol=1e-5)
        mixed = trained.backbone(x, torch.ones(2, 4, 8))
        assert torch.allclose(mixed, up2(d16(x)), atol=1e-5)
        # a mixed mask takes each OS8 cell from its branch
        m = (torch.rand(2, 4, 8) < 0.5).float()
        f = trained.backbone(x, m)
        hi = d8.backbone(x)
        sel = up2(m)[:, None].bool().expand_as(f)
        assert torch.allclose(f[sel], up2(d16(x))[sel], atol=1e-5)
        assert torch.allclose(f[~sel], hi[~sel], atol=1e-5)


def test_e5_inference_network_equals_training_network_only_for_all_low(trained):
    inf = build_model(NAME, network="inference").eval()
    inf.load_state_dict(inference_state(trained.state_dict()))
    x = torch.randn(2, 3, 64, 128)
    with torch.no_grad():
        low_t = trained(x, mask=torch.ones(2, 4, 8))
        low_i = inf(x, mask=torch.ones(2, 8, 16, dtype=torch.long))
        assert (low_t - low_i).abs().max() <= 1e-5 * low_t.abs().max()
        hi_t = trained(x, mask=torch.zeros(2, 4, 8))
        hi_i = inf(x, mask=torch.zeros(2, 8, 16, dtype=torch.long))
        # the inference network uses the low branch's BN statistics everywhere
        assert (hi_t - hi_i).abs().max() > 1e-2 * hi_t.abs().max()


def test_branches_share_weights_but_not_running_statistics():
    torch.manual_seed(0)
    net = build_model(NAME).train()
    b = net.backbone
    assert b.layer3_high_res[0].conv2.weight is b.layer3_low_res[0].conv2.weight
    assert b.layer4_high_res[0].bn1.weight is b.layer4_low_res[0].bn1.weight
    assert b.layer3_high_res[0].bn1.running_mean is not b.layer3_low_res[0].bn1.running_mean
    opt, _ = make_optimizer(net, type("T", (), dict(lr_backbone=0.01, lr_head=0.1, momentum=0.9,
                                                    weight_decay=1e-4, iterations=10, poly_power=0.9,
                                                    min_lr=1e-6, lr_mask_estimator=0.001))())  # fmt: skip
    assert [g["name"] for g in opt.param_groups] == ["backbone", "head", "mask_estimator"]
    assert [g["lr"] for g in opt.param_groups] == [0.01, 0.1, 0.001]
    n_unique = len({id(p) for p in net.parameters()})
    assert sum(len(g["params"]) for g in opt.param_groups) == n_unique
    x, y = torch.randn(2, 3, 64, 64), torch.randint(0, 19, (2, 64, 64))
    loss = training_loss(net, net(x), y)
    loss.backward()
    opt.step()
    sd = net.state_dict()
    for k in sd:
        if "layer3_high_res" in k and "running" not in k and "num_batches" not in k:
            assert torch.equal(sd[k], sd[k.replace("high", "low")]), k
    hi, lo = b.layer3_high_res[0].bn2.running_mean, b.layer3_low_res[0].bn2.running_mean
    assert not torch.allclose(hi, lo)  # each branch normalises its own activations


def test_gumbel_straight_through_sample():
    torch.manual_seed(0)
    z = torch.zeros(4000, 2, 3, 3)
    z[:, 1] = np.log(3.0)  # P(low) = 3/4
    z.requires_grad_(True)
    m = sample_mask(z, tau=1.0)
    assert set(m.detach().unique().tolist()) == {0.0, 1.0}
    assert torch.equal(m.detach().sum(1), torch.ones(4000, 3, 3))
    assert abs(float(m[:, 1].detach().mean()) - 0.75) < 0.01
    m[:, 1].sum().backward()  # the gradient is the soft sample's
    assert z.grad.abs().sum() > 0 and torch.allclose(z.grad[:, 0], -z.grad[:, 1], atol=1e-6)
    am = sample_mask(z.detach(), sampling="argmax")
    assert torch.equal(am[:, 1], torch.ones(4000, 3, 3))


def test_loss_reaches_the_mask_estimator_through_the_straight_through_gradient():
    torch.manual_seed(0)
    net = build_model(NAME, target_low_res=0.5).train()
    x, y = torch.randn(2, 3, 64, 64), torch.randint(0, 19, (2, 64, 64))
    logits = net(x)
    ce = torch.nn.functional.cross_entropy(logits, y, ignore_index=255)
    est = net.backbone.mask_estimator[0].weight
    (g_ce,) = torch.autograd.grad(ce, est, retain_graph=True)
    assert g_ce.abs().sum() > 0  # unlike training the irregular network directly (§7.7)
    total = training_loss(net, logits, y)
    assert float((total - ce).detach()) == pytest.approx(float(net.aux_loss.detach()))
    assert 0 <= float(net.aux_loss.detach()) <= 0.25
    assert net.last_mask.shape == (2, 8, 8) and net.last_mask.dtype == torch.long


def test_reference_checkpoint_layout_loads_into_both_networks(tmp_path, trained):
    sd = trained.state_dict()
    names = set(sd)
    assert "backbone.layer3_high_res.0.conv2.weight" in names
    assert "backbone.layer4_low_res.0.downsample.1.running_var" in names
    assert {k for k in names if k.startswith("backbone.mask_estimator.")} == {
        f"backbone.mask_estimator.{i}.{p}" for i in (0, 2, 5, 7) for p in ("weight", "bias")
    }
    ref = dict(sd)
    ref["backbone.fc.weight"], ref["backbone.fc.bias"] = torch.zeros(10, 512), torch.zeros(10)
    torch.save({"model_state": ref, "cur_itrs": 30000, "best_score": 0.7}, tmp_path / "ref.pth")
    tr = build_model(NAME).eval()
    assert load_weights(tr, tmp_path / "ref.pth")["best_score"] == 0.7
    assert all(torch.equal(tr.state_dict()[k], v) for k, v in sd.items())
    inf = build_model(NAME, network="inference").eval()
    load_weights(inf, tmp_path / "ref.pth")
    expect = inference_state(sd)
    assert set(inf.state_dict()) == set(expect)
    assert all(torch.equal(inf.state_dict()[k], v) for k, v in expect.items())


def test_imagenet_backbone_initialises_both_branches(tmp_path):
    torch.manual_seed(3)
    src = ResNet(build_model(NAME).backbone.spec, 8)
    _randomise_bn(src)
    torch.save(src.state_dict(), tmp_path / "imagenet.pth")
    net = build_model(NAME)
    est = net.backbone.mask_estimator[0].weight.clone()
    load_backbone(net, tmp_path / "imagenet.pth")
    b = net.backbone
    for branch in (b.layer3_high_res, b.layer3_low_res):
        assert torch.equal(branch[0].conv1.weight, src.layer3[0].conv1.weight)
        assert torch.equal(branch[0].bn1.running_var, src.layer3[0].bn1.running_var)
    assert torch.equal(b.mask_estimator[0].weight, est)
    assert b.layer3_high_res[0].conv1.weight is b.layer3_low_res[0].conv1.weight  # still tied


def test_macs_include_the_mask_estimator():
    full = torch.zeros(1, 128, 256, dtype=torch.long)
    hi = count_adaptive("deeplabv3_ad_resnet101", full, 1024, 2048)
    lo = count_adaptive("deeplabv3_ad_resnet101", full + 1, 1024, 2048)
    assert hi["mask_estimator_gmac"] == pytest.approx(22.07, abs=0.005)  # §10.3
    assert hi["backbone_gmac"] == pytest.approx(1423.58 + hi["mask_estimator_gmac"], abs=0.01)
    assert lo["backbone_gmac"] == pytest.approx(431.25 + lo["mask_estimator_gmac"], abs=0.01)
    assert "edge_gmac" not in hi


def test_predict_and_macs_cli_for_the_learned_model(tmp_path, trained):
    save_weights(trained, tmp_path / "learned.pt", model=NAME)
    img = np.random.default_rng(0).integers(0, 256, (64, 128, 3)).astype(np.uint8)
    Image.fromarray(img).save(tmp_path / "street.png")
    common = ["--model", NAME, "--mask-sampling", "argmax"]
    r = CliRunner().invoke(
        main,
        ["predict", *common, "--ckpt", str(tmp_path / "learned.pt"), "--image",
         str(tmp_path / "street.png"), "--out", str(tmp_path / "o"), "--save-mask", "--device", "cpu"],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    mask = np.load(tmp_path / "o" / "street_mask.npy")
    inf = build_model(NAME, network="inference", mask_sampling="argmax").eval()
    inf.load_state_dict(inference_state(trained.state_dict()))
    x = (torch.from_numpy(img).permute(2, 0, 1).float() / 255)[None]
    x = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor(
        [0.229, 0.224, 0.225]
    ).view(1, 3, 1, 1)
    with torch.no_grad():
        inf(x)
    assert mask.shape == (8, 16) and np.array_equal(mask, inf.last_mask[0].numpy())
    assert np.array_equal(mask[::2, ::2].repeat(2, 0).repeat(2, 1), mask)  # 2×2 blocks
    r = CliRunner().invoke(main, ["macs", *common, "--image", str(tmp_path / "street.png")])
    assert r.exit_code == 2 and "--ckpt" in r.output
    r = CliRunner().invoke(
        main,
        ["macs", *common, "--image", str(tmp_path / "street.png"), "--ckpt",
         str(tmp_path / "learned.pt"), "--json"],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["high_res_fraction"] == pytest.approx(float((mask == 0).mean()))
    assert d["mask_estimator_gmac"] > 0
