"""`cadist eval`: evaluate weights on a job's validation shards — in one process (CPU or GPU), or
in shares (`evaluate_part`, e.g. Ray tasks: `cluster_eval`) whose counts `combine_parts` adds up."""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from cadist.config.passes import Augmentation
from cadist.config.schema import JobConfig
from cadist.data.cityscapes import CLASS_NAMES
from cadist.data.stream import ShardStream, make_loader, shard_set
from cadist.errors import ConfigError
from cadist.eval.loop import evaluate
from cadist.eval.miou import ConfusionMatrix
from cadist.nets.build import build_model, is_learned
from cadist.nets.weights import load_weights
from cadist.tracking.sources import resolve_weights


def eval_protocol(
    job: JobConfig,
    scales: str | None = None,
    flip: bool | None = None,
    window: str | None = None,
    stride: str | None = None,
) -> Augmentation:
    """`cadist eval`'s protocol: its `--scales`, `--flip/--no-flip`, `--window` (`whole`: whole
    images) and `--stride` where given, else the job's `eval.*` keys, as during training."""
    if window is None and job.eval.window:
        window, stride = job.eval.window, stride or job.eval.stride
    elif window == "whole":
        if stride:
            raise ConfigError("--stride goes with a window; --window whole has none")
        window = None
    scales = job.eval.scales if scales is None else scales
    return Augmentation.parse(scales, job.eval.flip if flip is None else flip, window, stride)


def evaluate_job(
    job: JobConfig,
    ckpt: str | Path,
    device: str = "cpu",
    tta: Augmentation | None = None,
    per_image: bool = False,
    progress=None,
) -> dict:
    """mIoU, accuracies and per-class IoU of `ckpt` on `job.data.val_shards` (method §9); `ckpt`:
    a weights file, checkpoint folder or MLflow URI (read from the job's tracking store). With
    `tta` (not the paper's protocol) every image's prediction averages the augmentation's passes
    and "tta" lists them: size, mirrored, images, high-res fraction and backbone GMac per pass.
    `per_image` adds each image's mIoU, pixel accuracy and high-res fraction, worst first (for
    learned-mask models, like the totals: `miou` of the training network, `miou_inference` and
    `high_res_fraction` of the inference network, `high_res_fraction_train`). `progress(n)`: n more
    images evaluated (`images_to_evaluate` in all)."""
    part = evaluate_part(job, ckpt, device, tta, per_image, progress=progress)
    return combine_parts(job, [part], tta)


def networks_of(job: JobConfig) -> dict[str, dict]:
    """The networks an evaluation of `job` runs, by name, as build_model keyword arguments:
    {"main"}, and "inference" for learned-mask models (§7.5's irregular network of the same
    weights, as training logs it)."""
    networks = {"main": job.model.build_kwargs()}
    if is_learned(job.model.name) and job.eval.learned_inference:
        networks["inference"] = job.model.build_kwargs() | {"network": "inference"}
    return networks


def images_to_evaluate(job: JobConfig) -> int | None:
    """Images an evaluation of `job` runs through a network (every network counted; None where
    the validation shards come without a manifest)."""
    samples = shard_set(job.data.val_shards)["samples"]
    return None if samples is None else samples * len(networks_of(job))


def evaluate_part(
    job: JobConfig,
    ckpt: str | Path,
    device: str = "cpu",
    tta: Augmentation | None = None,
    per_image: bool = False,
    rank: int = 0,
    world_size: int = 1,
    progress=None,
) -> dict:
    """Share `rank` of `world_size` of the validation images evaluated (each image is in exactly
    one share), as counts that `combine_parts` adds up: per network ({"main"}, and "inference"
    for learned-mask models) the confusion matrix (19, 19) int64, images, Σ high-res fraction,
    the passes' {Pass: (images, Σ high-res)}, and the per-image records if asked for."""
    tta = None if tta is None or tta.plain else tta
    uri = job.mlflow.tracking_uri if job.mlflow.enabled else None
    ckpt = resolve_weights(ckpt, uri)
    val = ShardStream(
        job.data.val_shards,
        train=False,
        batch_size=job.eval.batch_size,
        rank=rank,
        world_size=world_size,
        num_workers=min(job.data.num_workers, 1),
        skip_bad=job.data.skip_bad,
        allow_pipe=job.data.allow_pipe,
    )
    out = {}
    for name, kwargs in networks_of(job).items():
        model = build_model(**kwargs)
        load_weights(model, ckpt, expect_name=job.model.name)
        images = [] if per_image else None
        started = time.perf_counter()
        cm, _, extra = evaluate(
            model.to(device),
            make_loader(val),
            torch.device(device),
            tta=tta,
            per_image=images,
            on_batch=progress,
        )
        out[name] = {"confusion": cm.mat.cpu(), "images": extra["images"],
                     "seconds": time.perf_counter() - started,
                     "high_res_sum": extra["high_res_sum"], "passes": extra["passes"],
                     "adaptive": getattr(model, "last_mask", None) is not None,
                     "per_image": images}  # fmt: skip
    return out


def combine_parts(job: JobConfig, parts: list[dict], tta: Augmentation | None = None) -> dict:
    """`evaluate_job`'s result from the `evaluate_part`s of all shares of the validation images."""
    tta = None if tta is None or tta.plain else tta
    nets = {name: _merged([p[name] for p in parts]) for name in parts[0]}
    main = nets["main"]
    cm = ConfusionMatrix(len(CLASS_NAMES))
    cm.mat += main["confusion"]
    out = cm.summary(CLASS_NAMES)
    out["pixels"] = int(cm.mat.sum())
    out["images"] = main["images"]
    # images per second of the shares evaluated side by side (decoding included)
    out["images_per_s"] = main["images"] / max(main["seconds"], 1e-9)
    if main["adaptive"]:
        out["high_res_fraction"] = main["high_res_sum"] / max(1, main["images"])
    images = main["per_image"]
    gmac_of = main  # the MACs are the inference network's where there is one (§10.2)
    if "inference" in nets:
        inf = nets["inference"]
        cm_i = ConfusionMatrix(len(CLASS_NAMES))
        cm_i.mat += inf["confusion"]
        out["high_res_fraction_train"] = out["high_res_fraction"]
        out["miou_inference"] = cm_i.miou()
        out["high_res_fraction"] = inf["high_res_sum"] / max(1, inf["images"])
        gmac_of = inf
        by_key = {r["key"]: r for r in inf["per_image"] or []}
        for rec in images or []:
            other = by_key[rec["key"]]  # both networks read the same images
            rec["high_res_fraction_train"] = rec["high_res_fraction"]
            rec["miou_inference"] = other["miou"]
            rec["high_res_fraction"] = other["high_res_fraction"]
    if images is not None:
        # worst first; an image with no labelled pixel (mIoU NaN) last
        out["per_image"] = sorted(
            images, key=lambda r: (math.isnan(r["miou"]), r["miou"], r["key"])
        )
    # GMac per image under the method's rules (§10): each pass's at its size and high-res fraction
    # (the inference network's for learned-mask models), all of an image's passes together
    passes = _pass_table(job, gmac_of["passes"])
    for key in GMAC_KEYS:
        if all(key in p for p in passes):
            out[key] = sum(p[key] * p["images"] for p in passes) / max(1, gmac_of["images"])
    if tta is not None:
        out["tta"] = {"scales": list(tta.scales), "flip": tta.flip,
                      "window": tta.window.label() if tta.window else None,
                      "passes": passes}  # fmt: skip
        for key in ("backbone_gmac", "total_gmac"):  # per image, all passes
            out["tta"][key] = out[key]
    return out


def _merged(parts: list[dict]) -> dict:
    """One network's counts of several shares added up (per-image records: concatenated)."""
    passes: dict = {}
    for part in parts:
        for p, (n, s) in part["passes"].items():
            n0, s0 = passes.get(p, (0, None))
            passes[p] = (n0 + n, s0 if s is None else (s0 or 0.0) + s)
    records = None if parts[0]["per_image"] is None else [r for q in parts for r in q["per_image"]]
    return {"confusion": sum(p["confusion"] for p in parts), "passes": passes,
            "images": sum(p["images"] for p in parts),
            "seconds": max(p.get("seconds", 0.0) for p in parts),
            "high_res_sum": sum(p["high_res_sum"] for p in parts),
            "adaptive": any(p["adaptive"] for p in parts), "per_image": records}  # fmt: skip


GMAC_KEYS = ("backbone_gmac", "backbone_gmac_computed", "total_gmac")


def _pass_table(job: JobConfig, passes: dict) -> list[dict]:
    """Each augmentation pass: size, mirrored, (sliding window: crop size and crops per image),
    images, high-res fraction (adaptive models) and the backbone and total GMac per image under
    the method's rules (§10) at that size (every crop's)."""
    rows = []
    for p, (images, high_res) in passes.items():
        row = {"height": p.height, "width": p.width, "flip": p.flip, "images": images}
        if p.tile is not None:
            row["window"], row["windows"] = list(p.tile), p.tiles
        if high_res is not None:
            row["high_res_fraction"] = high_res / max(1, images)
        # linear in the high-res fraction at a given size: crops × one crop at their mean
        gmac = _gmac(job, *(p.tile or (p.height, p.width)), row.get("high_res_fraction"))
        rows.append(row | {k: v * p.tiles for k, v in gmac.items()})
    return rows


def _gmac(job: JobConfig, height: int, width: int, high_res: float | None) -> dict[str, float]:
    """Backbone and total GMac of one H×W image (adaptive: at high-res fraction `high_res`, and
    the backbone's as cadist computes it, `backbone_gmac_computed`)."""
    from cadist.nets.build import is_adaptive
    from cadist.nets.macs import count_dense

    if not is_adaptive(job.model.name):
        m = count_dense(job.model.name, job.model.output_stride, height, width)
        return {"backbone_gmac": m["backbone_gmac"], "total_gmac": m["total_gmac"]}
    from cadist.nets.stats import mac_line

    line = mac_line(job.model.name, job.model.adaptive_mode, height, width, job.model.head)
    return {"backbone_gmac": line.backbone(high_res),
            "backbone_gmac_computed": line.backbone(high_res, actual=True),
            "total_gmac": line.backbone(high_res) + line.head(high_res)}  # fmt: skip


def log_evaluation(
    job: JobConfig,
    ckpt: str,
    result: dict,
    run_name: str | None = None,
    parent_run_id: str | None = None,
) -> str:
    """`cadist eval --log`: the evaluation as an MLflow run in the job's experiment, shaped like a
    training run's evaluation at step 0 (params, `val/*`, `macs/*`, the IoU table), so that
    `cadist report` lists e.g. released checkpoints beside trained ones (nested under
    `parent_run_id` if given: `cadist eval --vary`). Returns the run id."""
    from cadist import __version__
    from cadist.eval.miou import iou_csv, val_metrics
    from cadist.tracking.runs import Tracker, check_reachable, new_run, resolve_uri

    uri = resolve_uri(job.mlflow.tracking_uri)
    check_reachable(uri)
    tags = {"cadist.job": job.name, "cadist.task": "eval", "cadist.weights_source": str(ckpt),
            "cadist.version": __version__}  # fmt: skip
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    tta = result.get("tta")
    if tta:  # apart in `cadist report`: an augmented evaluation costs all its passes
        tags["cadist.tta"] = f"scales {','.join(map(str, tta['scales']))}, flip {tta['flip']}" + (
            f", window {tta['window']}" if tta.get("window") else ""
        )
    default_name = f"{job.name}-eval" + (
        ("-tta" if tta["scales"] != [1.0] or tta["flip"] else "")
        + ("-slide" if tta.get("window") else "")
        if tta
        else ""
    )
    tracker = Tracker(uri, new_run(uri, job.mlflow.experiment, run_name or default_name, tags))
    # what this evaluation ran, over the job's eval.* keys (it may not be the job's protocol)
    window, _, stride = (tta.get("window") or "").partition("/") if tta else ("", "", "")
    params = {"eval.ckpt": str(ckpt), "eval.scales": ",".join(map(str, tta["scales"] if tta else [1.0])),
              "eval.flip": bool(tta and tta["flip"]), "eval.window": window or None,
              "eval.stride": stride or None}  # fmt: skip
    tracker.log_params(job.flat() | params)
    tracker.log_datasets([(shard_set(job.data.val_shards), "evaluation")])
    metrics = val_metrics(result)
    metrics |= {f"macs/{k}": result[k] for k in GMAC_KEYS if k in result}
    if "high_res_fraction" in result:
        metrics["val/high_res_fraction"] = result["high_res_fraction"]
    if "miou_inference" in result:
        metrics["val/miou_inference"] = result["miou_inference"]
    if "images_per_s" in result:
        metrics["val/images_per_s"] = result["images_per_s"]
    tracker.log_metrics(metrics, 0)
    tracker.log_text(iou_csv(result), "eval/iou.csv")
    if "per_image" in result:
        tracker.log_text(per_image_csv(result["per_image"]), "eval/per_image.csv")
    tracker.finish()
    return tracker.run_id


def per_image_csv(records: list[dict]) -> str:
    """`key,miou,pixel_accuracy,pixels,high_res_fraction[,miou_inference,high_res_fraction_train]`
    lines (empty cells for NaN/absent)."""

    def cell(v) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return ""
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    cols = ("key", "miou", "pixel_accuracy", "pixels", "high_res_fraction")
    if any("miou_inference" in r for r in records):  # learned-mask models: both networks
        cols += ("miou_inference", "high_res_fraction_train")
    return (
        ",".join(cols)
        + "\n"
        + "".join(",".join(cell(r.get(c)) for c in cols) + "\n" for r in records)
    )
