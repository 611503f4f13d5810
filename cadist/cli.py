"""The `cadist` command line. Subcommands import their heavy modules lazily, so `--help` is instant.

A `CadistError` (a user's mistake) is printed as one `error:` line with exit code 2; anything else
is a bug and keeps its traceback.
"""

from __future__ import annotations

import json
import sys

import click

from cadist import __version__
from cadist.errors import CadistError


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except CadistError as exn:
            click.echo(f"error: {exn}", err=True)
            sys.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="cadist")
def main() -> None:
    """Content-adaptive downsampling for segmentation CNNs, trained with Ray + DeepSpeed."""


# -- data ---------------------------------------------------------------------------------------
@main.group(cls=_Group)
def data() -> None:
    """Generate datasets in the Cityscapes layout."""


@data.command("synth")
@click.option(
    "--out", required=True, type=click.Path(file_okay=False), help="Root of the tree to write."
)
@click.option("--num-train", default=60, show_default=True, type=click.IntRange(0))
@click.option("--num-val", default=20, show_default=True, type=click.IntRange(0))
@click.option("--height", default=256, show_default=True, type=click.IntRange(32))
@click.option("--width", default=512, show_default=True, type=click.IntRange(32))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1), help="Processes.")
def data_synth(out, num_train, num_val, height, width, seed, workers):
    """Write generated street scenes as leftImg8bit/ + gtFine/ (Cityscapes labelIds)."""
    from cadist.data.synthetic import write_tree

    n = write_tree(out, num_train, num_val, height, width, seed, workers, progress=True)
    click.echo(f"wrote {n['train']} train and {n['val']} val scenes of {height}×{width} to {out}")


# -- shards -------------------------------------------------------------------------------------
@main.group(cls=_Group)
def shards() -> None:
    """Build and check WebDataset shards."""


@shards.command("build")
@click.option(
    "--cityscapes-root",
    required=True,
    type=click.Path(exists=True, file_okay=False),
    help="Folder holding leftImg8bit/ and gtFine/.",
)
@click.option("--split", required=True, type=click.Choice(["train", "val", "test"]))
@click.option("--out", required=True, type=click.Path(file_okay=False))
@click.option("--samples-per-shard", default=32, show_default=True, type=click.IntRange(1))
@click.option(
    "--image-format",
    type=click.Choice(["jpeg", "png"]),
    default=None,
    help="Default: jpeg (q95) for train, png (lossless) for val/test.",
)
@click.option("--jpeg-quality", default=95, show_default=True, type=click.IntRange(1, 100))
@click.option(
    "--workers",
    default=0,
    show_default=True,
    type=click.IntRange(0),
    help="Processes; 0 = one per CPU.",
)
@click.option("--overwrite", is_flag=True, help="Replace existing shards of this split.")
@click.option("--skip-bad", is_flag=True, help="Skip bad samples (counted in the manifest).")
def shards_build(
    cityscapes_root,
    split,
    out,
    samples_per_shard,
    image_format,
    jpeg_quality,
    workers,
    overwrite,
    skip_bad,
):
    """Write SPLIT of a Cityscapes tree as {split}-000000.tar … plus {split}-manifest.json."""
    from cadist.data.shards import build_shards, manifest_path

    m = build_shards(
        cityscapes_root,
        split,
        out,
        samples_per_shard,
        image_format,
        jpeg_quality,
        workers,
        overwrite,
        skip_bad,
    )
    click.echo(
        f"wrote {m['num_samples']} samples in {len(m['shards'])} shards "
        f"({m['image_format']}) to {out}; manifest {manifest_path(out, split)}"
        + (f"; skipped {m['num_skipped']} bad samples" if m["num_skipped"] else "")
    )


@shards.command("verify")
@click.argument("manifest", type=click.Path(exists=True, dir_okay=False))
def shards_verify(manifest):
    """Check every shard of MANIFEST against its sha256."""
    from cadist.data.shards import verify_shards

    problems = verify_shards(manifest)
    for p in problems:
        click.echo(p, err=True)
    if problems:
        raise CadistError(f"{manifest}: {len(problems)} shards failed verification")
    click.echo(f"{manifest}: all shards match")


# -- models -------------------------------------------------------------------------------------
def _set_option(what: str):
    """The repeatable `--set KEY=VALUE` option of job and sweep commands."""
    return click.option(
        "--set", "overrides", multiple=True, metavar="KEY=VALUE",
        help=f"Override {what} (repeatable).",
    )  # fmt: skip


def _model_options(f):
    from cadist.models.names import ALL_MODELS

    opts = [
        click.option(
            "--model",
            required=True,
            type=click.Choice(ALL_MODELS),
            help="Model name (as in the reference implementation).",
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


def _build(model, output_stride, adaptive_mode, edge_threshold, trimap_width, mask_variant, **kw):
    """The model for prediction and counting; learned-mask models as their inference network."""
    import torch

    from cadist.models.build import build_model

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
    type=click.Path(dir_okay=False),
    help="Learned-mask models (required): weights whose mask estimator decides the mask.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def macs_cmd(
    model,
    output_stride,
    adaptive_mode,
    edge_threshold,
    trimap_width,
    mask_variant,
    mask_sampling,
    gumbel_tau,
    seed,
    height,
    width,
    image,
    shards,
    limit,
    ckpt,
    as_json,
):
    """Count multiply-adds per image under the method's counting rules (backbone, head, total).

    Adaptive models are counted per image, content-dependent: pass --image or --shards."""
    from cadist.macs import count_dense
    from cadist.models.build import is_adaptive, is_learned

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
    from cadist.adaptive.stats import count_images

    if not image and not shards:
        raise CadistError(
            f"{model} is content-adaptive: its MACs depend on the image; pass --image "
            f"PNG or --shards SPEC"
        )
    if is_learned(model) and not ckpt:
        raise CadistError(
            f"{model}: its mask comes from its trained mask estimator; pass --ckpt WEIGHTS"
        )
    net = _build(
        model, output_stride, adaptive_mode, edge_threshold, trimap_width, mask_variant,
        mask_sampling=mask_sampling, gumbel_tau=gumbel_tau, seed=seed,
    )  # fmt: skip
    if ckpt:
        from cadist.models.weights import load_weights

        load_weights(net, ckpt, expect_name=model)
    r = count_images(net.eval(), model, adaptive_mode, image=image, shards=shards, limit=limit)
    if as_json:
        _print_json(r)
        return
    n = r["num_images"]
    how = (
        f"learned mask, {mask_sampling}, τ={gumbel_tau}, seed {seed}"
        if is_learned(model)
        else f"{adaptive_mode}, τ={edge_threshold}, trimap {trimap_width}, {mask_variant} mask"
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
    click.echo(f"  head                  {r['head_gmac']:9.2f} GMac; {extra}")


@main.command("predict")
@_model_options
@click.option(
    "--ckpt",
    required=True,
    type=click.Path(dir_okay=False),
    help="Reference checkpoint, torchvision/plain state dict, or cadist export.",
)
@click.option(
    "--image",
    "images",
    required=True,
    multiple=True,
    type=click.Path(dir_okay=False),
    help="Image file; repeat for several.",
)
@click.option("--out", required=True, type=click.Path(file_okay=False))
@click.option(
    "--save-logits", is_flag=True, help="Also write <stem>_logits.npy, float32 (C, H, W)."
)
@click.option(
    "--save-mask",
    is_flag=True,
    help="Adaptive models: also write <stem>_mask.npy, uint8 (H/8, W/8), 0 = OS8, 1 = OS16.",
)
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:1 … or auto.")
@click.option(
    "--precision",
    type=click.Choice(["fp32", "bf16"]),
    default="fp32",
    show_default=True,
    help="Weights and activations; the edge mask is always computed in float32.",
)
def predict_cmd(
    model,
    output_stride,
    adaptive_mode,
    edge_threshold,
    trimap_width,
    mask_variant,
    ckpt,
    images,
    out,
    save_logits,
    save_mask,
    device,
    precision,
    mask_sampling,
    gumbel_tau,
    seed,
):
    """Predict classes for images: <stem>_pred.png (Cityscapes colours), <stem>_overlay.png."""
    import torch

    from cadist.models.build import is_adaptive
    from cadist.models.fold import fold_batchnorm
    from cadist.models.weights import load_weights
    from cadist.predict import write_prediction

    if save_mask and not is_adaptive(model):
        raise CadistError(f"--save-mask: {model} is a dense model and has no pooling mask")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    net = _build(
        model, output_stride, adaptive_mode, edge_threshold, trimap_width, mask_variant,
        mask_sampling=mask_sampling, gumbel_tau=gumbel_tau, seed=seed,
    )  # fmt: skip
    load_weights(net, ckpt, expect_name=model)
    # inference form: BN folded into the convolutions (same function, fewer passes)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    net = fold_batchnorm(net).to(device, dtype)
    for image in images:
        paths = write_prediction(net, image, out, device, save_logits, save_mask)
        click.echo(" ".join(str(p) for p in paths.values()))


# -- sweeps -------------------------------------------------------------------------------------
@main.command("tune")
@click.argument("sweep_file", type=click.Path(dir_okay=False))
@_set_option("a top-level sweep key, e.g. --set num_samples=4")
def tune_cmd(sweep_file, overrides):
    """Run a sweep (Ray Tune): each trial is the sweep's base job with searched values, trained
    like `cadist train` and logged as an MLflow run under the sweep's run; prints the trials and
    marks the Pareto front of the objectives (e.g. mIoU against GMac)."""
    from cadist.tune import run_sweep

    r = run_sweep(sweep_file, overrides, echo=click.echo)
    click.echo(f"results: {r['results_file']}")


# -- keypoints ----------------------------------------------------------------------------------
@main.group("hpatches")
def hpatches_group():
    """Keypoint descriptors (D2-Net, adaptive APD2Net) on HPatches sequences (method §11, §12)."""


@hpatches_group.command("synth")
@click.option("--out", required=True, type=click.Path(file_okay=False))
@click.option("--illumination", default=2, show_default=True, type=click.IntRange(0))
@click.option("--viewpoint", default=2, show_default=True, type=click.IntRange(0))
@click.option("--height", default=240, show_default=True, type=click.IntRange(64))
@click.option("--width", default=320, show_default=True, type=click.IntRange(64))
@click.option("--seed", default=0, show_default=True, type=int)
def hpatches_synth_cmd(out, illumination, viewpoint, height, width, seed):
    """Generate sequences in HPatches layout (i_*: brightness, v_*: homography warps)."""
    from cadist.eval.hpatches import write_sequences

    seqs = write_sequences(out, illumination, viewpoint, height, width, seed)
    click.echo(f"{len(seqs)} sequences in {out}")


@hpatches_group.command("eval")
@click.option("--root", required=True, type=click.Path(file_okay=False), help="Sequences folder.")
@click.option(
    "--network", default="d2net", show_default=True, type=click.Choice(["d2net", "apd2net"])
)
@click.option(
    "--output-stride", default=4, show_default=True, type=click.Choice(["1", "2", "4", "8"])
)
@click.option("--start-stride", default=4, show_default=True, type=click.Choice(["1", "2", "4"]))
@click.option(
    "--windows", default="11", show_default=True, help="APD2Net window sizes d0,d1,… (§11.4)."
)
@click.option("--weights", type=click.Path(dir_okay=False), help="D2-Net weights (d2_tf.pth).")
@click.option("--device", default="auto", show_default=True)
@click.option(
    "--save-features",
    type=click.Path(file_okay=False),
    help="Also write <dir>/<sequence>/<k>.ppm.<method>.npz (keypoints, scores, descriptors).",
)
@click.option("--mlflow-uri", help="Log the scores as an MLflow run (e.g. sqlite:///mlflow.db).")
@click.option("--experiment", default="hpatches", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def hpatches_eval_cmd(
    root, network, output_stride, start_stride, windows, weights, device, save_features,
    mlflow_uri, experiment, as_json,
):  # fmt: skip
    """Mean matching accuracy (MMA@1…15 px) of a descriptor network on HPatches sequences."""
    import torch

    from cadist.eval.hpatches import evaluate
    from cadist.keypoints.d2net import load_d2net_weights
    from cadist.keypoints.extract import Method, describe

    try:
        ws = tuple(int(v) for v in windows.split(",") if v.strip())
    except ValueError:
        raise CadistError(f"--windows {windows!r}: expected integers like 21,21") from None
    method = Method(network, int(output_stride), int(start_stride), ws)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    net = method.build()
    if weights:
        load_d2net_weights(net, weights)
    else:
        click.echo("warning: no --weights: random D2-Net weights (a pipeline check, not a score)")
    net.to(device).eval()
    r = evaluate(
        root,
        lambda rgb: describe(net, method, rgb, device),
        save_to=save_features,
        suffix=method.name,
    )
    r = {"method": method.name, "weights": weights} | r
    if mlflow_uri:
        from cadist.tracking import Tracker, new_run

        tracker = Tracker(
            mlflow_uri, new_run(mlflow_uri, experiment, method.name, {"cadist.task": "hpatches"})
        )
        tracker.log_params(
            {"network": network, "method": method.name, "root": str(root), "weights": str(weights)}
        )
        keys = {"mma@3": "hpatches/mma_3px", "features_per_image": "hpatches/features_per_image",
                "matches_per_pair": "hpatches/matches_per_pair", "gmac_per_image": "macs/gmac_per_image",
                "high_res_fraction": "hpatches/high_res_fraction"}  # fmt: skip
        tracker.log_metrics({v: r[k] for k, v in keys.items() if k in r}, 0)
        for t, v in zip(r["thresholds"], r["mma"], strict=True):
            tracker.log_metrics({"hpatches/mma": v}, t)
        tracker.log_text(json.dumps(r, indent=1), "hpatches/results.json")
        tracker.finish()
    if as_json:
        _print_json(r)
        return
    click.echo(
        f"{method.name} on {root}: {r['sequences']['i']} illumination + {r['sequences']['v']} viewpoint sequences"
    )
    click.echo(
        f"  MMA@3 {r['mma@3']:.4f} (illumination {r['mma_illumination'][2]:.4f}, viewpoint {r['mma_viewpoint'][2]:.4f})"
    )
    click.echo(
        f"  features/image {r['features_per_image']:.1f}, matches/pair {r['matches_per_pair']:.1f}"
    )
    click.echo(f"  {r['gmac_per_image']:.2f} GMac per image (method's counting rules)")


# -- results ------------------------------------------------------------------------------------
@main.command("report")
@click.option("--experiment", default="cityscapes-adaptive", show_default=True)
@click.option(
    "--tracking-uri", default=None, help="MLflow store or server; default: ./mlflow.db as training."
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def report_cmd(experiment, tracking_uri, as_json):
    """The results table of an experiment: best val mIoU per run (and at which step), high-res
    fraction and backbone GMac at that evaluation, beside the released models' mIoU."""
    from cadist.report import markdown, summarise
    from cadist.tracking import resolve_uri, training_runs

    rows = summarise(training_runs(resolve_uri(tracking_uri), experiment))
    if as_json:
        _print_json({"experiment": experiment, "runs": rows})
    else:
        click.echo(markdown(rows))


# -- clusters -----------------------------------------------------------------------------------
@main.command("submit")
@click.argument("job_file", type=click.Path(dir_okay=False))
@_set_option("a job key, e.g. --set train.iterations=1000")
@click.option(
    "--address",
    default="http://127.0.0.1:8265",
    show_default=True,
    envvar="RAY_API_SERVER_ADDRESS",
    help="The cluster's Ray dashboard (`ray dashboard ray_cluster.yaml` forwards it here).",
)
@click.option(
    "--no-upload",
    is_flag=True,
    help="Use the cadist installed on the cluster instead of uploading this project folder.",
)
@click.option("--no-wait", is_flag=True, help="Return after submitting instead of following it.")
def submit_cmd(job_file, overrides, address, no_upload, no_wait):
    """Run JOB_FILE on a Ray cluster through Ray's Jobs API (validated here first).

    Paths in the job (shards, storage, MLflow) are read on the cluster: use shared storage, URLs
    or an MLflow server the cluster can reach."""
    from cadist.cluster import submit_job
    from cadist.config import load_job

    job = load_job(job_file, overrides)
    submit_job(
        job,
        str(job_file),
        address,
        working_dir=None if no_upload else ".",
        wait=not no_wait,
        echo=click.echo,
    )


@main.group("cluster")
def cluster_group():
    """The Ray cluster file (`ray_cluster.yaml`)."""


@cluster_group.command("check")
@click.argument("cluster_file", default="ray_cluster.yaml", type=click.Path(dir_okay=False))
def cluster_check_cmd(cluster_file):
    """Validate a Ray cluster-launcher YAML offline (schema, Ray's defaults, cadist's checks)."""
    from cadist.cluster import check_cluster_file

    r = check_cluster_file(cluster_file)
    click.echo(
        f"{cluster_file}: cluster {r['cluster_name']!r}, provider {r['provider']}, head "
        f"{r['head_node_type']}, up to {r['max_workers']} workers"
    )
    for name, t in r["node_types"].items():
        res = ", ".join(f"{k} {v}" for k, v in t["resources"].items()) or "detected at start"
        click.echo(f"  {name}: resources {res}; workers {t['min_workers']}..{t['max_workers']}")
    for w in r["warnings"]:
        click.echo(f"warning: {w}")


# -- training -----------------------------------------------------------------------------------
@main.command("train")
@click.argument("job_file", type=click.Path(dir_okay=False))
@_set_option("a job key, e.g. --set train.iterations=1000")
@click.option(
    "--address", default=None, help="Ray cluster address; default: the job's, else a local Ray."
)
def train_cmd(job_file, overrides, address):
    """Train JOB_FILE on Ray Train + DeepSpeed (rerunning the same job name resumes it)."""
    from cadist.config import load_job
    from cadist.train.driver import run_training

    job = load_job(job_file, overrides)
    r = run_training(job, job_file, address)
    summary = {
        "job": job.name,
        "miou": r.metrics.get("val/miou"),
        "step": r.metrics.get("step"),
        "checkpoint": r.checkpoint,
        "mlflow_run_id": r.run_id,
    }
    _print_json(summary)
    if r.tracking_uri:
        click.echo(f"browse: mlflow ui --backend-store-uri {r.tracking_uri} --host 127.0.0.1")


@main.command("eval")
@click.argument("job_file", type=click.Path(dir_okay=False))
@click.option(
    "--ckpt",
    required=True,
    type=click.Path(exists=True),
    help="Weights file or a cadist checkpoint folder (cadist_runs/<job>/step_…).",
)
@_set_option("a job key, e.g. --set eval.batch_size=2")
@click.option("--device", default="auto", show_default=True)
def eval_cmd(job_file, ckpt, overrides, device):
    """Evaluate CKPT on the validation shards of JOB_FILE: mIoU, accuracies, per-class IoU (JSON)."""
    import torch

    from cadist.config import load_job
    from cadist.evaluate import evaluate_job

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    _print_json(evaluate_job(load_job(job_file, overrides), ckpt, device))


@main.command("demo")
@click.option(
    "--workdir",
    default=".",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Where data, shards, checkpoints and the MLflow store go.",
)
@_set_option("a key of jobs/demo.yaml, e.g. --set model.name=deeplabv3_ad_resnet_tiny")
def demo_cmd(workdir, overrides):
    """Generate data → build shards → train jobs/demo.yaml on a local Ray (2 CPU workers, DeepSpeed)
    → evaluate → log to MLflow. Rerunning resumes (and finishes at once if already done)."""
    from cadist.demo import run_demo

    summary = run_demo(workdir, overrides)
    click.echo(
        f"final val mIoU {summary['miou']:.4f} (best {summary['best_miou']:.4f}) after "
        f"{summary['step']} steps; chance level ≈ {summary['chance_miou']:.3f}"
    )
    click.echo(
        f"browse the run: mlflow ui --backend-store-uri {summary['tracking_uri']} --host 127.0.0.1 --port 5000"
    )


def _print_json(obj) -> None:
    click.echo(json.dumps(obj, indent=1))


if __name__ == "__main__":
    main()
