"""The product on hosts that share nothing but a network (tests/hosts/harness.py): a Ray head and a
worker node, each its own network, hostname, /tmp, /dev/shm and working directory, and a storage
host whose S3 API server (moto) and MLflow server hold shards, checkpoints, run state and the
runs, and a laptop host. The worker node's hostname resolves to loopback (Debian's 127.0.1.1), the
case cadist's choice of the process-group interface (the one carrying the Ray node IP) is for."""

import json
import secrets
import time
from pathlib import Path

import pytest

from .harness import Hosts

pytestmark = pytest.mark.slow
PROJECT = Path(__file__).resolve().parents[2]
JOB = str(PROJECT / "jobs" / "demo.yaml")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Hosts head, node, store, laptop: on `store` an S3 API server (moto) holding the shards and
    an MLflow server (artifacts in the same bucket); a Ray head on `head` (token auth, its
    dashboard and job API on its own address), `node` joined to it. Yields (hosts, env, logs)."""
    logs = tmp_path_factory.mktemp("hosts")
    # the worker node's hostname resolves to loopback, as on Debian: gloo must not use it
    with Hosts(["head", "node", "store", "laptop"], loopback_names=("node",)) as hosts:
        head, node, store = hosts["head"], hosts["node"], hosts["store"]
        env = {
            "AWS_ENDPOINT_URL": "http://store:9000",  # each host's /etc/hosts resolves the names
            "AWS_ACCESS_KEY_ID": "cadist-hosts",
            "AWS_SECRET_ACCESS_KEY": "cadist-hosts-secret",
            "AWS_REGION": "us-east-1",
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": secrets.token_hex(16),
            "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
        }
        store.start(["moto_server", "-H", store.ip, "-p", "9000"], logs / "moto.log", env=env)
        head.run(["python", "-c", _WAIT_AND_MAKE_BUCKET], env=env, timeout=60)
        store.start(["mlflow", "server", "--host", store.ip, "--port", "5000", "--workers", "1",
                     "--backend-store-uri", f"sqlite:///{store.workdir}/mlflow.db",
                     "--artifacts-destination", "s3://runs/mlartifacts",
                     # reached by hostname: MLflow's DNS-rebinding guard allows only IPs by default
                     "--allowed-hosts", "store,store:5000"], logs / "mlflow.log",
                    env=env | {"MLFLOW_S3_ENDPOINT_URL": "http://store:9000",
                               "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})  # fmt: skip
        head.run(["cadist", "data", "synth", "--out", "/tmp/data", "--num-train", "8",
                  "--num-val", "2", "--height", "64", "--width", "128"], env=env)  # fmt: skip
        for split in ("train", "val"):
            head.run(["cadist", "shards", "build", "--cityscapes-root", "/tmp/data", "--split",
                      split, "--out", "s3://runs/shards", "--samples-per-shard", "2",
                      "--workers", "1"], env=env)  # fmt: skip
        head.run(["ray", "start", "--head", "--node-ip-address", head.ip, "--port", "6379",
                  "--num-cpus", "1", "--dashboard-host", head.ip, "--dashboard-port", "8265",
                  "--disable-usage-stats"], env=env, timeout=120)  # fmt: skip
        node.run(["ray", "start", "--address", f"{head.ip}:6379", "--node-ip-address", node.ip,
                  "--num-cpus", "1", "--disable-usage-stats"], env=env, timeout=120)  # fmt: skip
        head.run(["python", "-c", _WAIT_FOR_MLFLOW], env=env, timeout=120)
        yield hosts, env, logs


_WAIT_AND_MAKE_BUCKET = """
import os, time, boto3
s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
for _ in range(100):
    try:
        s3.create_bucket(Bucket="runs"); break
    except Exception:
        time.sleep(0.3)
else:
    raise SystemExit("the S3 server on the storage host did not start")
"""
_WAIT_FOR_MLFLOW = """
import time, urllib.request
for _ in range(200):
    try:
        urllib.request.urlopen("http://store:5000/health", timeout=2); break
    except OSError:
        time.sleep(0.5)
else:
    raise SystemExit("the MLflow server on the storage host did not start")
"""
MLFLOW = "http://store:5000"


def _sets(name: str, iterations: int, **extra) -> list[str]:
    sets = {
        "name": name,
        "cluster.num_workers": 2,
        "cluster.cpus_per_worker": 1,
        "data.train_shards": "s3://runs/shards/train-manifest.json",
        "data.val_shards": "s3://runs/shards/val-manifest.json",
        "cluster.storage_path": "s3://runs/runs",
        "train.iterations": iterations,
        "train.checkpoint_every": 5,
        "train.log_every": 5,
        "eval.interval": 1000,
        "data.crop_size": 64,
        "data.num_workers": 0,
        "mlflow.enabled": "false",
    } | extra
    return [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]


def _train(hosts, env, name: str, iterations: int, **extra):
    head = hosts["head"]
    return head.run(["cadist", "train", JOB, "--address", f"{head.ip}:6379", "--json",
                     *_sets(name, iterations, **extra)], env=env, timeout=400, check=False)  # fmt: skip


def _read(hosts, env, code: str, on: str = "head") -> str:
    return hosts[on].run(["python", "-c", code], env=env).stdout


_WAIT = """
import json, sys, time
from cadist.storage.store import Storage
s = Storage("s3://runs/runs")
while True:
    v = eval(sys.argv[1])
    if eval(sys.argv[2]):
        print(json.dumps(v), flush=True)
        break
    time.sleep(1)
"""


def _wait_for(hosts, env, logs, what: str, until: str, on: str = "head", proc=None, log=None,
              timeout: float = 240):  # fmt: skip
    """The value of `what` (an expression of `s`, the runs' storage path on S3) once `until` (of
    `v`, that value) holds, looked at every second by one Python on host `on` (not one per look);
    fails when `proc` ends first (with the tail of `log`) or after `timeout` s."""
    import os
    import signal
    import uuid

    out = logs / f"wait-{uuid.uuid4().hex[:8]}.log"
    waiter = hosts[on].start(["python", "-c", _WAIT, what, until], out, env=env)
    deadline = time.time() + timeout
    try:
        while waiter.poll() is None:
            if proc is not None:
                assert proc.poll() is None, log.read_text()[-4000:]
            assert time.time() < deadline, f"{until} never held for {what}: {out.read_text()}"
            time.sleep(0.5)
    finally:
        if waiter.poll() is None:
            os.killpg(waiter.pid, signal.SIGKILL)
            waiter.wait()
    assert waiter.returncode == 0, out.read_text()[-4000:]
    return json.loads(out.read_text().splitlines()[-1])


def test_training_across_two_hosts_with_storage_on_a_third(cluster):
    """2 workers, one per host, over gloo on each host's eth0 — though the node's hostname resolves
    to 127.0.1.1 (Debian's default): the interface comes from each worker's Ray node IP;
    checkpoints and run state on the storage host's S3 only; a rerun resumes from S3."""
    hosts, env, _ = cluster
    # a storage path on the head's disk, which the node does not share: one error, at once
    r = _train(hosts, env, "local", 5, **{"cluster.storage_path": hosts["head"].workdir / "runs"})
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-3000:]
    assert (
        f"cluster.storage_path {hosts['head'].workdir / 'runs'} is on this machine's disk, but the "
        f"Ray cluster's node(s) {hosts['node'].ip} do not see it" in r.stderr
    ), r.stderr[-3000:]
    on_mlflow = {"mlflow.enabled": "true", "mlflow.tracking_uri": MLFLOW,
                 "mlflow.experiment": "hosts", "mlflow.system_metrics_s": 1}  # fmt: skip
    r = _train(hosts, env, "across", 10, **on_mlflow)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    assert json.JSONDecoder().raw_decode(r.stdout[r.stdout.index("{") :])[0]["step"] == 10
    where = json.loads(_read(hosts, env, (
        "import json; from cadist.storage.store import Storage; s = Storage('s3://runs/runs'); "
        "print(json.dumps([s.read_json(f'across/step_00000010/node_rank{i}.json') for i in (0, 1)]))"
    )))  # fmt: skip
    assert {(w["node_ip"], w["hostname"]) for w in where} == {
        (hosts["head"].ip, "head"), (hosts["node"].ip, "node")}  # fmt: skip
    assert {w["interface"] for w in where} == {"eth0"}
    for name in ("head", "node"):  # nothing of the run on either host's disk
        left = [f for f in hosts[name].files() if "across" in f or "step_" in f]
        assert left == [], (name, left)
    # MLflow on the storage host: what the run logged, found from the laptop host through it
    seen = json.loads(_read(hosts, env, _WHAT_MLFLOW_HOLDS, on="laptop"))
    assert 0.0 <= seen["val/miou"] <= 1.0 and seen["macs/total_gmac"] > 0, seen
    assert {"node0", "node1"} <= set(seen["system_nodes"]), seen  # samplers on both hosts
    assert seen["artifacts"] == ["checkpoints/best.pt", "checkpoints/last.pt"], seen
    assert any(k.endswith("/artifacts/checkpoints/best.pt") for k in seen["in_bucket"]), seen
    r = _train(hosts, env, "across", 15, **on_mlflow)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    assert "resuming job across at step 10" in r.stdout + r.stderr
    status = hosts["head"].run(["cadist", "status", "s3://runs/runs", "--json"], env=env).stdout
    (row,) = [j for j in json.loads(status)["jobs"] if j["job"] == "across"]
    assert (row["step"], row["state"]) == (15, "finished")


_WHAT_MLFLOW_HOLDS = """
import json
from mlflow.tracking import MlflowClient
from cadist.storage.store import Storage
c = MlflowClient("http://store:5000")
exp = c.get_experiment_by_name("hosts").experiment_id
(run,) = c.search_runs([exp], "tags.`cadist.job` = 'across'")
m = run.data.metrics
print(json.dumps({
    "val/miou": m.get("val/miou"), "macs/total_gmac": m.get("macs/total_gmac"),
    "system_nodes": sorted({k.split("/")[1] for k in m if k.startswith("system/")}),
    "artifacts": sorted(a.path for a in c.list_artifacts(run.info.run_id, "checkpoints")),
    "in_bucket": Storage("s3://runs/mlartifacts").walk(""),
}))
"""


def test_a_worker_host_that_dies_stops_the_run_and_a_rerun_resumes(cluster):
    """The node's every process is killed mid-run (the machine dies): the run ends with one clear
    error within the start timeout instead of hanging; once the host is back (`ray start` again)
    a rerun resumes from the newest registered checkpoint on S3 — no step lost beyond it."""
    hosts, env, logs = cluster
    head, node = hosts["head"], hosts["node"]
    sets = ["--set", "cluster.start_timeout_s=15", "--set", "cluster.max_failures=1"]
    proc = head.start(["cadist", "train", JOB, "--address", f"{head.ip}:6379", "--json",
                       *_sets("dies", 400), *sets], logs / "dies.log", env=env)  # fmt: skip
    latest = "from cadist.storage.store import Storage; print(Storage('s3://runs/runs').latest_checkpoint('dies'))"
    _wait_for(hosts, env, logs, "s.latest_checkpoint('dies')", "v is not None", proc=proc,
              log=logs / "dies.log")  # fmt: skip
    node.kill_all()  # the worker host dies
    proc.wait(300)
    out = (logs / "dies.log").read_text()
    assert proc.returncode != 0, out[-3000:]
    assert "could not start its 2 workers within cluster.start_timeout_s 15 s" in out, out[-3000:]
    step = int(_read(hosts, env, latest).split(",")[0].strip("("))
    node.run(["ray", "start", "--address", f"{head.ip}:6379", "--node-ip-address", node.ip,
              "--num-cpus", "1", "--disable-usage-stats"], env=env, timeout=120)  # fmt: skip
    r = _train(hosts, env, "dies", step + 5)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    assert f"resuming job dies at step {step}" in r.stdout + r.stderr, r.stdout[-2000:]


def test_submit_logs_status_and_stop_from_a_laptop_host(cluster):
    """From a fourth host: `cadist submit` to the head's job API (token auth), `cadist logs`,
    `cadist status s3://…` and `cadist stop NAME --storage s3://… --wait`; the job checkpoints
    and ends where it was asked to, and its state on S3 says so."""
    hosts, env, logs = cluster
    laptop, head = hosts["laptop"], hosts["head"]
    api = f"http://{head.ip}:8265"
    r = laptop.run(["cadist", "submit", "jobs/demo.yaml", "--address", api, "--no-wait",
                    *_sets("fromlaptop", 2000)], env=env, cwd=PROJECT, timeout=120)  # fmt: skip
    sid = next(w for w in r.stdout.split() if w.startswith("cadist-fromlaptop-"))
    _wait_for(hosts, env, logs, "s.latest_checkpoint('fromlaptop')", "v is not None", on="laptop")
    status = json.loads(
        laptop.run(["cadist", "status", "s3://runs/runs", "--json"], env=env).stdout
    )
    (row,) = [j for j in status["jobs"] if j["job"] == "fromlaptop"]
    # running, told by the heartbeat rank 0 writes to S3 (the laptop shares nothing else)
    assert row["state"] == "running" and row["step"] >= 5, row
    assert row["heartbeat"]["phase"] in ("train", "eval") and row["heartbeat"]["age_s"] < 60, row
    stop = laptop.run(["cadist", "stop", "fromlaptop", "--storage", "s3://runs/runs", "--wait",
                       "240"], env=env, timeout=300)  # fmt: skip
    assert "job fromlaptop stopped; its last checkpoint is step" in stop.stdout, stop.stdout
    step = int(stop.stdout.split("checkpoint is step")[1].split(";")[0])
    r = laptop.run(["cadist", "logs", sid, "--address", api, "--follow"], env=env, timeout=120)
    assert f"stopped at step {step} on request" in r.stdout, r.stdout[-3000:]
    assert f"{sid}: SUCCEEDED" in r.stderr, r.stderr
    status = json.loads(
        laptop.run(["cadist", "status", "s3://runs/runs", "--json"], env=env).stdout
    )
    (row,) = [j for j in status["jobs"] if j["job"] == "fromlaptop"]
    assert (row["step"], row["state"]) == (step, "resumable"), row
    bad = laptop.run(["cadist", "logs", "cadist-nope-1", "--address", api], env=env, check=False)
    assert bad.returncode == 2 and "no submission 'cadist-nope-1'" in bad.stderr, bad.stderr


def test_the_storage_host_drops_off_the_network_then_for_good(cluster):
    """The storage host's cable is out for 10 s mid-run: every read and checkpoint write retries
    and training goes on to its last step. Then out for good: the run ends with one error naming
    the storage URI; once the cable is back, a rerun resumes from the newest registered
    checkpoint."""
    hosts, env, logs = cluster
    head, store = hosts["head"], hosts["store"]
    latest = (
        "from cadist.storage.store import Storage; "
        "print(Storage('s3://runs/runs').latest_checkpoint('flaky'))"
    )

    def wait_for_checkpoint(proc, log):
        _wait_for(hosts, env, logs, "s.latest_checkpoint('flaky')", "v is not None", proc=proc,
                  log=log)  # fmt: skip

    log = logs / "flaky.log"
    proc = head.start(["cadist", "train", JOB, "--address", f"{head.ip}:6379", "--json",
                       *_sets("flaky", 40)], log, env=env)  # fmt: skip
    wait_for_checkpoint(proc, log)
    store.set_link(False)
    time.sleep(10)
    store.set_link(True)
    assert proc.wait(400) == 0, log.read_text()[-4000:]
    assert '"step": 40' in log.read_text()

    # out for good, with short retries: one error naming the URI
    short = env | {"CADIST_STORAGE_TIMEOUT_S": "2", "CADIST_STORAGE_RETRIES": "2"}
    log = logs / "flaky2.log"
    proc = head.start(["cadist", "train", JOB, "--address", f"{head.ip}:6379",
                       *_sets("flaky", 2000, **{"cluster.max_failures": 0})], log, env=short)  # fmt: skip
    deadline = time.time() + 240
    while "resumed from the checkpoint of step 40" not in log.read_text():
        assert proc.poll() is None and time.time() < deadline, log.read_text()[-4000:]
        time.sleep(0.5)
    time.sleep(3)
    store.set_link(False)
    try:
        assert proc.wait(300) != 0
    finally:
        store.set_link(True)
    out = log.read_text()
    assert "error: training stopped: s3://runs/" in out and "does not answer" in out, out[-4000:]
    step = int(_read(hosts, env, latest).split(",")[0].strip("("))
    assert step >= 40
    r = _train(hosts, env, "flaky", step + 5)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    assert f"resuming job flaky at step {step}" in r.stdout + r.stderr


def test_a_sweep_across_the_hosts_resumes_from_s3_after_its_driver_is_killed(cluster):
    """`cadist tune` with 2 trials at once, one worker each (one per host): the driver is killed
    once both trials have a checkpoint; the rerun resumes the sweep from S3 (Tune's experiment and
    the trials' checkpoints) and finishes both — no trial lost or started twice."""
    import os
    import signal

    hosts, env, logs = cluster
    head = hosts["head"]
    fixed = {
        "data.train_shards": "s3://runs/shards/train-manifest.json",
        "data.val_shards": "s3://runs/shards/val-manifest.json",
        "data.crop_size": 64, "data.num_workers": 0, "train.iterations": 60,
        "train.batch_size": 2, "train.log_every": 5, "train.checkpoint_every": 5,
        "eval.interval": 60, "eval.log_images": 0, "cluster.num_workers": 1,
        "cluster.storage_path": "s3://runs/runs", "deepspeed.zero_stage": 0,
        "mlflow.enabled": False, "cluster.address": f"{head.ip}:6379",
    }  # fmt: skip
    sweep = {"name": "hsweep", "job": JOB, "set": fixed, "num_samples": 2, "max_concurrent": 2,
             "search": {"train.lr_head": {"choice": [0.05, 0.1]}},
             "objectives": {"val/miou": "max"}, "seed": 3}  # fmt: skip
    path = head.workdir / "sweep.yaml"
    head.run(
        [
            "python",
            "-c",
            "import sys; open(sys.argv[1], 'w').write(sys.argv[2])",
            str(path),
            json.dumps(sweep),
        ],
        env=env,
    )  # fmt: skip (JSON is YAML)
    trials = (
        "import json; from cadist.storage.store import Storage; s = Storage('s3://runs/runs'); "
        "print(json.dumps({n: s.latest_checkpoint(n) for n in s.list('', 'hsweep-*')}))"
    )
    log = logs / "sweep.log"
    proc = head.start(["cadist", "tune", str(path)], log, env=env)
    seen = _wait_for(hosts, env, logs, "{n: s.latest_checkpoint(n) for n in s.list('', 'hsweep-*')}",
                     "len(v) == 2 and all(v.values())", proc=proc, log=log, timeout=300)  # fmt: skip
    os.killpg(proc.pid, signal.SIGKILL)  # the driver dies (its trials with it)
    proc.wait(60)
    r = head.run(["cadist", "tune", str(path)], env=env, timeout=500, check=False)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-4000:]
    assert "resuming sweep hsweep" in r.stdout, r.stdout[-3000:]
    result = json.loads(_read(hosts, env, (
        "from cadist.storage.store import Storage; "
        "print(Storage('s3://runs/runs').read_text('.cadist/sweep-hsweep.results.json'))")))  # fmt: skip
    assert sorted(t["job"] for t in result["trials"]) == sorted(seen)  # the same two trials
    assert [t["state"] for t in result["trials"]] == ["finished", "finished"], result
    assert sorted(json.loads(_read(hosts, env, trials))) == sorted(seen)  # none started anew
