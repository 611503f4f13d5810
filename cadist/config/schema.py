"""One typed job configuration, loaded from `jobs/*.yaml` with `--set a.b=value` overrides.

Each field is documented where it is defined: this file is the manual of the job format. A mistake
is one `ConfigError` line naming the file, the key, the value and what is allowed.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from cadist.config.names import AdaptiveMode, HeadKind, ModelName
from cadist.config.passes import JOB_NAMES, Augmentation, parse_scales
from cadist.errors import ConfigError
from cadist.redact import redact


class _Section(BaseModel):
    # inf/nan pass `gt=0`-style bounds: no job value may be either
    model_config = ConfigDict(
        extra="forbid", frozen=True, allow_inf_nan=False, use_attribute_docstrings=True
    )


class ModelConfig(_Section):
    """The network: which model, its output stride or adaptive mode, the mask's settings, and
    the weights it starts from."""

    name: ModelName = "deeplabv3_resnet101"
    """Model name as in the reference implementation: dense `deeplabv3_resnet*`, content-adaptive
    `deeplabv3_batch_ap_resnet*` (edge mask) or `deeplabv3_ad_resnet*` (learned mask)."""
    output_stride: Literal[8, 16] = 16
    """Output stride of a dense backbone (8 or 16); adaptive models take theirs from adaptive_mode."""
    adaptive_mode: AdaptiveMode = "os8to16"
    """Adaptive models: os8to16 (the paper's), os8to32 or os16to32 (method §4)."""
    edge_threshold: float = Field(0.15, gt=0)
    """Adaptive models: edge threshold τ of the mask (§6; the released model: 0.15)."""
    trimap_width: int = Field(11, ge=1)
    """Adaptive models: trimap width w (§6; the released model: 11)."""
    mask_variant: Literal["reference", "corrected"] = "reference"
    """Adaptive models: the reference's edge mask (one-sided, border artefacts, 4×4 blocks) or the
    corrected one (|gradient|, no border artefacts, 2×2 blocks)."""
    gumbel_tau: float = Field(1.0, gt=0)
    """Learned-mask models: temperature τ of the Gumbel-softmax mask sample (§7.2; released: 1)."""
    target_low_res: float = Field(0.3, ge=0, le=1)
    """Learned-mask models: target low-resolution share ρ of the ratio loss (§7.4; default 0.3,
    the released model: 0.5)."""
    head: HeadKind = "dense"
    """Adaptive models: the DeepLabv3 head on the dense map at the finest grid (dense, the
    method's) or on the backbone's mixed-resolution elements, each at its own level (adaptive:
    a uniform OS16 region costs the OS16 head; see docs/method.md). Same parameters either way."""
    mask_sampling: Literal["gumbel", "argmax"] = "gumbel"
    """Learned-mask models at evaluation: draw Gumbel noise as the reference does (§7.2 quirk:
    stochastic, seed-dependent results) or take the deterministic arg-max."""
    backbone_weights: str | None = None
    """torchvision ImageNet ResNet state dict to initialise the backbone (e.g. resnet101-63fe2227.pth);
    None: random initialisation (only sensible for the tiny demo model)."""
    weights: str | None = None
    """Whole-model weights to start from (reference checkpoint, torchvision or cadist export), or
    an MLflow URI such as `runs:/<run_id>` (that run's best weights), fetched once by the driver."""

    @model_validator(mode="after")
    def _an_adaptive_head_needs_an_adaptive_model(self) -> ModelConfig:
        if self.head == "adaptive" and self.name.startswith("deeplabv3_resnet"):
            raise ValueError(
                f"model.head adaptive runs on the elements of an adaptive backbone, and "
                f"{self.name} is dense: use a deeplabv3_batch_ap_* or deeplabv3_ad_* model, or "
                f"model.head dense"
            )
        return self

    def build_kwargs(self) -> dict[str, Any]:
        """Arguments of `cadist.nets.build.build_model` for this section."""
        return {
            "name": self.name,
            "output_stride": self.output_stride,
            "adaptive_mode": self.adaptive_mode,
            "edge_threshold": self.edge_threshold,
            "trimap_width": self.trimap_width,
            "mask_variant": self.mask_variant,
            "gumbel_tau": self.gumbel_tau,
            "target_low_res": self.target_low_res,
            "mask_sampling": self.mask_sampling,
            "head": self.head,
        }


class DataConfig(_Section):
    """The data: training and validation shards, crops and augmentation, the loader's workers."""

    train_shards: str = "shards/cityscapes/train-manifest.json"
    """Training shards: a manifest, a brace pattern or a URL list (comma-free string)."""
    val_shards: str = "shards/cityscapes/val-manifest.json"
    """Validation shards, read once per evaluation at full resolution."""
    crop_size: int = Field(768, ge=16)
    """Square random crop of training images (method §1.3); never padded."""
    num_workers: int = Field(2, ge=0)
    """DataLoader worker processes per rank."""
    shuffle_buffer: int = Field(64, ge=1)
    """Samples held for shuffling per loader worker."""
    steps_per_epoch: int = Field(100, ge=1)
    """Length of one data-stream epoch in optimiser steps; shard order is reshuffled every epoch."""
    skip_bad: bool = False
    """Skip (and count) corrupt shards and samples instead of stopping."""
    allow_pipe: bool = False
    """Allow `pipe:` shard URLs (runs the command: only for trusted jobs)."""


class TrainConfig(_Section):
    """The optimisation (method §8): steps, batch, learning rates and schedule, loss, seed,
    logging and checkpoint intervals."""

    iterations: int = Field(30_000, ge=1)
    """Optimiser steps in all (method §8: 30 000)."""
    batch_size: int = Field(8, ge=1)
    """Global batch size, split evenly over the workers."""
    lr_backbone: float = Field(0.01, gt=0)
    """Learning rate of the backbone at step 0 (method §8: 0.01)."""
    lr_head: float = Field(0.1, gt=0)
    """Learning rate of the DeepLabv3 head at step 0 (method §8: 0.1, ten times the backbone's)."""
    lr_mask_estimator: float = Field(0.001, gt=0)
    """Learned-mask models: learning rate of the mask estimator (§8: 0.001)."""
    momentum: float = Field(0.9, ge=0, lt=1)
    """SGD momentum (method §8: 0.9)."""
    weight_decay: float = Field(1e-4, ge=0)
    """SGD weight decay (method §8: 1e-4)."""
    poly_power: float = Field(0.9, gt=0)
    """Power of the poly schedule (method §8: 0.9)."""
    min_lr: float = Field(1e-6, ge=0)
    """Floor of the poly schedule: lr_t = max(lr0·(1 − t/T)^power, min_lr)."""
    seed: int = 1
    """Seed of the initialisation, data order and augmentation (the same on every rank)."""
    log_every: int = Field(10, ge=1)
    """Steps between training-metric reports."""
    checkpoint_every: int = Field(100, ge=1)
    """Steps between checkpoints reported to Ray (DeepSpeed state, step, data position, RNG)."""
    keep_checkpoints: int = Field(2, ge=1)
    """How many of the latest checkpoints Ray keeps."""


class EvalConfig(_Section):
    """Evaluation during training: how often, on how many images, and the protocol (scales,
    flips, sliding windows)."""

    interval: int = Field(100, ge=1)
    """Steps between evaluations on the validation shards (and one at the end)."""
    batch_size: int = Field(1, ge=1)
    """Validation images per rank and batch."""
    log_images: int = Field(3, ge=0)
    """Validation predictions logged to MLflow as images at each evaluation."""
    learned_inference: bool = True
    """Learned-mask models: also evaluate the irregular inference network (§7.5) built from the
    current weights (`val/miou_inference`), beside the training network (`val/miou`)."""
    window: str | None = None
    """Sliding-window evaluation (mmsegmentation's "slide" mode), e.g. "512x1024": the network runs
    on crops of that many pixels, their logits averaged where they overlap; an adaptive network
    builds a mask per crop, and the logged GMac is the crops' total at crop size (§10). Sides must
    be multiples of the model's input multiple (32 for most). None: whole images (the paper's
    protocol). `cadist eval --window` evaluates a checkpoint the same way."""
    stride: str | None = None
    """With `window`: pixels between crops, e.g. "341x683" (default two thirds of the window)."""
    scales: list[float] = [1.0]
    """Test-time augmentation (mmsegmentation's "aug test"): each validation image also runs
    resized by these factors of its sides, e.g. [0.75, 1.0, 1.25] (or "0.75,1,1.25"), and the
    class probabilities of all passes are averaged; the logged GMac is all passes' total. [1.0]:
    the paper's single-scale protocol. `cadist eval` takes it as its default `--scales`."""
    flip: bool = False
    """Test-time augmentation: each scale also runs mirrored (doubles the evaluation's cost)."""

    @field_validator("scales", mode="before")
    @classmethod
    def _scales(cls, value):
        try:
            return list(parse_scales(value, "eval.scales"))
        except ConfigError as exn:
            raise ValueError(str(exn)) from None

    @model_validator(mode="after")
    def _a_protocol(self) -> EvalConfig:
        try:
            self.augmentation()
        except ConfigError as exn:
            raise ValueError(str(exn)) from None
        return self

    def augmentation(self) -> Augmentation | None:
        """The evaluation protocol these keys set: None for the paper's (whole images, one scale,
        no flip), else the `Augmentation` every evaluation runs."""
        tta = Augmentation.parse(self.scales, self.flip, self.window, self.stride, JOB_NAMES)
        return None if tta.plain else tta


class ClusterConfig(_Section):
    """Where and how the job runs: Ray address, workers and their resources, GPUs, the
    storage path, failure handling and elastic sizes."""

    num_workers: int = Field(1, ge=1)
    """Ray Train workers (data-parallel ranks); with `min_workers`, the most."""
    min_workers: int | None = Field(None, ge=1)
    """Elastic training: the fewest workers training goes on with. A worker or node lost restarts
    the group from the latest checkpoint on the workers the cluster still holds (at least this
    many) instead of waiting for the lost ones, and Ray Train grows it back towards `num_workers`
    when nodes return (checked every minute). The global batch stays `train.batch_size`, so it
    must divide evenly over every count from here to `num_workers`; ZeRO 1/2 optimizer state is
    re-split for the new count. None: exactly `num_workers`."""
    elastic_resize_s: float = Field(60, gt=0)
    """Elastic training: seconds between Ray Train's checks, while the group trains with fewer than
    `num_workers`, for room to grow it back. Growing restarts the group from the latest checkpoint
    (the steps since are trained again), so where nodes come and go often a longer interval costs
    fewer restarts."""
    use_gpu: bool = False
    """One GPU per worker; BatchNorm is synchronised across GPU workers."""
    cpus_per_worker: float = Field(1, gt=0)
    """CPUs Ray reserves for each worker (its DataLoader processes included)."""
    max_failures: int = Field(2, ge=0)
    """Worker failures tolerated; training restarts from the latest checkpoint each time."""
    address: str | None = None
    """Ray cluster address (`auto`, `ray://host:10001`); None: start a local Ray."""
    storage_path: str = "cadist_runs"
    """Where Ray and cadist keep checkpoints and run state: `s3://bucket/prefix` or
    `gs://bucket/prefix` (object storage, what a cloud cluster's nodes share; credentials and
    endpoint from the environment: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY/AWS_ENDPOINT_URL,
    GOOGLE_APPLICATION_CREDENTIALS), or a folder — absolute, relative to the working directory, or
    `file://…`; on several nodes, one every node mounts at the same path (NFS and the like)."""

    @field_validator("storage_path")
    @classmethod
    def _a_storage_root(cls, v: str) -> str:
        from cadist.storage.uri import StorageError, check_uri

        try:
            check_uri(v)
        except StorageError as exn:
            raise ValueError(str(exn)) from None
        return v

    network_interface: str | None = Field(None, pattern=r"^[A-Za-z0-9_.:@-]{1,15}$")
    """The network interface the workers' process group (gloo on CPUs, NCCL on GPUs) talks over,
    e.g. `eth0`. None: on each worker, the interface that carries its Ray node IP — not the
    address the hostname resolves to, which is loopback on many images. `GLOO_SOCKET_IFNAME` /
    `NCCL_SOCKET_IFNAME` in the workers' environment win over both."""
    autoscale: bool = False
    """The Ray cluster adds nodes on demand (an autoscaling cluster from `ray up`): when the nodes
    that are up cannot hold the workers, wait for more instead of stopping with an error."""
    start_timeout_s: float = Field(120, gt=0)
    """Seconds Ray Train may take to start all workers — at the beginning and after a failure.
    Without `autoscale`, a second start that times out (nodes lost for good) ends the run with an
    error instead of waiting forever; rerunning the job resumes from its last checkpoint. Elastic
    jobs (`min_workers`) allow five: for some 20-30 s after a node loss Ray Train still counts the
    lost node, and each start for it waits this long (a shorter timeout resumes sooner)."""
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "WARNING"
    """Ray Train's own messages on the console (worker-group starts, each checkpoint and report);
    cadist's progress lines always show. INFO shows Ray Train's too (also kept in the Ray
    session's `logs/train/` files at every level)."""


class DeepSpeedConfig(_Section):
    """DeepSpeed: ZeRO stage, precision, gradient accumulation and clipping (the DeepSpeed JSON
    is generated from these, never hand-edited)."""

    zero_stage: Literal[0, 1, 2] = 0
    """DeepSpeed ZeRO stage: 0 replicates the optimizer state, 1 and 2 partition it over the
    workers (a resume on another number of workers re-splits it)."""
    bf16: Literal["auto", True, False] = "auto"
    """bf16 training: "auto" = on with GPUs, fp32 on the CPU accelerator. bf16 runs as torch autocast
    with fp32 weights (DeepSpeed's `torch_autocast`): on an H200 DeepSpeed's bf16-weights mode cost
    213 ms per ResNet-101 step vs 67 ms (bench/results), and failed without channels-last."""
    gradient_accumulation_steps: int = Field(1, ge=1)
    """Micro-batches per optimiser step on each worker: each worker runs train.batch_size /
    (cluster.num_workers × this) images at a time, and the gradients of this many add up before
    the step — for GPUs too small for the recipe's batch. The step and the schedule are unchanged;
    BatchNorm statistics then come from each micro-batch (across workers), not the whole batch."""
    gradient_clipping: float = Field(0.0, ge=0)
    """Clip the global gradient norm; 0 = off, as in the method's recipe (§8). Set explicitly
    because DeepSpeed's own default (1.0) would silently shrink the recipe's steps."""


class MlflowConfig(_Section):
    """MLflow: whether and where runs are tracked, the experiment, model registration and
    system metrics."""

    enabled: bool = True
    """Track the run in MLflow (params, metrics, artifacts, checkpoints)."""
    tracking_uri: str | None = None
    """None: $MLFLOW_TRACKING_URI, else a local SQLite store `sqlite:///<cwd>/mlflow.db`."""
    experiment: str = "cadist"
    """The MLflow experiment the run is logged to."""
    register_model: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    """Registered-model name: when training ends, the run's best weights become a version of it in
    MLflow's model registry (`models:/<name>/<version>` or `models:/<name>/latest` for
    `cadist predict --ckpt`); None: no registration."""
    system_metrics_s: float = Field(10.0, ge=0)
    """Seconds between samples of each node's CPU, memory, disk, network and GPU use, logged as
    `system/node<k>/…` metrics of the run (MLflow's system metrics, one sampler per node); 0 = off."""


class JobConfig(_Section):
    """One training job: its name and the sections below (a job file is this as YAML)."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    """Run name: rerunning the same name resumes it."""
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    cluster: ClusterConfig = ClusterConfig()
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    mlflow: MlflowConfig = MlflowConfig()

    @model_validator(mode="after")
    def _cross_checks(self) -> JobConfig:
        n, low = self.cluster.num_workers, self.cluster.min_workers
        if low is not None and low > n:
            raise ValueError(
                f"cluster.min_workers {low} is more than cluster.num_workers {n}; elastic "
                f"training runs on min_workers … num_workers workers"
            )
        for count in [n, *(c for c in self.worker_counts if c != n)]:  # num_workers first
            self._check_batch_split(count)
        if self.model.name.startswith("deeplabv3_ad_") and self.model.adaptive_mode != "os8to16":
            raise ValueError(
                f"model.adaptive_mode {self.model.adaptive_mode}: learned-mask models "
                f"({self.model.name}) are OS 8→16 only; set model.adaptive_mode: os8to16"
            )
        if self.model.name.startswith("deeplabv3_ad_") and self.data.crop_size % 32:
            raise ValueError(
                f"data.crop_size {self.data.crop_size}: learned-mask models need crops divisible "
                f"by 32 (2×2 mask blocks at OS16); use {self.data.crop_size // 32 * 32}"
            )
        return self

    def _check_batch_split(self, n: int) -> None:
        """The global batch splits evenly over `n` workers (and accumulation steps), and no
        BatchNorm sees a single image."""
        acc, low, top = (self.deepspeed.gradient_accumulation_steps, self.cluster.min_workers,
                         self.cluster.num_workers)  # fmt: skip
        if low is not None and n != top and self.train.batch_size % (n * acc):
            m = self._lowest_min_workers()
            raise ValueError(
                f"train.batch_size {self.train.batch_size} does not split over {n} workers"
                + (f" × {acc} accumulation steps" if acc > 1 else "")
                + f", which elastic training (cluster.min_workers {low} … num_workers {top}) may "
                f"run on; every count in the range must split the global batch: "
                + (f"use min_workers {m}, " if m < top else "")
                + f"narrow the range, or use a batch of {math.lcm(*range(low, top + 1)) * acc}"
            )
        if self.train.batch_size % (n * acc):
            split = f"cluster.num_workers {n}" + (
                f" × deepspeed.gradient_accumulation_steps {acc} = {n * acc}" if acc > 1 else ""
            )
            raise ValueError(
                f"train.batch_size {self.train.batch_size} is not divisible by {split}; use a "
                f"multiple of {n * acc} (e.g. {n * acc * max(1, self.train.batch_size // (n * acc))})"
                + (" or fewer accumulation steps" if acc > 1 else "")
            )
        if n == 1 and self.micro_batch_for(1) == 1:
            raise ValueError(
                f"train.batch_size {self.train.batch_size} on one worker"
                + (f" in {acc} accumulation steps" if acc > 1 else "")
                + " runs 1 image at a time: BatchNorm after the ASPP's image pooling needs 2 or "
                "more (one value per channel); use batches of 2+ images per step or more workers"
            )

    def _lowest_min_workers(self) -> int:
        """The lowest `min_workers` whose range up to `num_workers` splits the global batch."""
        acc, m = self.deepspeed.gradient_accumulation_steps, self.cluster.num_workers
        while m > 1 and self.train.batch_size % ((m - 1) * acc) == 0:
            m -= 1
        return m

    @property
    def worker_counts(self) -> range:
        """The worker counts the job may train on: `num_workers`, or `min_workers` … `num_workers`."""
        return range(
            self.cluster.min_workers or self.cluster.num_workers, self.cluster.num_workers + 1
        )

    def micro_batch_for(self, world: int) -> int:
        """Images one of `world` workers runs at a time (the batch over workers and accumulation)."""
        return self.train.batch_size // (world * self.deepspeed.gradient_accumulation_steps)

    @property
    def micro_batch(self) -> int:
        """Images one worker runs at a time with `cluster.num_workers` workers."""
        return self.micro_batch_for(self.cluster.num_workers)

    def flat(self) -> dict[str, Any]:
        """Dotted keys → values, for MLflow params (the tracker shows credentials as ***)."""
        out = {}

        def walk(prefix, obj):
            for k, v in obj.items():
                if isinstance(v, dict):
                    walk(f"{prefix}{k}.", v)
                elif isinstance(v, list):  # eval.scales: "0.75,1.0,1.25", as the CLI takes it
                    out[f"{prefix}{k}"] = ",".join(map(str, v))
                else:
                    out[f"{prefix}{k}"] = v

        walk("", self.model_dump())
        return out

    def to_yaml(self) -> str:
        """The job as YAML to write or show: credentials in its values as *** (`cadist.redact`);
        the run itself uses `model_dump()`."""
        return yaml.safe_dump(redact(self.model_dump()), sort_keys=False)
