"""The Ray Train worker: one data-parallel rank of DeepSpeed training, evaluation and checkpoints.

Reads top to bottom: build → restore → loop (step, log, evaluate, checkpoint) → final export.
Only rank 0 talks to MLflow; every rank calls the collectives (loss average, confusion matrix,
DeepSpeed checkpoint, `ray.train.report`) the same number of times.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import ray.train
import torch
import torch.distributed as dist

from cadist.config.schema import JobConfig
from cadist.data.cityscapes import CLASS_NAMES
from cadist.data.stream import ShardStream, make_loader
from cadist.data.transforms import TrainTransform, denormalize, normalize_uint8
from cadist.eval.loop import evaluate
from cadist.eval.miou import iou_csv, val_metrics
from cadist.eval.predict import colorize
from cadist.nets.build import build_model, is_adaptive, is_learned
from cadist.nets.weights import save_weights
from cadist.progress import ProgressFile
from cadist.storage.store import Storage
from cadist.storage.uri import adopt_location_env
from cadist.tracking.runs import NullTracker, Tracker
from cadist.tracking.spool import WORKER_HTTP_ENV, SpooledTracker, system_metrics
from cadist.train.checkpoint import recorded, restore_checkpoint, save_checkpoint
from cadist.train.engine import build_engine, train_step

#: progress lines (rank 0) through logging (Ray Train sends it to the console once; `print` twice):
#: with `cadist --verbose` only (else the driver's progress display); warnings always, with the rank
log = logging.getLogger("cadist.train")


class _RankPrefix(logging.Filter):
    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING and not getattr(record, "_ranked", False):
            record.msg, record._ranked = f"[rank {self.rank}] {record.msg}", True
        return True


class _RayTrainConsole(logging.Filter):
    """Holds Ray Train's own records below `cluster.log_level` off the console. Its level filter
    misses the modules that name their logger by file path (each report, with all its metrics,
    once per rank); the application log file still gets them."""

    def __init__(self, level: str):
        super().__init__()
        self.level = logging.getLevelName(level)

    def filter(self, record: logging.LogRecord) -> bool:
        from_train = f"{os.sep}ray{os.sep}train{os.sep}" in record.pathname
        return record.levelno >= self.level or not from_train


def _quiet_console(level: str) -> None:
    # MLflow's store and its migrations (alembic) say what they set up at INFO: not for the console
    for name in ("mlflow", "alembic", "sqlalchemy"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for h in logging.getLogger().handlers:
        if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
            h.addFilter(_RayTrainConsole(level))


def _mean_over_ranks(value: float, device) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return float(t.item())


def _log_eval(tracker, job: JobConfig, cm, kept: list[dict], step: int, best: bool) -> float:
    s = cm.summary(CLASS_NAMES)
    tracker.log_metrics(val_metrics(s), step)
    table = iou_csv(s)
    tracker.log_text(table, "eval/iou_last.csv")
    if best:
        tracker.log_text(table, "eval/iou_best.csv")
    for k in kept:
        img = (denormalize(k["image"]).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        parts = [
            img,
            colorize(k["label"].numpy().astype(np.uint8)),
            colorize(k["pred"].numpy().astype(np.uint8)),
        ]
        if "mask" in k:  # darken the regions the adaptive backbone ran at low resolution
            parts.append(mask_overlay(img, k["mask"].numpy()))
        tracker.log_image(
            np.concatenate(parts, axis=1), f"predictions/step_{step:08d}/{k['key']}.png"
        )
    return s["miou"]


def mask_overlay(img: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(H, W, 3) image with the cells of mask > 0 (downsampled) darkened; mask at the finest grid."""
    s = img.shape[0] // mask.shape[0]
    low = np.kron(mask > 0, np.ones((s, s), bool))
    out = img.copy()
    out[low] = (out[low] * 0.35).astype(np.uint8)
    return out


def _log_adaptive(tracker, job: JobConfig, extra: dict, step: int, device) -> dict:
    """Mean high-res fraction over all validation images (all ranks) and the GMac per image it
    implies (§10) — with `eval.scales`/`flip`/`window`, all passes' total: each pass's line at its
    size (a window's: at crop size, times the crops) at the pass's mean fraction. Summed over
    images and ranks, which is exact because the line is linear in the fraction."""
    from cadist.nets.stats import mac_line

    sums = [extra["high_res_sum"], extra["images"], 0.0, 0.0, 0.0]
    for one, (n, high_res) in extra["passes"].items():
        if n:
            line = mac_line(job.model.name, job.model.adaptive_mode,
                            *(one.tile or (one.height, one.width)), job.model.head)  # fmt: skip
            q, times = (high_res or 0.0) / n, n * one.tiles
            sums[2] += times * line.backbone(q)
            sums[3] += times * line.backbone(q, actual=True)
            sums[4] += times * (line.backbone(q) + line.head(q))
    t = torch.tensor(sums, dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    high_res, images, backbone, computed, total = (float(v) for v in t)
    images = max(images, 1.0)
    if isinstance(tracker, NullTracker):  # ranks > 0: only the collective above
        return {"val/high_res_fraction": high_res / images}
    metrics = {
        "val/high_res_fraction": high_res / images,
        "macs/backbone_gmac": backbone / images,
        "macs/backbone_gmac_computed": computed / images,
        "macs/total_gmac": total / images,
    }
    tracker.log_metrics(metrics, step)
    return metrics


def _eval_learned(tracker, job: JobConfig, model, val, extra, step: int, device) -> dict:
    """Learned-mask models (§7.5): the training network's high-res share, then — unless
    `eval.learned_inference` is off — the irregular inference network built from the current
    weights: its mIoU, high-res share and the MACs that implies (what the method reports)."""
    from cadist.adaptive.learned import inference_state

    p_train = _mean_fraction(extra, device)
    out = {"val/high_res_fraction_train": p_train}
    if not job.eval.learned_inference:
        tracker.log_metrics(out, step)
        return out | _log_adaptive(tracker, job, extra, step, device)
    kw = job.model.build_kwargs() | {"network": "inference"}
    dtype = next(model.parameters()).dtype
    net = build_model(**kw).to(device, dtype)
    net.load_state_dict(inference_state(model.state_dict()))
    cm, _, extra_inf = evaluate(
        net, _on_device(make_loader(val), device, dtype), device, tta=job.eval.augmentation()
    )
    cm.all_reduce()
    out["val/miou_inference"] = cm.miou()
    tracker.log_metrics(out, step)
    return out | _log_adaptive(tracker, job, extra_inf, step, device)


def _learned_train_metrics(engine) -> dict:
    """Learned-mask models: the mask estimator's learning rate and the last ratio loss (§7.4)."""
    aux = getattr(engine.module, "aux_loss", None)
    if aux is None:
        return {}
    return {"train/lr_mask_estimator": engine.get_lr()[2], "train/ratio_loss": float(aux.detach())}


def _stop_requested(stop_file: str | None, rank: int, device) -> bool:
    """Whether `cadist stop` asked this job to end: rank 0 looks for the request on the storage
    path, the others learn it from a collective (every rank calls it, so all of them stop at the
    same step)."""
    seen = rank == 0 and bool(stop_file) and Storage(stop_file).exists()
    flag = torch.tensor([float(seen)], device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def _mean_fraction(extra: dict, device) -> float:
    t = torch.tensor([extra["high_res_sum"], extra["images"]], dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return float(t[0] / t[1].clamp_min(1))


def train_worker(cfg: dict) -> None:
    """Ray Train entry point; `cfg` = {"job": JobConfig dump, "tracking_uri", "run_id",
    "report_evals": also report every evaluation (without a checkpoint) to Ray Train, "spool":
    where rank 0 keeps records while the tracking server does not answer}."""
    job = JobConfig.model_validate(cfg["job"])
    adopt_location_env(cfg.get("storage_env"))
    _quiet_console(job.cluster.log_level)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    log.setLevel(logging.INFO if cfg.get("verbose") else logging.WARNING)
    for f in [f for f in log.filters if isinstance(f, _RankPrefix)]:
        log.removeFilter(f)
    log.addFilter(_RankPrefix(rank))
    on_gpu = job.cluster.use_gpu
    device = ray.train.torch.get_device() if on_gpu else torch.device("cpu")
    engine = build_engine(job, on_gpu, world, device)
    dtype = next(engine.module.parameters()).dtype
    state = restore_checkpoint(engine, job, rank) or {"step": 0, "best_miou": -1.0}
    tracker = _tracker(cfg) if rank == 0 and cfg.get("run_id") else NullTracker()
    sampler = None
    if cfg.get("run_id") and job.mlflow.system_metrics_s and ctx.get_local_rank() == 0:
        sampler = system_metrics(
            cfg["tracking_uri"], cfg["run_id"], f"node{ctx.get_node_rank()}",
            job.mlflow.system_metrics_s,
        )  # fmt: skip
    progress = None
    if rank == 0 and cfg.get("progress"):
        progress = ProgressFile(cfg["progress"]["uri"], token=cfg["progress"]["token"],
                                job=job.name, step=state["step"], start_step=state["step"],
                                iterations=job.train.iterations, workers=world)  # fmt: skip
    phase = "failed"
    try:
        phase = _train(job, cfg, engine, state, tracker, rank, world, device, dtype, progress)
    finally:
        if progress is not None:
            progress.close(phase, step=state["step"])
        if sampler is not None:
            sampler.finish()


def _train(job, cfg, engine, state, tracker, rank, world, device, dtype, progress=None) -> str:
    """The loop of `train_worker`: step, log, evaluate, checkpoint; then the final export. Rank 0
    tells `progress` (a ProgressFile) each report, evaluation and checkpoint. Returns "done", or
    "stopped" when `cadist stop` ended it."""
    progress = progress or _NoProgress()
    t, steps_per_epoch = job.train, job.data.steps_per_epoch
    acc = job.deepspeed.gradient_accumulation_steps  # micro-batches per optimiser step
    train, val = _streams(job, rank, world)
    step, before = state["step"], state.get("workers", world)
    state["workers"] = world  # recorded in checkpoints: a resume on another count says so
    if step:
        tracker.log_metrics({"train/resumed_from_step": step}, step)
        if rank == 0:
            log.info(
                f"[cadist] resumed from the checkpoint of step {step}"
                + (f" on {world} workers (it was written by {before})" if before != world else "")
            )
    engine.train()
    meter = _Meter()
    stop = False
    while step < t.iterations and not stop:
        epoch, start = divmod(step, steps_per_epoch)
        train.set_epoch(epoch, start * acc)
        for micro, batch in enumerate(make_loader(train, pin_memory=job.cluster.use_gpu), 1):
            meter.add(train_step(engine, batch, device, dtype), batch["label"].shape[0])
            if micro % acc:  # DeepSpeed steps the optimiser at the last micro-batch of the step
                continue
            step += 1
            state["step"] = step
            last = step == t.iterations
            metrics = {}
            if step % t.log_every == 0 or last:
                metrics = _log_progress(tracker, job, engine, meter, step, epoch, rank, device)
                stop = not last and _stop_requested(cfg.get("stop_file"), rank, device)
                progress.update(step=step, loss=metrics["train/loss"],
                                images_per_s=metrics["train/images_per_s"])  # fmt: skip
            if step % job.eval.interval == 0 or last:
                progress.update(phase="eval", step=step)
                metrics |= _evaluate(tracker, job, engine, val, state, rank, device, dtype)
                progress.update(phase="train", val_miou=metrics["val/miou"],
                                best_miou=state["best_miou"])  # fmt: skip
            if step % t.checkpoint_every == 0 or last or stop:
                save_checkpoint(
                    engine,
                    job,
                    state,
                    rank,
                    {"step": step, **metrics, **({"stopped": 1} if stop else {})},
                )
                progress.update(checkpoint_step=step)
            elif cfg.get("report_evals") and step % job.eval.interval == 0:
                ray.train.report({"step": step, **metrics})  # a sweep's scheduler compares trials
            if step >= t.iterations or stop:
                break
    if stop:
        if rank == 0:
            log.info(f"[cadist] stopped at step {step} on request (`cadist stop`); a rerun resumes")
            tracker.flush(force=True)
        return "stopped"
    if rank == 0:
        progress.update(phase="export")
        _log_weights(tracker, engine, job, "last.pt", step=step)
        if tracker.flush(force=True) is False:
            log.warning(
                f"[cadist] MLflow at {cfg['tracking_uri']} still does not answer: "
                f"{tracker.pending_count()} records wait in {tracker.spool}"
            )
    return "done"


class _NoProgress:
    def update(self, **fields) -> None:
        pass


def _streams(job: JobConfig, rank: int, world: int) -> tuple[ShardStream, ShardStream]:
    """This rank's training stream (crops, augmentation, exact resume) and validation stream."""
    d = job.data
    acc = job.deepspeed.gradient_accumulation_steps
    common = {"rank": rank, "world_size": world, "skip_bad": d.skip_bad,
              "allow_pipe": d.allow_pipe, "normalize": False}  # fmt: skip
    train = ShardStream(
        d.train_shards,
        train=True,
        batch_size=job.micro_batch_for(world),
        num_workers=d.num_workers,
        steps_per_epoch=d.steps_per_epoch * acc,
        transform=TrainTransform(d.crop_size, d.crop_size),
        seed=job.train.seed,
        shuffle_buffer=d.shuffle_buffer,
        **common,
    )
    val = ShardStream(
        d.val_shards,
        train=False,
        batch_size=job.eval.batch_size,
        num_workers=min(d.num_workers, 1),
        **common,
    )
    return train, val


class _Meter:
    """Loss and images seen since the last progress line (micro-batches included)."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.t0, self.seen, self.loss_sum, self.loss_n = time.perf_counter(), 0, 0.0, 0

    def add(self, loss: torch.Tensor, images: int) -> None:
        self.seen += images
        self.loss_sum, self.loss_n = self.loss_sum + float(loss.detach()), self.loss_n + 1


def _log_progress(tracker, job, engine, meter: _Meter, step, epoch, rank, device) -> dict:
    """`train/*` metrics averaged over ranks (a collective: every rank calls it), then reset."""
    elapsed = time.perf_counter() - meter.t0
    world = dist.get_world_size() if dist.is_initialized() else 1
    metrics = {
        "train/loss": _mean_over_ranks(meter.loss_sum / meter.loss_n, device),
        "train/lr": engine.get_lr()[0],
        "train/lr_head": engine.get_lr()[1],
        **_learned_train_metrics(engine),
        "train/images_per_s": _mean_over_ranks(meter.seen / elapsed, device) * world,
        "train/workers": world,
        "train/epoch": epoch,
    }
    tracker.log_metrics(metrics, step)
    if rank == 0:
        log.info(
            f"[cadist] step {step}/{job.train.iterations} loss {metrics['train/loss']:.4f} "
            f"lr {metrics['train/lr']:.2e} {metrics['train/images_per_s']:.1f} img/s"
        )
    meter.reset()
    return metrics


def _evaluate(tracker, job, engine, val, state: dict, rank, device, dtype) -> dict:
    """One evaluation (a collective): the summed confusion matrix, the adaptive statistics, the
    logged metrics and images, `best.pt` when the mIoU improves; back to training mode."""
    step = state["step"]
    started = time.perf_counter()
    cm, kept, extra = evaluate(
        engine.module,
        _on_device(make_loader(val), device, dtype),
        device,
        keep=max(1, job.eval.log_images) if rank == 0 else 0,
        tta=job.eval.augmentation(),
    )
    cm.all_reduce()
    world = dist.get_world_size() if dist.is_initialized() else 1
    rate = extra["images"] / max(time.perf_counter() - started, 1e-9)  # (decoding included)
    metrics = {"val/images_per_s": _mean_over_ranks(rate, device) * world}
    tracker.log_metrics(metrics, step)
    if is_adaptive(job.model.name):
        if is_learned(job.model.name):
            metrics |= _eval_learned(tracker, job, engine.module, val, extra, step, device)
        else:
            metrics |= _log_adaptive(tracker, job, extra, step, device)
    kept = kept[: job.eval.log_images]
    miou = cm.miou()
    is_best = miou > state["best_miou"]  # the summed matrix is the same on every rank
    _log_eval(tracker, job, cm, kept, step, is_best)
    if is_best:
        state["best_miou"] = miou
        if rank == 0:
            _log_weights(tracker, engine, job, "best.pt", step=step, miou=miou)
    metrics["val/miou"] = miou
    if rank == 0:
        more = "".join(
            f", {label} {metrics[key]:.4f}"
            for key, label in (
                ("val/miou_inference", "inference network mIoU"),
                ("val/high_res_fraction", "high-res fraction"),
            )
            if key in metrics
        )
        log.info(
            f"[cadist] step {step}: val mIoU {miou:.4f} (best {state['best_miou']:.4f})" + more
        )
    engine.train()
    return metrics


def _tracker(cfg: dict):
    """Rank 0's tracker: training does not wait on a tracking server that stops answering (its
    records are spooled, see SpooledTracker); what a crashed worker spooled is sent first."""
    if cfg.get("spool") is None:  # pragma: no cover - every driver passes one
        return Tracker(cfg["tracking_uri"], cfg["run_id"])
    for k, v in WORKER_HTTP_ENV.items():
        os.environ.setdefault(k, v)
    tracker = SpooledTracker(cfg["tracking_uri"], cfg["run_id"], cfg["spool"], echo=log.warning)
    tracker.flush(force=True)
    return tracker


def _log_weights(tracker, engine, job: JobConfig, filename: str, **meta) -> None:
    """A weights-only export (with the model section, so it can be rebuilt) → MLflow checkpoints/."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / filename
        save_weights(engine.module, path, **recorded(job), **meta)
        tracker.log_artifact(path, "checkpoints")


def _on_device(batches, device, dtype):
    for b in batches:
        b["image"] = normalize_uint8(b["image"].to(device, non_blocking=True)).to(dtype)
        yield b
