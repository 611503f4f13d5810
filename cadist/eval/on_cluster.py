"""`cadist eval --address`: evaluations as Ray tasks on a Ray cluster — one per setting of
`--vary`, side by side as the nodes allow, each on a GPU when the job's `cluster.use_gpu`. The
weights travel from this machine through Ray's object store; the validation shards are read where
the task runs (shared storage or URLs, as for training). Plain Ray tasks, not Ray Train: an
evaluation is one process."""

from __future__ import annotations

from pathlib import Path

from cadist.config.passes import Augmentation
from cadist.config.schema import JobConfig
from cadist.errors import CadistError, ClusterError, ConfigError


def evaluate_on_cluster(
    runs: list[tuple[JobConfig, Augmentation | None]],
    weights: Path,
    address: str,
    source: str,
    per_image: bool = False,
    echo=None,
    shares: int = 1,
    bar=None,
) -> list[dict]:
    """`evaluate_job` of `weights` (a local file) for each (job, protocol) of `runs`, as Ray tasks
    on the cluster at `address` (`local`: a Ray started here, e.g. over a workstation's GPUs):
    `shares` tasks per run, each evaluating its share of the validation images, added up here.
    Results in the order of `runs`; `echo(i, result)` as each run's last share ends; `bar` (a
    cadist.progress.Bar) follows the images evaluated (the tasks count them in a small actor). A
    failure in a task is raised here as its own error (a `CadistError` keeps its one-line
    message)."""
    import ray

    from cadist.cluster.paths import absolute_paths
    from cadist.cluster.ray import (
        cluster_nodes,
        connect_ray,
        describe_nodes,
        placeable,
        worker_request,
    )
    from cadist.eval.evaluate import combine_parts

    first = runs[0][0]
    connect_ray(address, first.cluster.use_gpu, source)
    request = worker_request(first)  # an evaluation task takes what a training worker takes
    nodes = cluster_nodes()
    if placeable(nodes, request) == 0:
        per = ", ".join(f"{v:g} {k}" for k, v in request.items())
        raise ConfigError(
            f"{source}: an evaluation task needs {per} (cluster.cpus_per_worker"
            + (", cluster.use_gpu" if first.cluster.use_gpu else "")
            + f") and no node of the Ray cluster has that ({describe_nodes(nodes)}); lower "
            f"cluster.cpus_per_worker"
            + (", set cluster.use_gpu=false" if first.cluster.use_gpu else "")
            + ", or evaluate here without --address"
        )
    blob = ray.put(weights.read_bytes())
    task = ray.remote(_evaluate_task).options(
        num_cpus=request["CPU"], num_gpus=request.get("GPU", 0.0), max_retries=0
    )
    counter = ray.remote(num_cpus=0)(_Counter).remote() if bar is not None else None
    pending = {
        task.remote(absolute_paths(job), blob, weights.name, tta, per_image, share, shares,
                    counter): i
        for i, (job, tta) in enumerate(runs)
        for share in range(shares)
    }  # fmt: skip
    parts: list[list] = [[] for _ in runs]
    results: list[dict | None] = [None] * len(runs)
    try:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
            if counter is not None:
                bar.update_to(ray.get(counter.get.remote()))
            if not done:
                continue
            i = pending.pop(done[0])
            parts[i].append(_result(done[0], source))
            if len(parts[i]) < shares:
                continue
            job, tta = runs[i]
            ordered = sorted(parts[i], key=lambda p: p["share"])  # the same result every time
            results[i] = combine_parts(job, [p["part"] for p in ordered], tta)
            where = sorted({(p["node"], p["device"]) for p in ordered})
            results[i]["ran_on"] = [{"node": n, "device": d} for n, d in where]
            results[i]["tasks"] = shares
            if echo:
                echo(i, results[i])
    finally:
        for ref in pending:  # an error ends the others (they would be wasted GPU time)
            ray.cancel(ref, force=True)
        if counter is not None:
            ray.kill(counter)
    return results


class _Counter:
    """Images the evaluation tasks have done (a Ray actor: they add, the driver reads)."""

    def __init__(self):
        self.n = 0

    def add(self, k: int) -> None:
        self.n += k

    def get(self) -> int:
        return self.n


def _result(ref, source: str) -> dict:
    import ray
    from ray.exceptions import RayTaskError

    try:
        return ray.get(ref)
    except RayTaskError as exn:
        cause = exn.cause
        if isinstance(cause, CadistError):
            raise cause from None
        raise ClusterError(
            f"{source}: an evaluation task failed on the Ray cluster: "
            f"{type(cause).__name__ if cause else 'error'}: {str(cause or exn).splitlines()[0]}"
        ) from exn


def _evaluate_task(
    job: JobConfig,
    weights: bytes,
    name: str,
    tta: Augmentation | None,
    per_image: bool,
    share: int,
    shares: int,
    counter=None,
) -> dict:
    """In the Ray task: the weights as a temporary file, share `share` of `shares` of the
    validation images evaluated as `cadist eval` would (`evaluate_part`); each batch's images
    added to `counter` (a `_Counter` actor) if given."""
    import tempfile

    import ray
    import torch

    from cadist.eval.evaluate import evaluate_part

    use_gpu = job.cluster.use_gpu and torch.cuda.is_available()
    if not use_gpu:
        torch.set_num_threads(max(1, int(job.cluster.cpus_per_worker)))
    with tempfile.TemporaryDirectory(prefix="cadist-eval-") as tmp:
        path = Path(tmp) / name
        path.write_bytes(weights)
        device = "cuda" if use_gpu else "cpu"
        progress = None if counter is None else (lambda k: counter.add.remote(k))
        part = evaluate_part(job, path, device, tta, per_image, share, shares, progress=progress)
    return {"part": part, "share": share, "node": ray.util.get_node_ip_address(), "device": device}
