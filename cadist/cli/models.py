"""`cadist macs`, `cadist predict`, and the model options they share."""

from __future__ import annotations

from pathlib import Path

import click

from cadist.cli.app import _print_json, _tta_options, main
from cadist.errors import CadistError


def _model_options(f):
    from cadist.config.names import ALL_MODELS

    opts = [
        click.option(
            "--model",
            type=click.Choice(ALL_MODELS),
            help="Model name (as in the reference implementation); default: the one a cadist "
            "checkpoint (--ckpt) records, with its settings.",
        ),
        click.option(
            "--output-stride",
            default=16,
            show_default=True,
            type=click.Choice(["8", "16"]),
            help="Output stride of a dense model.",
        ),
        click.option(
            "--adaptive-mode",
            default="os8to16",
            show_default=True,
            type=click.Choice(["os8to16", "os8to32", "os16to32"]),
            help="Adaptive models: which stages adapt (method §4).",
        ),
        click.option(
            "--edge-threshold",
            default=0.15,
            show_default=True,
            type=float,
            help="Adaptive models: edge threshold τ (§6).",
        ),
        click.option(
            "--trimap-width",
            default=11,
            show_default=True,
            type=click.IntRange(1),
            help="Adaptive models: trimap width w (§6).",
        ),
        click.option(
            "--mask-variant",
            default="reference",
            show_default=True,
            type=click.Choice(["reference", "corrected"]),
            help="Adaptive models: the reference's edge mask or the corrected one.",
        ),
        click.option(
            "--head",
            default="dense",
            show_default=True,
            type=click.Choice(["dense", "adaptive"]),
            help="Adaptive models: the DeepLabv3 head on the dense map at the finest grid (the "
            "method's) or on the mixed-resolution elements, each at its own level.",
        ),
        click.option(
            "--mask-sampling",
            default="gumbel",
            show_default=True,
            type=click.Choice(["gumbel", "argmax"]),
            help="Learned-mask models: Gumbel noise at inference as the reference (§7.2), or the "
            "deterministic arg-max.",
        ),
        click.option(
            "--gumbel-tau",
            default=1.0,
            show_default=True,
            type=click.FloatRange(min=0, min_open=True),
            help="Learned-mask models: Gumbel-softmax temperature (§7.2).",
        ),
        click.option(
            "--seed",
            default=0,
            show_default=True,
            type=int,
            help="Learned-mask models: seed of the Gumbel noise.",
        ),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def _from_checkpoint(ckpt: str | None, opts: dict) -> tuple[Path | None, dict]:
    """Resolve --ckpt (file, checkpoint folder, MLflow URI) and take --model and every model
    option left at its default from what a cadist export records (its job's model section)."""
    from click.core import ParameterSource

    from cadist.tracking.sources import RECORDED, recorded_model, resolve_weights

    path = resolve_weights(ckpt) if ckpt else None
    name, config = recorded_model(path) if path else (None, {})
    opts = dict(opts)
    if opts["model"] is None:
        if not name:
            raise CadistError(
                "--model is needed"
                + (
                    f": {ckpt} does not record its model (cadist's exports and training "
                    f"checkpoints do; a foreign weights file needs --model)"
                    if ckpt
                    else ""
                )
            )
        opts["model"] = name
    if name == opts["model"]:
        ctx = click.get_current_context()
        for key in RECORDED:
            if key in config and ctx.get_parameter_source(key) is ParameterSource.DEFAULT:
                opts[key] = str(config[key]) if key == "output_stride" else config[key]
    return path, opts


def _build(model, output_stride, adaptive_mode, edge_threshold, trimap_width, mask_variant, **kw):
    """The model for prediction and counting; learned-mask models as their inference network."""
    import torch

    from cadist.nets.build import build_model

    torch.manual_seed(kw.get("seed", 0))  # the Gumbel noise of learned masks
    return build_model(
        model,
        int(output_stride),
        adaptive_mode=adaptive_mode,
        edge_threshold=edge_threshold,
        trimap_width=trimap_width,
        mask_variant=mask_variant,
        gumbel_tau=kw.get("gumbel_tau", 1.0),
        mask_sampling=kw.get("mask_sampling", "gumbel"),
        network="inference",
        head=kw.get("head", "dense"),
    )


@main.command("macs")
@_model_options
@click.option("--height", default=1024, show_default=True, type=click.IntRange(32))
@click.option("--width", default=2048, show_default=True, type=click.IntRange(32))
@click.option(
    "--image",
    type=click.Path(exists=True, dir_okay=False),
    help="Adaptive models: count for this image (its own size).",
)
@click.option("--shards", help="Adaptive models: count over these validation shards (mean ± std).")
@click.option("--limit", type=click.IntRange(1), help="With --shards: at most this many images.")
@click.option(
    "--ckpt",
    metavar="WEIGHTS",
    help="Learned-mask models (required): weights whose mask estimator decides the mask — a "
    "file, a checkpoint folder or an MLflow URI (runs:/<run_id>).",
)
@click.option(
    "--mask",
    "mask_file",
    type=click.Path(exists=True, dir_okay=False),
    help="Adaptive models: count with this pooling mask (.npy, uint8 (H/8, W/8), 0 = OS8, 1 = "
    "OS16, as `predict --save-mask` writes) for --image, or for --height × --width without one.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def macs_cmd(height, width, image, shards, limit, ckpt, mask_file, as_json, **opts):
    """Count multiply-adds per image under the method's counting rules (backbone, head, total).

    Adaptive models are counted per image, content-dependent: pass --image, --shards or --mask."""
    ckpt, opts = _from_checkpoint(ckpt, opts)
    model, output_stride, adaptive_mode = (
        opts["model"],
        opts["output_stride"],
        opts["adaptive_mode"],
    )
    from cadist.nets.build import is_adaptive, is_learned
    from cadist.nets.macs import count_dense

    if not is_adaptive(model):
        r = count_dense(model, int(output_stride), height, width)
        if as_json:
            _print_json(r)
            return
        click.echo(f"{model} OS{output_stride} at {height}×{width} (GMac per image)")
        click.echo(
            f"  backbone {r['backbone_gmac']:10.2f}   (convolutions only {r['backbone_conv_gmac']:.2f})"
        )
        click.echo(
            f"  head     {r['head_gmac']:10.2f}   (convolutions only {r['head_conv_gmac']:.2f})"
        )
        click.echo(f"  total    {r['total_gmac']:10.2f}")
        return
    from cadist.nets.stats import count_images

    if not image and not shards and not mask_file:
        raise CadistError(
            f"{model} is content-adaptive: its MACs depend on the image; pass --image "
            f"PNG, --shards SPEC or --mask FILE.npy"
        )
    if mask_file and shards:
        raise CadistError(
            "--mask is one image's mask: use it with --image (or alone), not --shards"
        )
    if is_learned(model) and not ckpt and not mask_file:
        raise CadistError(
            f"{model}: its mask comes from its trained mask estimator; pass --ckpt WEIGHTS"
        )
    net = _build(**opts)
    if ckpt:
        from cadist.nets.weights import load_weights

        load_weights(net, ckpt, expect_name=model)
    r = count_images(net.eval(), model, adaptive_mode, image=image, shards=shards, limit=limit,
                     mask_file=mask_file, size=(height, width))  # fmt: skip
    if as_json:
        _print_json(r)
        return
    n = r["num_images"]
    how = (
        f"learned mask, {opts['mask_sampling']}, τ={opts['gumbel_tau']}, seed {opts['seed']}"
        if is_learned(model)
        else f"{adaptive_mode}, τ={opts['edge_threshold']}, trimap {opts['trimap_width']}, "
        f"{opts['mask_variant']} mask"
    )
    click.echo(
        f"{model} ({how}) over {n} image{'s' if n > 1 else ''} at {r['input_hw'][0]}×{r['input_hw'][1]}"
    )
    click.echo(
        f"  high-res fraction p   {r['high_res_fraction']:.4f} ± {r['high_res_fraction_std']:.4f}"
    )
    click.echo(
        f"  backbone (method)     {r['backbone_gmac']:9.2f} ± {r['backbone_gmac_std']:.2f} GMac"
    )
    click.echo(
        f"  backbone (computed)   {r['backbone_gmac_actual']:9.2f} ± {r['backbone_gmac_actual_std']:.2f} GMac"
    )
    extra = (
        f"mask estimator {r['mask_estimator_gmac']:.2f} GMac (in the backbone)"
        if is_learned(model)
        else f"edge gradients {r['edge_gmac']:.4f} GMac"
    )
    click.echo(
        f"  head ({r['head']:8})      {r['head_gmac']:9.2f} ± {r['head_gmac_std']:.2f} GMac; {extra}"
    )
    click.echo(f"  total (method)        {r['total_gmac']:9.2f} ± {r['total_gmac_std']:.2f} GMac")


@main.command("predict")
@_model_options
@click.option(
    "--ckpt",
    required=True,
    metavar="WEIGHTS",
    help="Reference checkpoint, torchvision/plain state dict, cadist export or checkpoint folder, "
    "or an MLflow URI: runs:/<run_id> (its best weights), runs:/<run_id>/checkpoints/last.pt, "
    "models:/<name>/<version> (store: $MLFLOW_TRACKING_URI, else ./mlflow.db).",
)
@click.option(
    "--image",
    "images",
    required=True,
    multiple=True,
    type=click.Path(),
    help="Image file, or a folder: every .png/.jpg/.jpeg under it (outputs keep its subfolders, "
    "e.g. leftImg8bit/test → <city>/…); repeat for several.",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["colour", "labelids"]),
    default="colour",
    show_default=True,
    help="colour: <stem>_pred.png (Cityscapes colours) and <stem>_overlay.png; labelids: "
    "<stem>_labelIds.png only, uint8 Cityscapes labelIds — the files the Cityscapes benchmark "
    "(cityscapesscripts' evaluation, the test server) takes.",
)
@click.option(
    "--skip-existing",
    is_flag=True,
    help="Leave out images whose outputs are all there already (a rerun after an interruption).",
)
@click.option(
    "--out",
    default="predictions",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Folder for the outputs (created).",
)
@click.option(
    "--save-logits", is_flag=True, help="Also write <stem>_logits.npy, float32 (C, H, W)."
)
@click.option(
    "--save-mask",
    is_flag=True,
    help="Adaptive models: also write <stem>_mask.npy, uint8 (H/8, W/8), 0 = OS8, 1 = OS16.",
)
@click.option(
    "--mask",
    "mask_file",
    type=click.Path(exists=True, dir_okay=False),
    help="Adaptive models, one image: use this pooling mask (.npy, uint8 (H/8, W/8), 0 = OS8, "
    "1 = OS16, as --save-mask writes) instead of computing one.",
)
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:1 … or auto.")
@click.option(
    "--precision",
    type=click.Choice(["fp32", "bf16"]),
    default="fp32",
    show_default=True,
    help="Weights and activations; the edge mask is always computed in float32.",
)
@_tta_options
def predict_cmd(
    ckpt,
    images,
    fmt,
    skip_existing,
    out,
    save_logits,
    save_mask,
    mask_file,
    device,
    precision,
    scales,
    flip,
    window,
    stride,
    **opts,
):
    """Predict classes for images: <stem>_pred.png (Cityscapes colours), <stem>_overlay.png — or
    with --format labelids <stem>_labelIds.png for the Cityscapes benchmark. With
    --scales/--flip/--window, --save-logits writes the mean probabilities (<stem>_probs.npy) and
    --save-mask each unmirrored pass's mask (<stem>_mask_<h>x<w>.npy)."""
    import torch

    from cadist.config.passes import Augmentation
    from cadist.eval.predict import image_list, write_prediction
    from cadist.nets.build import is_adaptive
    from cadist.nets.fold import fold_batchnorm
    from cadist.nets.weights import load_weights

    todo = image_list(images, out)  # a missing file or an empty folder: before the model is built
    tta = Augmentation.parse(scales or "1", bool(flip), window, stride)
    ckpt, opts = _from_checkpoint(ckpt, opts)
    model = opts["model"]
    if save_mask and not is_adaptive(model):
        raise CadistError(f"--save-mask: {model} is a dense model and has no pooling mask")
    if mask_file and not is_adaptive(model):
        raise CadistError(f"--mask: {model} is a dense model and takes no pooling mask")
    if mask_file and len(todo) != 1:
        raise CadistError(f"--mask is one image's mask; got {len(todo)} images (pass one --image)")
    if mask_file and tta is not None and not tta.plain:
        raise CadistError("--mask fits one plain pass: leave out --scales, --flip and --window")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    net = _build(**opts)
    load_weights(net, ckpt, expect_name=model)
    # inference form: BN folded into the convolutions (same function, fewer passes)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    net = fold_batchnorm(net).to(device, dtype)
    done = 0
    for image, sub in todo:
        dest = Path(out) / sub
        if skip_existing and _outputs_exist(dest, image, fmt, save_logits, save_mask, tta):
            done += 1
            continue
        paths = write_prediction(
            net, image, dest, device, save_logits, save_mask, tta, fmt, mask_file
        )
        click.echo(" ".join(str(p) for p in paths.values()))
    if done:
        click.echo(
            f"{done} of {len(todo)} images had their outputs already (--skip-existing)", err=True
        )


def _outputs_exist(dest, image, fmt, save_logits, save_mask, tta) -> bool:
    """Whether every file `write_prediction` would write for `image` is in `dest` (bar an
    augmented prediction's masks, one per pass)."""
    names = ["labelIds.png"] if fmt == "labelids" else ["pred.png", "overlay.png"]
    plain = tta is None or tta.plain
    if save_logits:
        names.append("logits.npy" if plain else "probs.npy")
    if save_mask and plain:
        names.append("mask.npy")
    return all((dest / f"{image.stem}_{n}").is_file() for n in names)
