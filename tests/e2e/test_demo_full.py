"""`cadist demo` as a user runs it (on smaller scenes and fewer steps than its defaults): dense and
edge-mask training on Ray Train + DeepSpeed, the Ray Tune grid sweep, the report with its Pareto
figure in MLflow; the next steps it prints work as printed; a rerun skips what is done; `--quick`;
the result served by a real `mlflow server` on 127.0.0.1 — over its REST API, and in Debian's
chromium (headless, driven by playwright) through MLflow's own UI.

Where hosts can be made (root: tests/hosts/harness.py, as on CI) every `cadist` command here runs on
a host of its own — its own network, /tmp and processes, the demo's folder shared — so that its
local Rays cannot meet another test's (conftest runs this module beside the Ray tests then)."""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from cadist.data.synthetic import write_tree

from ..conftest import SERVER_ENV, free_port
from ..hosts.harness import own_host, run_on

pytestmark = pytest.mark.slow
CADIST = Path(sys.executable).parent / "cadist"
SHORT = {"train.iterations": 6, "eval.interval": 6, "train.checkpoint_every": 6,
         "train.batch_size": 2, "data.crop_size": 64, "data.num_workers": 0,
         "eval.log_images": 0}  # fmt: skip
# an edge mask that keeps some cells at OS16 on these small scenes (τ 0.15, trimap 11, the demo's,
# keeps them all): the two heads then differ in cost
EDGE_SETS = ("--set", "model.edge_threshold=0.95", "--set", "model.trimap_width=3")


def _cadist(where, args: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    """`cadist ARGS` in `cwd`: on the host `where` (a harness Host), or here where it is None."""
    return run_on(where, [str(CADIST), *args], cwd, timeout)


def _demo(where, work: Path, *more: str) -> subprocess.CompletedProcess:
    sets = [a for k, v in SHORT.items() for a in ("--set", f"{k}={v}")]
    return _cadist(where, ["demo", "--workdir", str(work), *sets, *more], Path.cwd(), 900)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("demo")


@pytest.fixture(scope="module")
def host(workdir):
    """The host the module's `cadist` commands run on (None: here, where hosts cannot be made)."""
    with own_host("demo", (workdir,)) as host:
        yield host


@pytest.fixture(scope="module")
def demo(workdir, host):
    """The demo run once on 16 + 4 scenes of 64×128 (the demo uses scenes it finds in its
    workdir); yields (workdir, its output, the MLflow store's URI)."""
    work = workdir
    write_tree(work / "data" / "synth", num_train=16, num_val=4, height=64, width=128, seed=0)
    r = _demo(host, work, *EDGE_SETS)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    return work, r.stdout, f"sqlite:///{work / 'mlflow.db'}", r.stderr


def test_the_demo_trains_dense_and_adaptive_sweeps_and_reports_in_mlflow(demo, host):
    work, out, uri, err = demo
    for n in range(1, 9):  # a heading per stage
        assert f"[{n}/8] " in out, out[-3000:]
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("cadist-demo")
    runs = client.search_runs([exp.experiment_id])
    scored = [r for r in runs if "cadist.job" in r.data.tags]
    by_model = {}
    for r in scored:  # every scored run: its model, a mIoU and a GMac metric
        assert "model.name" in r.data.params, r.info.run_name
        assert any(k.endswith("miou") for k in r.data.metrics), r.info.run_name
        assert any("gmac" in k for k in r.data.metrics), r.info.run_name
        by_model.setdefault(r.data.params["model.name"], []).append(r)
    assert "deeplabv3_resnet_tiny" in by_model  # dense (OS8 trained, OS16 evaluated)
    assert {r.data.params["model.output_stride"] for r in by_model["deeplabv3_resnet_tiny"]} == {
        "8",
        "16",
    }
    assert len(by_model["deeplabv3_batch_ap_resnet_tiny"]) >= 6  # edge, with each head + 4 trials
    # the two heads at the same masks: the same backbone work per image, less for the whole model
    (edge, ahead) = [next(r for r in scored if r.info.run_name == n)
                     for n in ("demo-edge", "demo-edge-ahead")]  # fmt: skip
    assert (edge.data.params["model.head"], ahead.data.params["model.head"]) == (
        "dense",
        "adaptive",
    )
    m, a = edge.data.metrics, ahead.data.metrics
    assert a["macs/backbone_gmac"] == pytest.approx(m["macs/backbone_gmac"], rel=1e-9)
    assert a["macs/total_gmac"] < m["macs/total_gmac"], (m, a)
    assert "| demo-edge-ahead | deeplabv3_batch_ap_resnet_tiny + adaptive head |" in out, out
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(children) == 4 and all(r.info.status == "FINISHED" for r in children)
    assert sorted(
        (r.data.params["model.edge_threshold"], r.data.params["model.trimap_width"])
        for r in children
    ) == [("0.35", "11"), ("0.35", "3"), ("0.95", "11"), ("0.95", "3")]  # the grid, each once
    # from the same start: every training run the same steps and seed, none from other weights
    for r in scored:
        if r.info.run_name != "demo-dense-os16":  # (the OS8 run's weights, evaluated at OS16)
            assert r.data.params["train.iterations"] == "6" and r.data.params["train.seed"] == "1"
            assert r.data.params["model.weights"] == "None", r.info.run_name
    (os8,) = [
        r for r in by_model["deeplabv3_resnet_tiny"] if r.data.params["model.output_stride"] == "8"
    ]
    # the report: the table printed, the figure logged
    (report,) = [r for r in runs if r.info.run_name == "demo-report"]
    files = [a.path for a in client.list_artifacts(report.info.run_id, "report")]
    assert "report/demo_pareto.png" in files and "report/table.md" in files
    table = (work / "report" / "demo_pareto.png").read_bytes()
    assert table[:8] == b"\x89PNG\r\n\x1a\n"
    for r in scored:
        assert f"| {r.info.run_name} |" in out, r.info.run_name
    assert f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000" in out
    compare = next(ln for ln in out.splitlines() if ln.startswith("compare them there: "))
    assert "#/compare-runs?runs=" in compare and os8.info.run_id in compare
    # none of Ray Train's per-report lines below cluster.log_level (WARNING) on the console, no
    # worker output line by line, no traceback, none of Ray's known noise (cluster.ray.RAY_NOISE),
    # no token notice or MLflow start-up lines; every training and the sweep with a progress line
    assert "Reporting training result" not in out + err
    lines = (out + err).splitlines()
    assert not [ln for ln in lines if "(RayTrainWorker" in ln or "(TrainController" in ln
                or "(PlacementGroupCleaner" in ln], err[-3000:]  # fmt: skip
    assert "Traceback" not in out + err and "Token authentication" not in out + err
    assert "Creating initial MLflow database tables" not in out + err
    for job in ("demo-dense-os8", "demo-edge", "demo-edge-ahead"):
        assert re.search(rf"^train {job}: 6/6 step \(100%\)", err, re.M), err[-3000:]
    assert re.search(r"^eval demo-dense-os16: 4/4 img \(100%\)", err, re.M), err[-3000:]
    assert re.search(r"^sweep edge_demo_sweep: 24/24 step \(100%\) \| 4 done", err, re.M), err
    # the next steps it prints work as printed: eval reproduces the edge model's mIoU, predict
    # writes its class map and mask
    lines = {ln.split(": ", 1)[0]: ln.split(": ", 1)[1] for ln in out.splitlines() if ": " in ln}
    ev = _cadist(host, shlex.split(lines["evaluate it"])[1:], work, 300)
    assert ev.returncode == 0, ev.stderr[-3000:]
    assert json.loads(ev.stdout)["miou"] == pytest.approx(edge.data.metrics["val/miou"], abs=1e-4)
    pr = _cadist(host, shlex.split(lines["predict"])[1:], work, 300)
    assert pr.returncode == 0, pr.stderr[-3000:]
    assert len(list((work / "predictions").glob("*_pred.png"))) == 1
    assert len(list((work / "predictions").glob("*_mask*.npy"))) == 1


def test_a_rerun_skips_what_is_done(demo, host):
    work, _, uri, _ = demo
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("cadist-demo").experiment_id
    before = {r.info.run_id for r in client.search_runs([exp])}
    started = time.monotonic()
    r = _demo(host, work, *EDGE_SETS)
    took = time.monotonic() - started
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.count("done before") >= 3, r.stdout
    assert "Started a local Ray instance" not in r.stdout + r.stderr  # nothing to train: no Ray
    assert {r.info.run_id for r in client.search_runs([exp])} == before  # no run added
    print(f"rerun of a finished demo: {took:.1f} s")
    # `cadist report` with no arguments, where the demo ran: the demo's table
    rep = _cadist(host, ["report"], work, 120)
    assert rep.returncode == 0, rep.stderr[-3000:]
    for name in ("demo-dense-os8", "demo-dense-os16", "demo-edge"):
        assert f"| {name} |" in rep.stdout, rep.stdout


def test_quick_is_the_single_short_dense_run(demo, host):
    """`--quick`: jobs/demo.yaml as it is (dense OS16), in the same folder and store."""
    work, _, uri, _ = demo
    r = _demo(host, work, "--quick")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    m = re.search(r"final val mIoU ([0-9.]+) .* chance level ≈ ([0-9.]+)", r.stdout)
    assert m, r.stdout
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("cadist-demo").experiment_id
    (run,) = client.search_runs([exp], "attributes.run_name = 'demo'")
    assert run.data.params["model.output_stride"] == "16" and run.info.status == "FINISHED"
    assert run.data.metrics["val/miou"] == pytest.approx(float(m.group(1)), abs=1e-4)
    assert f"mlflow ui --backend-store-uri {uri}" in r.stdout
    # again: it reached its last step — says so, starts no Ray, prints the same result
    again = _demo(host, work, "--quick")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "job demo already reached its last step 6" in again.stderr, again.stderr[-3000:]
    assert "Started a local Ray instance" not in again.stdout + again.stderr
    assert m.group(0) in again.stdout


def _server(work: Path):
    port = free_port()
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri",
         f"sqlite:///{work / 'mlflow.db'}", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        env=os.environ | SERVER_ENV,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2):
                return proc, base
        except OSError:
            assert time.monotonic() < deadline and proc.poll() is None, (
                "mlflow server did not start"
            )
            time.sleep(0.5)


@pytest.fixture(scope="module")
def server(demo):
    import os
    import signal

    proc, base = _server(demo[0])
    yield base
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(30)


def _get(url: str, body: dict | None = None):
    req = urllib.request.Request(
        url,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        return r.read()


def test_mlflow_server_serves_the_demo_runs_and_figure_over_rest(demo, server):
    exp = json.loads(
        _get(f"{server}/api/2.0/mlflow/experiments/get-by-name?experiment_name=cadist-demo")
    )
    exp_id = exp["experiment"]["experiment_id"]
    runs = json.loads(
        _get(
            f"{server}/api/2.0/mlflow/runs/search", {"experiment_ids": [exp_id], "max_results": 100}
        )
    )["runs"]
    names = {r["info"]["run_name"]: r for r in runs}
    assert {"demo-dense-os8", "demo-dense-os16", "demo-edge", "demo-report"} <= set(names)
    metrics = {m["key"] for m in names["demo-edge"]["data"]["metrics"]}
    assert "val/miou" in metrics and "macs/total_gmac" in metrics
    rid = names["demo-report"]["info"]["run_id"]
    png = _get(f"{server}/get-artifact?path=report/demo_pareto.png&run_uuid={rid}")
    assert png == (demo[0] / "report" / "demo_pareto.png").read_bytes()


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def test_mlflow_ui_in_a_headless_browser_lists_the_runs_and_shows_the_figure(demo, server):
    browser_path = _chromium()
    if browser_path is None:
        pytest.skip("no chromium here: `apt-get install -y chromium` (.ci/run installs it)")
    from playwright.sync_api import sync_playwright

    client = MlflowClient(demo[2])
    exp_id = client.get_experiment_by_name("cadist-demo").experiment_id
    (report,) = client.search_runs([exp_id], "attributes.run_name = 'demo-report'")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=browser_path, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            # the runs view the demo prints (its host and port are this server's)
            runs_view = next(
                ln.split(": ", 1)[1]
                for ln in demo[1].splitlines()
                if ln.startswith("the runs there: ")
            )
            page.goto(runs_view.replace("http://127.0.0.1:5000", server), timeout=120_000)
            for name in ("demo-dense-os8", "demo-edge", "demo-report"):
                page.get_by_text(name, exact=True).first.wait_for(timeout=120_000)
            loads = []
            page.on(
                "response",
                lambda r: (
                    loads.append(r) if "get-artifact" in r.url and "pareto" in r.url else None
                ),
            )
            page.goto(
                f"{server}/#/experiments/{exp_id}/runs/{report.info.run_id}/artifacts/report/demo_pareto.png",
                timeout=120_000,
            )
            shown = page.locator("img[src^='blob:']").first  # the artifact, fetched and shown
            shown.wait_for(timeout=120_000)
            page.wait_for_function(
                "img => img.complete && img.naturalWidth > 0",
                arg=shown.element_handle(),
                timeout=60_000,
            )
            assert [r.status for r in loads] == [200], [(r.url, r.status) for r in loads]
        finally:
            browser.close()
