"""Which Ray cluster a job runs on: starting or joining it (an address nothing answers at is one
error, not minutes of retries), checking that its nodes can hold the job's workers, the workers'
environment, and recognising runs that ended because workers could not start (nodes lost)."""

from __future__ import annotations

import logging
import os
import socket

from cadist.config.schema import JobConfig
from cadist.errors import ConfigError
from cadist.progress import library_log


def worker_env(use_gpu: bool) -> dict[str, str]:
    """Environment of the Ray Train workers: CPU workers pin DeepSpeed's CPU accelerator and one
    OpenMP thread each (ranks share the cores); GPU workers let DeepSpeed find CUDA."""
    env = {"TOKENIZERS_PARALLELISM": "false"}
    if not use_gpu:
        env |= {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    return env


def worker_request(job: JobConfig) -> dict[str, float]:
    """Ray resources of one training worker."""
    return {"CPU": float(job.cluster.cpus_per_worker)} | (
        {"GPU": 1.0} if job.cluster.use_gpu else {}
    )


def placeable(nodes: list[dict[str, float]], request: dict[str, float]) -> int:
    """How many workers asking for `request` fit on these nodes' total resources."""
    return sum(
        int(min(node.get(k, 0.0) / v for k, v in request.items() if v > 0) + 1e-9) for node in nodes
    )


def check_resources(
    job: JobConfig, source: str, nodes: list[dict[str, float]], workers: int | None = None
) -> str | None:
    """Stop at once when the Ray cluster's nodes cannot hold the job's workers (Ray Train would wait
    and retry forever); with `cluster.autoscale` return a warning instead. `workers`: how many must
    fit (default all of the job's; elastic jobs: `cluster.min_workers`)."""
    need = (job.cluster.min_workers or job.cluster.num_workers) if workers is None else workers
    request = worker_request(job)
    fit = placeable(nodes, request)
    if fit >= need:
        return None
    gpus = sum(n.get("GPU", 0.0) for n in nodes)
    have = describe_nodes(nodes)
    if job.cluster.use_gpu and gpus == 0:
        msg = (
            f"cluster.use_gpu is true and the Ray cluster has no GPU ({have}); set "
            f"cluster.use_gpu=false to train on CPUs, or point cluster.address at a GPU cluster"
        )
    else:
        per = ", ".join(f"{v:g} {k}" for k, v in request.items())
        msg = (
            f"cluster.{'min' if job.cluster.min_workers and workers is None else 'num'}_workers "
            f"{need} needs {need} workers of {per} each and the Ray cluster "
            f"holds {fit} ({have}); lower cluster.num_workers"
            + (" or cluster.cpus_per_worker" if request["CPU"] > 1 or fit == 0 else "")
            + ", or add nodes"
        )
    if job.cluster.autoscale:
        return f"waiting for the autoscaler: {msg}"
    raise ConfigError(f"{source}: {msg} (or set cluster.autoscale=true if nodes are on the way)")


def trial_slots(job: JobConfig, nodes: list[dict[str, float]], wanted: int) -> int:
    """How many trials of `job` (a sweep's) can train at once: `wanted`, or fewer when the nodes hold
    fewer jobs of its workers side by side (a trial that cannot start would time out and fail);
    with `cluster.autoscale` always `wanted`."""
    if job.cluster.autoscale:
        return wanted
    return max(1, min(wanted, placeable(nodes, worker_request(job)) // job.cluster.num_workers))


def _endpoint(address: str) -> tuple[str, int] | None:
    """(host, port) that `ray.init(address)` will connect to, where it can be known up front."""
    if address == "auto":
        address = os.environ.get("RAY_ADDRESS", "")
        if not address:
            try:  # the address `ray start` recorded on this machine
                from ray._private.utils import read_ray_address

                address = read_ray_address() or ""
            except Exception:
                return None
    address = address.removeprefix("ray://")
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def _dashboard_port() -> int:
    """Ray's default dashboard port where it is free, else any free port (of 127.0.0.1)."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", 8265))
        except OSError:
            s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def connect_ray(address: str | None, use_gpu: bool, source: str) -> None:
    """Start a local Ray (`None`/`local`) or join the cluster at `address` (`auto`, `host:port`,
    `ray://host:port`) unless this process is connected already. An address nothing answers at is
    one error within seconds (Ray itself keeps retrying for minutes)."""
    import ray

    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    if ray.is_initialized():
        return
    address = address or "local"
    target = None if address == "local" else _endpoint(address)
    if target is None and address not in ("local", "auto"):
        raise ConfigError(
            f"{source}: Ray cluster address {address!r}: expected auto, HOST:PORT (the head's "
            f"GCS, e.g. 10.0.0.10:6379) or ray://HOST:10001; leave it unset for a local Ray"
        )
    if target:
        try:
            socket.create_connection(target, timeout=5).close()
        except OSError as exn:
            raise ConfigError(
                f"{source}: Ray cluster address {address}: nothing answers at "
                f"{target[0]}:{target[1]} ({exn.strerror or exn}); start the cluster's head "
                f"(`ray start --head`), fix cluster.address / --address, or leave it unset for a "
                f"local Ray"
            ) from None
    _token_notice_to_log_file()
    env, local = worker_env(use_gpu), {}
    if address == "local":  # one machine: no spot preemption for Ray Train to watch for
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        # Ray Train's actors ask the State API about each other; without an address Ray looks for
        # GCS processes on the machine and, with a second Ray there, fails (or asks the other one)
        local["dashboard_port"] = _dashboard_port()
        env["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{local['dashboard_port']}"
    try:
        ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=True, **local)
        _quiet_ray_noise()
    except ray.exceptions.AuthenticationError as exn:
        raise ConfigError(
            f"{source}: Ray cluster address {address}: the cluster refused this machine "
            f"({str(exn).strip().splitlines()[0]}); it runs with token auth: copy the head's "
            f"~/.ray/auth_token here (or set RAY_AUTH_TOKEN) and RAY_AUTH_MODE=token"
        ) from None
    except (ConnectionError, RuntimeError) as exn:
        if address == "local":
            raise
        raise ConfigError(
            f"{source}: Ray cluster address {address}: no Ray cluster answers there "
            f"({str(exn).strip().splitlines()[0]}); check the address (the head's `ray start` "
            f"prints it), or leave cluster.address unset for a local Ray"
        ) from None


class _ToLogFile(logging.Filter):
    """Sends records that start with `prefix` to cadist's log file instead of the console."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.getMessage().startswith(self.prefix):
            return True
        library_log(record)
        return False


def _token_notice_to_log_file() -> None:
    """Ray's notice that a new local cluster uses token auth (its default, which cadist keeps) to
    the log file: said on every start, it is not news on the console."""
    logger = logging.getLogger("ray._private.authentication.authentication_token_setup")
    if not any(isinstance(f, _ToLogFile) for f in logger.filters):
        logger.addFilter(_ToLogFile("Token authentication is enabled for this Ray cluster"))


#: Ray's own messages that a healthy run prints and a user cannot act on, kept off the console
#: (the Ray session's log files still hold them; docs/training.md lists them): (actor, first line
#: of the message, last line of its traceback or None for a one-line message)
RAY_NOISE = (
    # Ray Train's placement-group safety net asks the State API whether the controller lives; without
    # the dashboard (or with several local Ray instances) each check fails, and says so
    ("PlacementGroupCleaner", "Failed to query Ray Train Controller actor state.", None),
    ("PlacementGroupCleaner", "Exception in thread PlacementGroupCleanerMonitor",
     "ConnectionError: Found multiple active Ray instances"),
    # the controller's first autoscaler request times out while the coordinator actor still starts
    # (a busy machine); Ray: "safe to ignore"
    ("TrainController", "Failed to send resource request for", "GetTimeoutError"),
    # Ray core on the preemption watcher's restart policy (its arguments are in the object store)
    ("TrainController", None, "has constructor arguments in the object store and max_restarts"),
)  # fmt: skip


def _traceback_line(line: str) -> bool:
    """Whether `line` can be part of a Python traceback after its first line."""
    return not line.strip() or line.startswith(
        (" ", "\t", "Traceback", "During handling", "The above exception")
    )


def _drop_noise(lines: list[str], actor: str | None, pending: dict | None = None) -> list[str]:
    """`lines` of one batch of `actor`'s output without the RAY_NOISE messages in it (a message
    with a traceback only where the traceback ends as listed: another error stays).

    `pending` (one dict per actor process, kept between its batches): Ray hands a process's output
    over in batches, and a busy machine can cut a traceback between two of them; a noise message
    whose traceback runs to the end of a batch is dropped, and its end is looked for at the start of
    the next batch (lines that cannot belong to a traceback end the wait and print)."""
    rules = [(first, last) for who, first, last in RAY_NOISE if who == actor]
    out, i = [], 0
    if pending and pending.get("last"):
        last = pending.pop("last")
        while i < len(lines) and last not in lines[i] and _traceback_line(lines[i]):
            i += 1
        if i < len(lines) and last in lines[i]:
            i += 1
        elif i == len(lines):
            pending["last"] = last  # still inside it
    while i < len(lines):
        line, end = lines[i], None
        for first, last in rules:
            if first is None and last in line:
                end = i
            elif first is not None and first in line:
                ends = [j for j in range(i, len(lines)) if last is None or last in lines[j]]
                end = ends[0] if ends else None
                if (
                    end is None
                    and pending is not None
                    and all(map(_traceback_line, lines[i + 1 :]))
                ):
                    pending["last"], end = last, len(lines) - 1  # the rest comes in the next batch
            if end is not None:
                break
        if end is None:
            out.append(line)
            i += 1
        else:
            i = end + 1
    return out


def _quiet_ray_noise() -> None:
    """Wrap Ray's printer of worker output (the driver's `log_to_driver`) so that RAY_NOISE
    messages are dropped; every other line prints as before."""
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    with dispatcher._lock:
        handlers = dict(dispatcher.handlers)
    printer = handlers.get("ray_print_logs")
    if printer is None or getattr(printer, "_cadist", False):
        return

    pending: dict = {}  # (node, pid) → what `_drop_noise` waits for in that process's next batch

    def filtered(data: dict) -> None:
        key = (data.get("ip"), data.get("pid"))
        lines = _drop_noise(
            list(data.get("lines") or []), data.get("actor_name"), pending.setdefault(key, {})
        )
        if not pending[key]:
            del pending[key]
        if lines:
            printer({**data, "lines": lines})

    filtered._cadist = True
    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("ray_print_logs", filtered)


def is_start_failure(exn: BaseException) -> bool:
    """Whether a failed fit() ended on worker groups that could not start (not a training bug)."""
    from ray.train.v2._internal.exceptions import (
        InsufficientClusterResourcesError,
        WorkerGroupStartupFailedError,
        WorkerGroupStartupTimeoutError,
    )

    kinds = (WorkerGroupStartupTimeoutError, WorkerGroupStartupFailedError,
             InsufficientClusterResourcesError)  # fmt: skip
    seen = set()
    while exn is not None and id(exn) not in seen:
        seen.add(id(exn))
        if isinstance(exn, kinds):
            return True
        exn = exn.__cause__ or exn.__context__ or getattr(exn, "controller_failure", None)
    return False


def describe_nodes(nodes: list[dict[str, float]]) -> str:
    cpus = sum(n.get("CPU", 0.0) for n in nodes)
    gpus = sum(n.get("GPU", 0.0) for n in nodes)
    return f"{cpus:g} CPUs and {gpus:g} GPUs on {len(nodes)} node{'s' * (len(nodes) != 1)}"


def cluster_nodes() -> list[dict[str, float]]:
    """Total resources of every live node of the connected Ray cluster."""
    import ray

    return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]


def _sees(path: str) -> tuple[str, bool]:
    import ray

    return ray.util.get_node_ip_address(), os.path.exists(path)


def check_shared_paths(paths: dict[str, str], source: str) -> None:
    """Local folders and files the job's nodes must share (`{"cluster.storage_path": folder,
    "mlflow.tracking_uri": sqlite file}`): on a cluster of several nodes, a probe file written
    here must be seen from every node that can run a worker, else one ConfigError naming the
    nodes that do not see it and the fix — before anything starts (Ray Train would otherwise
    write each rank's checkpoint to its own node's disk, and a worker log to a store of its own)."""
    import uuid

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU", 0) > 0]
    if len(nodes) < 2:
        return
    for key, path in paths.items():
        folder = path if os.path.isdir(path) else os.path.dirname(path) or "."
        probe = os.path.join(folder, f".cadist-probe-{uuid.uuid4().hex[:8]}")
        try:
            open(probe, "w").close()
        except OSError:
            continue  # not writable here: the job's own checks say so
        try:
            seen = ray.get([
                ray.remote(num_cpus=0)(_sees).options(scheduling_strategy=NodeAffinitySchedulingStrategy(
                    n["NodeID"], soft=False)).remote(probe)
                for n in nodes
            ], timeout=60)  # fmt: skip
        finally:
            os.unlink(probe)
        blind = sorted(ip for ip, ok in seen if not ok)
        if blind:
            fix = ("use object storage (s3://bucket/runs, gs://…) or a folder every node mounts "
                   "at the same path" if key == "cluster.storage_path" else
                   "use an MLflow server every node reaches (mlflow.tracking_uri: "
                   "http://host:5000)")  # fmt: skip
            raise ConfigError(
                f"{source}: {key} {path} is on this machine's disk, but the Ray cluster's "
                f"node(s) {', '.join(blind)} do not see it (no shared filesystem); {fix}"
            )
