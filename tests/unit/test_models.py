"""Dense DeepLabv3: architecture, names, weights, MAC counting and prediction."""

import os
import re

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from cadist.cli import main
from cadist.errors import CheckpointError, ConfigError
from cadist.models.resnet import SPECS, ResNet
from cadist.nets.build import build_model
from cadist.nets.macs import MacCounter, count_dense
from cadist.nets.weights import load_backbone, load_weights, save_weights

JOBS = os.path.join(os.path.dirname(__file__), "..", "..", "jobs")


def _dilations(model, layer):
    return [(b.conv2.stride[0], b.conv2.dilation[0]) for b in getattr(model.backbone, layer)]


def test_resnet101_strides_and_dilations_follow_the_method():
    with torch.device("meta"):
        os16 = build_model("deeplabv3_resnet101", 16)
        os8 = build_model("deeplabv3_resnet101", 8)
    assert _dilations(os16, "layer2") == [(2, 1)] + [(1, 1)] * 3
    assert _dilations(os16, "layer3") == [(2, 1)] + [(1, 1)] * 22
    assert _dilations(os16, "layer4") == [(1, 1), (1, 2), (1, 2)]
    assert _dilations(os8, "layer3") == [(1, 1)] + [(1, 2)] * 22
    assert _dilations(os8, "layer4") == [(1, 2), (1, 4), (1, 4)]
    assert os8.backbone.layer3[0].downsample[0].stride == (1, 1)
    assert os16.backbone.layer3[0].downsample[0].stride == (2, 2)
    aspp8 = [os8.classifier.classifier[0].convs[i][0].dilation[0] for i in (1, 2, 3)]
    aspp16 = [os16.classifier.classifier[0].convs[i][0].dilation[0] for i in (1, 2, 3)]
    assert aspp8 == [12, 24, 36] and aspp16 == [6, 12, 18]
    bb_bn = [m.momentum for m in os8.backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    head_bn = [m.momentum for m in os8.classifier.modules() if isinstance(m, nn.BatchNorm2d)]
    assert set(bb_bn) == {0.01} and set(head_bn) == {0.1}
    drop = [m.p for m in os8.modules() if isinstance(m, nn.Dropout)]
    assert drop == [0.1]
    assert os8.classifier.classifier[4].bias is not None
    assert sum(p.numel() for p in os8.parameters()) == 58_630_483


@pytest.mark.parametrize("os_", [8, 16])
def test_shapes_at_both_output_strides(os_):
    m = build_model("deeplabv3_resnet_tiny", os_).eval()
    x = torch.randn(2, 3, 64, 128)
    with torch.no_grad():
        assert m.backbone(x).shape == (2, SPECS["resnet_tiny"].out_channels, 64 // os_, 128 // os_)
        assert m(x).shape == (2, 19, 64, 128)


def test_unknown_model_and_stride_are_config_errors():
    with pytest.raises(ConfigError, match="deeplabv3_resnet101"):
        build_model("deeplabv3_resnet152")
    with pytest.raises(ConfigError, match="expected one of 8, 16"):
        build_model("deeplabv3_resnet_tiny", 4)


def _torchvision_resnet_state(blocks, width=64, fc=1000):
    """Names and shapes of a torchvision ResNet state dict, written from torchvision's naming rules."""
    sd = {"conv1.weight": (width, 3, 7, 7)}

    def bn(prefix, c):
        sd.update(
            {
                f"{prefix}.weight": (c,),
                f"{prefix}.bias": (c,),
                f"{prefix}.running_mean": (c,),
                f"{prefix}.running_var": (c,),
                f"{prefix}.num_batches_tracked": (),
            }
        )

    bn("bn1", width)
    cin = width
    for k, n in enumerate(blocks, start=1):
        w = width * 2 ** (k - 1)
        for i in range(n):
            p = f"layer{k}.{i}"
            sd[f"{p}.conv1.weight"] = (w, cin, 1, 1)
            bn(f"{p}.bn1", w)
            sd[f"{p}.conv2.weight"] = (w, w, 3, 3)
            bn(f"{p}.bn2", w)
            sd[f"{p}.conv3.weight"] = (4 * w, w, 1, 1)
            bn(f"{p}.bn3", 4 * w)
            if i == 0:
                sd[f"{p}.downsample.0.weight"] = (4 * w, cin, 1, 1)
                bn(f"{p}.downsample.1", 4 * w)
            cin = 4 * w
    sd["fc.weight"], sd["fc.bias"] = (fc, cin), (fc,)
    g = torch.Generator().manual_seed(0)
    return {k: (torch.tensor(7) if s == () else torch.randn(s, generator=g)) for k, s in sd.items()}


def test_backbone_loads_a_torchvision_layout_resnet(tmp_path):
    sd = _torchvision_resnet_state((3, 4, 6, 3))
    torch.save(sd, tmp_path / "resnet50.pth")
    m = build_model("deeplabv3_resnet50", 8)
    load_backbone(m, tmp_path / "resnet50.pth")
    own = m.backbone.state_dict()
    assert len(own) == len(sd) - 2
    for k, v in own.items():
        assert torch.equal(v, sd[k]), k
    # a ResNet-50 file cannot initialise a ResNet-101
    with pytest.raises(CheckpointError, match=r"missing backbone\.|missing layer3\.6"):
        load_backbone(build_model("deeplabv3_resnet101", 8), tmp_path / "resnet50.pth")


def test_reference_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    src = build_model("deeplabv3_resnet_tiny", 16).eval()
    for m in src.modules():  # non-trivial running statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    ckpt = {
        "cur_itrs": 30000,
        "model_state": src.state_dict(),
        "best_score": 0.776,
        "optimizer_state": {"state": {}, "param_groups": [{"lr": 0.01, "momentum": 0.9}]},
        "scheduler_state": {"last_epoch": 30000},
    }
    torch.save(ckpt, tmp_path / "best_deeplabv3_resnet_tiny_cityscapes_os16.pth")
    dst = build_model("deeplabv3_resnet_tiny", 16)
    meta = load_weights(dst, tmp_path / "best_deeplabv3_resnet_tiny_cityscapes_os16.pth")
    assert meta == {"cur_itrs": 30000, "best_score": 0.776}
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(src(x), dst.eval()(x))
    # torchvision's DeepLabv3 layout: one nesting level less, plus an aux head
    tv = {
        (k[len("classifier.") :] if k.startswith("classifier.") else k): v
        for k, v in src.state_dict().items()
    }
    tv["aux_classifier.0.weight"] = torch.zeros(1)
    torch.save(tv, tmp_path / "tv.pth")
    third = build_model("deeplabv3_resnet_tiny", 16)
    load_weights(third, tmp_path / "tv.pth")
    assert torch.equal(
        third.state_dict()["classifier.classifier.4.bias"], src.classifier.classifier[4].bias
    )
    # cadist's own export
    save_weights(src, tmp_path / "export.pt", model="deeplabv3_resnet_tiny", output_stride=16)
    fourth = build_model("deeplabv3_resnet_tiny", 16)
    assert (
        load_weights(fourth, tmp_path / "export.pt", expect_name="deeplabv3_resnet_tiny")[
            "output_stride"
        ]
        == 16
    )
    with pytest.raises(CheckpointError, match="holds weights of deeplabv3_resnet_tiny"):
        load_weights(
            build_model("deeplabv3_resnet50", 16),
            tmp_path / "export.pt",
            expect_name="deeplabv3_resnet50",
        )


def test_bad_checkpoints_give_their_errors(tmp_path):
    m = build_model("deeplabv3_resnet_tiny", 8)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_weights(m, tmp_path / "none.pth")
    torch.save({"model_state": m.state_dict()}, tmp_path / "ok.pth")
    data = (tmp_path / "ok.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_weights(m, tmp_path / "cut.pth")
    (tmp_path / "text.pth").write_text("hello")
    with pytest.raises(CheckpointError, match="cannot be read|not a PyTorch"):
        load_weights(m, tmp_path / "text.pth")
    torch.save({"model_state": m.state_dict(), "obj": _Opaque()}, tmp_path / "pickle.pth")
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_weights(m, tmp_path / "pickle.pth")
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "foreign.pth")
    with pytest.raises(CheckpointError, match="not a model checkpoint"):
        load_weights(m, tmp_path / "foreign.pth")
    other = build_model("deeplabv3_resnet50", 8)
    torch.save({"model_state": other.state_dict()}, tmp_path / "r50.pth")
    with pytest.raises(CheckpointError) as e:
        load_weights(m, tmp_path / "r50.pth")
    msg = str(e.value)
    assert (
        "unexpected backbone.layer1.1.conv1.weight" in msg
        and "shapes differ: backbone.conv1.weight: file (64, 3, 7, 7) vs model (16, 3, 7, 7)" in msg
    )
    assert "\n" not in msg


class _Opaque:
    pass


# -- MACs -------------------------------------------------------------------------------------
def test_reference_mac_values_at_1024x2048():
    os8 = count_dense("deeplabv3_resnet101", 8, 1024, 2048)
    os16 = count_dense("deeplabv3_resnet101", 16, 1024, 2048)
    assert os8["backbone_gmac"] == pytest.approx(1423.58, abs=0.005)
    assert os16["backbone_gmac"] == pytest.approx(416.76, abs=0.005)
    assert os8["head_gmac"] == pytest.approx(511.48, abs=0.005)
    assert os16["head_gmac"] == pytest.approx(127.87, abs=0.005)
    assert os8["backbone_conv_gmac"] == pytest.approx(1417.98, abs=0.005)
    assert os16["backbone_conv_gmac"] == pytest.approx(414.57, abs=0.005)
    with torch.device("meta"):
        os32 = ResNet(SPECS["resnet101"], 32).eval()
        x = torch.empty(1, 3, 1024, 2048)
    with MacCounter(b=os32) as c:
        os32(x)
    assert c.counts["b"].gmac() == pytest.approx(327.99, abs=0.005)


@pytest.mark.parametrize(
    "name,os_",
    [("deeplabv3_resnet50", 8), ("deeplabv3_resnet_tiny", 16), ("deeplabv3_resnet101", 16)],
)
def test_conv_macs_agree_with_torch_flop_counter(name, os_):
    with torch.device("meta"):
        m = build_model(name, os_).eval()
        x = torch.empty(1, 3, 96, 160)
    fc = FlopCounterMode(display=False)
    with torch.no_grad(), fc, MacCounter(b=m.backbone, h=m.classifier) as c:
        m(x)
    conv = c.counts["b"].by_kind["conv"] + c.counts["h"].by_kind["conv"]
    bias = 19 * (96 // os_) * (160 // os_)  # the one biased conv; FlopCounterMode ignores biases
    flops = fc.get_flop_counts()["Global"]
    assert set(flops) == {torch.ops.aten.convolution}
    assert 2 * (conv - bias) == flops[torch.ops.aten.convolution]


def test_macs_scale_with_input_size():
    a = count_dense("deeplabv3_resnet50", 16, 256, 512)
    b = count_dense("deeplabv3_resnet50", 16, 512, 1024)
    c = count_dense("deeplabv3_resnet50", 16, 256, 1024)
    assert b["backbone_gmac"] == pytest.approx(4 * a["backbone_gmac"], rel=1e-6)
    assert c["backbone_gmac"] == pytest.approx(2 * a["backbone_gmac"], rel=1e-6)
    # the head's image-pooling 1×1 conv runs on a 1×1 map whatever the input size
    assert 3.99 < b["head_gmac"] / a["head_gmac"] < 4.0
    d = count_dense("deeplabv3_resnet50", 8, 256, 512)
    assert d["backbone_gmac"] > 2.5 * a["backbone_gmac"]


def test_macs_cli_json():
    r = CliRunner().invoke(
        main,
        [
            "macs",
            "--model",
            "deeplabv3_resnet101",
            "--output-stride",
            "16",
            "--height",
            "1024",
            "--width",
            "2048",
            "--json",
        ],
    )
    assert r.exit_code == 0, r.output
    import json

    d = json.loads(r.output)
    assert d["input_hw"] == [1024, 2048] and d["backbone_gmac"] == pytest.approx(416.76, abs=0.005)
    assert d["total_gmac"] == pytest.approx(d["backbone_gmac"] + d["head_gmac"], abs=1e-3)


# -- predict ----------------------------------------------------------------------------------
def test_predict_writes_colours_overlay_and_logits(tmp_path):
    torch.manual_seed(1)
    m = build_model("deeplabv3_resnet_tiny", 8).eval()
    save_weights(m, tmp_path / "w.pt", model="deeplabv3_resnet_tiny", output_stride=8)
    img = np.random.default_rng(0).integers(0, 256, (48, 80, 3)).astype(np.uint8)
    Image.fromarray(img).save(tmp_path / "street.png")
    r = CliRunner().invoke(
        main,
        [
            "predict",
            "--model",
            "deeplabv3_resnet_tiny",
            "--output-stride",
            "8",
            "--ckpt",
            str(tmp_path / "w.pt"),
            "--image",
            str(tmp_path / "street.png"),
            "--out",
            str(tmp_path / "out"),
            "--save-logits",
            "--device",
            "cpu",
        ],
    )
    assert r.exit_code == 0, r.output
    logits = np.load(tmp_path / "out" / "street_logits.npy")
    assert logits.dtype == np.float32 and logits.shape == (19, 48, 80)
    x = (
        torch.from_numpy(img).permute(2, 0, 1).float() / 255
        - torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    ) / torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    with torch.no_grad():
        ref = m(x[None])[0].numpy()
    assert np.allclose(logits, ref, atol=1e-5)
    from cadist.data.cityscapes import PALETTE

    pred = np.asarray(Image.open(tmp_path / "out" / "street_pred.png"))
    assert np.array_equal(pred, PALETTE[logits.argmax(0)])
    over = np.asarray(Image.open(tmp_path / "out" / "street_overlay.png")).astype(int)
    assert np.abs(over - (img.astype(int) + pred.astype(int)) / 2).max() <= 1
    r = CliRunner().invoke(
        main,
        [
            "predict",
            "--model",
            "deeplabv3_resnet50",
            "--ckpt",
            str(tmp_path / "w.pt"),
            "--image",
            str(tmp_path / "street.png"),
            "--out",
            str(tmp_path / "o2"),
        ],
    )
    assert r.exit_code == 2 and re.match(
        r"error: .*holds weights of deeplabv3_resnet_tiny", r.output
    )


def test_predict_a_folder_in_the_cityscapes_benchmark_format(tmp_path):
    """`--image leftImg8bit/val --format labelids`: `<city>/<stem>_labelIds.png` for every image,
    the colour prediction's classes as Cityscapes labelIds; scored against gtFine as the benchmark
    scores (labelIds → trainIds) they give `cadist eval`'s mIoU of the same weights; a rerun with
    --skip-existing writes nothing; a missing path or an empty folder is one error."""
    import json

    from cadist.data.cityscapes import PALETTE, label_lut
    from cadist.eval.miou import ConfusionMatrix

    from ..conftest import tiny_shards

    _, val = tiny_shards(tmp_path, num_train=2, num_val=4, seed=8)
    torch.manual_seed(3)
    m = build_model("deeplabv3_resnet_tiny", 16).eval()
    save_weights(m, tmp_path / "w.pt", model="deeplabv3_resnet_tiny", output_stride=16)
    images = tmp_path / "cs" / "leftImg8bit" / "val"
    args = ["predict", "--ckpt", str(tmp_path / "w.pt"), "--image", str(images), "--device", "cpu"]
    r = CliRunner().invoke(main, [*args, "--format", "labelids", "--out", str(tmp_path / "sub")])
    assert r.exit_code == 0, r.output
    colour = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "col")])
    assert colour.exit_code == 0, colour.output
    written = sorted((tmp_path / "sub").rglob("*.png"))
    sources = sorted(images.rglob("*_leftImg8bit.png"))
    assert len(written) == len(sources) == 4
    lut, cm = label_lut(), ConfusionMatrix(19)
    for src in sources:
        rel = src.relative_to(images).parent / f"{src.stem}_labelIds.png"
        ids = np.asarray(Image.open(tmp_path / "sub" / rel))
        assert ids.dtype == np.uint8 and ids.shape == (64, 128)
        pred = lut[ids]
        assert (pred < 19).all()  # every pixel one of the 19 classes' labelIds
        col = np.asarray(Image.open(tmp_path / "col" / rel.parent / f"{src.stem}_pred.png"))
        assert np.array_equal(PALETTE[pred], col)  # the same classes as the colour output
        gt_name = src.name.replace("_leftImg8bit.png", "_gtFine_labelIds.png")
        gt = lut[
            np.asarray(Image.open(tmp_path / "cs" / "gtFine" / "val" / src.parent.name / gt_name))
        ]
        cm.update(torch.from_numpy(pred.astype(np.int64)), torch.from_numpy(gt.astype(np.int64)))
    ev = CliRunner().invoke(
        main,
        ["eval", os.path.join(JOBS, "demo.yaml"), "--ckpt", str(tmp_path / "w.pt"),
         "--device", "cpu", "--set", f"data.val_shards={val}", "--set", "data.num_workers=0",
         "--set", "model.name=deeplabv3_resnet_tiny", "--set", "model.output_stride=16"],
    )  # fmt: skip
    assert ev.exit_code == 0, ev.output
    assert cm.miou() == pytest.approx(json.loads(ev.stdout)["miou"], abs=1e-3)
    before = {p: p.stat().st_mtime_ns for p in written}
    again = CliRunner().invoke(
        main, [*args, "--format", "labelids", "--out", str(tmp_path / "sub"), "--skip-existing"]
    )
    assert again.exit_code == 0 and "4 of 4 images had their outputs already" in again.output
    assert {p: p.stat().st_mtime_ns for p in written} == before
    # predictions written inside the input folder are not read back as inputs
    inside = CliRunner().invoke(main, [*args, "--format", "labelids", "--out", str(images / "p")])
    assert inside.exit_code == 0, inside.output
    again = CliRunner().invoke(main, [*args, "--format", "labelids", "--out", str(images / "p")])
    assert len(again.stdout.splitlines()) == 4 and "_labelIds_labelIds" not in again.stdout
    (tmp_path / "empty").mkdir()
    for bad, msg in ((tmp_path / "empty", "a folder with no .png/.jpg/.jpeg image"),
                     (tmp_path / "nope.png", "no such file or folder")):  # fmt: skip
        r = CliRunner().invoke(
            main, ["predict", "--ckpt", str(tmp_path / "w.pt"), "--image", str(bad)]
        )
        assert r.exit_code != 0 and msg in r.output, r.output
