"""Rerunning a job: which changed settings a resume may bring (cadist.train.resume; no Ray)."""

import os
from pathlib import Path

import pytest

from cadist.config.jobfile import load_job
from cadist.errors import CheckpointError, ConfigError
from cadist.storage.store import Storage
from cadist.train.resume import check_rerun, latest_checkpoint, zero_world

JOBS = os.path.join(os.path.dirname(__file__), "..", "..", "jobs")


def _job(*overrides, zero=0):
    """The demo job (2 workers), with ZeRO stage `zero`."""
    path = os.path.join(JOBS, "demo.yaml")
    return load_job(path, [f"deepspeed.zero_stage={zero}", *overrides]).model_dump()


def _checkpoint(run_dir, step, zero_ranks=0):
    """A complete checkpoint folder, registered in Ray Train's record as Ray Train does."""
    import json

    d = run_dir / f"step_{step:08d}"
    (d / "state").mkdir(parents=True)
    (d / "model.pt").write_bytes(b"w")
    (d / "state" / "mp_rank_00_model_states.pt").write_bytes(b"m")
    (d / "manifest.json").write_text("{}")
    for r in range(zero_ranks):
        (d / "state" / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt").write_bytes(b"o")
    snap = run_dir / "checkpoint_manager_snapshot.json"
    known = json.loads(snap.read_text())["checkpoint_results"] if snap.is_file() else []
    snap.write_text(json.dumps({"checkpoint_results": [*known, {"checkpoint_dir_name": d.name}]}))
    return d


def test_latest_checkpoint_is_the_newest_complete_one(tmp_path):
    assert latest_checkpoint(tmp_path / "none") is None
    _checkpoint(tmp_path, 10)
    newest = _checkpoint(tmp_path, 20)
    (tmp_path / "step_00000030").mkdir()  # still being written: no weights, no state
    assert latest_checkpoint(tmp_path) == (20, str(newest))
    assert zero_world(newest) is None
    assert zero_world(_checkpoint(tmp_path, 40, zero_ranks=2)) == 2
    # a rank's ZeRO file gone (every rank writes its rng file): named as missing
    gone = _checkpoint(tmp_path, 50, zero_ranks=2)
    for r in (0, 1):
        (gone / f"rng_rank{r}.json").write_text("{}")
    (gone / "state" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    with pytest.raises(CheckpointError, match=r"rank\(s\) 1 is missing \(state/zero_pp_rank_1_"):
        zero_world(gone)
    import shutil

    shutil.rmtree(gone)
    # with Ray Train's record: the newest it registered (a crash can leave a newer, complete
    # folder it never registered; a rerun resumes from the registered one)
    import json

    snapshot = tmp_path / "checkpoint_manager_snapshot.json"
    snapshot.write_text(json.dumps({"checkpoint_results": [
        {"checkpoint_dir_name": "step_00000010"}, {"checkpoint_dir_name": "step_00000020"}]}))  # fmt: skip
    assert latest_checkpoint(tmp_path) == (20, str(newest))
    snapshot.write_text(json.dumps({"checkpoint_results": []}))  # none registered yet
    assert latest_checkpoint(tmp_path) is None
    snapshot.write_text("{")  # unreadable: every complete folder counts
    assert latest_checkpoint(tmp_path)[0] == 40
    snapshot.unlink()  # no record at all: Ray Train starts the run over, so nothing to resume
    assert latest_checkpoint(tmp_path) is None


def test_a_resume_may_change_how_the_job_runs_but_not_what_it_trains(tmp_path):
    before = _job()
    assert check_rerun(before, None, tmp_path, "j.yaml").step is None  # first start
    _checkpoint(tmp_path, 20)
    assert check_rerun(before, None, tmp_path, "j.yaml").step == 20  # e.g. an earlier version

    same = check_rerun(_job(), before, tmp_path, "j.yaml")
    assert (same.step, same.changes) == (20, [])

    ok = check_rerun(
        _job("cluster.num_workers=1", "train.iterations=900", "eval.interval=50"),
        before,
        tmp_path,
        "j.yaml",
    )
    assert ok.step == 20
    assert ok.changes == [
        ("cluster.num_workers", 2, 1),
        ("eval.interval", 200, 50),
        ("train.iterations", 600, 900),
    ]
    assert ok.describe() == (
        "cluster.num_workers 2 → 1, eval.interval 200 → 50, train.iterations 600 → 900"
    )

    with pytest.raises(ConfigError) as e:
        check_rerun(
            _job("train.lr_head=0.5", "model.trimap_width=7", "cluster.num_workers=1"),
            before,
            tmp_path,
            "j.yaml",
        )
    assert str(e.value) == (
        f"j.yaml: job demo would resume from its checkpoint at step 20 "
        f"({tmp_path / 'step_00000020'}), which was trained with other settings "
        f"(model.trimap_width 11 → 7, train.lr_head 0.1 → 0.5); a resumed run cannot change "
        f"these: undo them to resume, give the job a new name, or pass --restart to start over "
        f"(the earlier run is kept aside)"
    )
    with pytest.raises(ConfigError, match=r"deepspeed\.zero_stage 0 → 2"):
        check_rerun(_job("deepspeed.zero_stage=2"), before, tmp_path, "j.yaml")


def test_without_a_checkpoint_any_change_starts_over(tmp_path):
    r = check_rerun(_job("train.lr_head=0.5"), _job(), tmp_path, "j.yaml")
    assert r.step is None and r.changes == [("train.lr_head", 0.1, 0.5)]


def test_zero_state_resumes_on_another_number_of_workers(tmp_path):
    """ZeRO 1/2 state split over 2 workers is re-split when loading (tests/unit/test_reshard.py);
    the rerun records the new count like any other change of how the job runs."""
    before = _job(zero=1)
    _checkpoint(tmp_path, 20, zero_ranks=2)
    assert check_rerun(_job(zero=1), before, tmp_path, "j.yaml").step == 20
    r = check_rerun(_job("cluster.num_workers=1", zero=1), before, tmp_path, "j.yaml")
    assert r.step == 20 and r.changes == [("cluster.num_workers", 2, 1)]


def test_set_aside_renames_and_deletes_nothing(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "x").write_text("1")
    moved = Storage(tmp_path).set_aside(["run", "missing"])
    assert len(moved) == 1 and moved[0].startswith(str(tmp_path / "run.before-"))
    assert (Path(moved[0]) / "x").read_text() == "1" and not (tmp_path / "run").exists()


def test_status_lists_each_job_s_progress_run_and_waiting_records(tmp_path):
    import json

    from click.testing import CliRunner

    from cadist.cli import main

    meta = tmp_path / ".cadist"
    meta.mkdir()
    for name, steps in (("done", (300, 600)), ("halfway", (100,)), ("fresh", ())):
        job = load_job(os.path.join(JOBS, "demo.yaml"), [f"name={name}"])
        (meta / f"{name}.yaml").write_text(job.to_yaml())
        for s in steps:
            _checkpoint(tmp_path / name, s)
        (meta / f"{name}.mlflow.json").write_text(
            json.dumps({"run_id": f"run-{name}", "tracking_uri": "http://127.0.0.1:5000"})
        )
    (tmp_path / "halfway" / "step_00000200").mkdir()  # being written: not a checkpoint yet
    spool = meta / "halfway.mlflow-spool" / "run-halfway"
    (spool / "q").mkdir(parents=True)
    for n, op in enumerate(("metrics", "text")):
        (spool / "q" / f"{n:020d}-1.json").write_text(json.dumps({"op": op}))
    Storage(tmp_path).set_aside(["done"])
    _checkpoint(tmp_path / "done", 600)

    sweep = {"sweep": {"name": "sw", "num_samples": 3, "objectives": {"val/miou": "max"}}}
    (meta / "sweep-sw.state.json").write_text(json.dumps(sweep))
    (meta / "sweep-open.state.json").write_text(json.dumps(sweep))  # no results yet
    trial = {"error": None, "stopped_early": False, "pareto": False}
    trials = [{**trial, "job": "sw-a", "pareto": True}, {**trial, "job": "sw-b",
              "stopped_early": True}, {**trial, "job": "sw-c", "error": "RayTaskError"}]  # fmt: skip
    # (a results file from before trials had a state: it is derived)
    (meta / "sweep-sw.results.json").write_text(json.dumps({"sweep": "sw", "trials": trials}))
    # a sweep stopped on request: one trial finished, one checkpointed and ended, one not started
    (meta / "sweep-st.state.json").write_text(json.dumps(sweep))
    trials = [{**trial, "job": "st-a", "state": "finished", "pareto": True},
              {**trial, "job": "st-b", "state": "stopped"},
              {**trial, "job": None, "state": "not started"}]  # fmt: skip
    (meta / "sweep-st.results.json").write_text(
        json.dumps({"sweep": "st", "stopped": True, "stop_requested": True, "trials": trials})
    )
    # a results file from before stop requests: "stopped" meant interrupted (Ctrl-C)
    (meta / "sweep-old.state.json").write_text(json.dumps(sweep))
    (meta / "sweep-old.results.json").write_text(json.dumps({"stopped": True, "trials": trials}))
    # one interrupted (Ctrl-C): a trial ended before its final report, none stopped on request
    (meta / "sweep-int.state.json").write_text(json.dumps(sweep))
    trials = [{**trial, "job": "int-a", "state": "finished"},
              {**trial, "job": "int-b", "state": "interrupted"}]  # fmt: skip
    (meta / "sweep-int.results.json").write_text(
        json.dumps({"stopped": True, "stop_requested": False, "trials": trials})
    )
    (meta / "sweep-asked.state.json").write_text(json.dumps(sweep))
    (meta / "sweep-asked.stop.json").write_text(json.dumps({"sweep": "asked"}))
    r = CliRunner().invoke(main, ["status", str(tmp_path), "--json"])
    assert r.exit_code == 0, r.output
    sweeps = {row["sweep"]: row for row in json.loads(r.stdout)["sweeps"]}
    assert sweeps["open"]["ended"] is False and sweeps["open"]["state"] == "running or interrupted"
    assert sweeps["asked"]["state"] == "stop requested"
    assert (sweeps["int"]["state"], sweeps["int"]["interrupted"]) == ("interrupted", 1)
    assert sweeps["old"]["state"] == "interrupted"
    sw = sweeps["sw"]
    assert (sw["finished"], sw["stopped_early"], sw["failed"], sw["pareto"]) == (1, 1, 1, ["sw-a"])
    assert sw["state"] == "ended" and sw["ended"] is True
    st = sweeps["st"]
    assert (st["state"], st["ended"], st["finished"], st["stopped"], st["not_started"]) == (
        "stopped", False, 1, 1, 1,
    )  # fmt: skip
    rows = {row["job"]: row for row in json.loads(r.stdout)["jobs"]}
    assert list(rows) == ["done", "fresh", "halfway"]
    assert (rows["done"]["step"], rows["done"]["state"]) == (600, "finished")
    assert len(rows["done"]["set_aside"]) == 1
    assert (rows["halfway"]["step"], rows["halfway"]["state"]) == (100, "resumable")
    assert rows["halfway"]["pending_mlflow_records"] == 2
    assert rows["halfway"]["mlflow_run_id"] == "run-halfway"
    assert (rows["fresh"]["step"], rows["fresh"]["state"]) == (0, "not started")
    r = CliRunner().invoke(main, ["status", str(tmp_path)])
    assert "| halfway | deeplabv3_resnet_tiny | 100/600 | resumable | run-halfway | 2 |" in r.stdout
    assert "records wait for MLflow in: halfway" in r.output
    assert "| sw | 3 | ended | 1 | 1 | 0 | 1 | sw-a |" in r.stdout
    assert (
        "| st | 3 | stopped on request (rerun `cadist tune` to resume) | 1 | 0 | 2 | 0 | st-a |"
        in r.stdout
    )
    assert "| open | 3 | running or interrupted" in r.stdout
    assert "| asked | 3 | stop requested | | | | | |" in r.stdout
    assert (
        "| int | 3 | interrupted (rerun `cadist tune` to resume) | 1 | 0 | 1 | 0 | – |" in r.stdout
    )
    r = CliRunner().invoke(main, ["status", str(tmp_path / "done")])
    assert r.exit_code == 2 and "no cadist jobs here" in r.output


def test_stop_request_for_a_job_by_name_or_file_and_its_errors(tmp_path, monkeypatch):
    import json

    from click.testing import CliRunner

    from cadist.cli import main

    monkeypatch.chdir(tmp_path)
    meta = tmp_path / "runs" / ".cadist"
    meta.mkdir(parents=True)
    for name, steps in (("done", (600,)), ("halfway", (100,))):
        job = load_job(os.path.join(JOBS, "demo.yaml"), [f"name={name}"])
        (meta / f"{name}.yaml").write_text(job.to_yaml())
        for s in steps:
            _checkpoint(tmp_path / "runs" / name, s)
    run = CliRunner().invoke
    r = run(main, ["stop", "halfway", "--storage", "runs", "--json"])
    assert r.exit_code == 0, r.output
    request = json.loads(r.stdout)
    assert request["job"] == "halfway" and request["last_checkpoint_step"] == 100
    stop_file = meta / "halfway.stop.json"
    assert request["stop_file"] == str(stop_file) and json.loads(stop_file.read_text())["job"]
    assert not list(meta.glob("*.tmp"))
    r = run(main, ["status", "runs", "--json"])
    states = {row["job"]: row["state"] for row in json.loads(r.stdout)["jobs"]}
    assert states == {"done": "finished", "halfway": "stop requested"}

    # --wait: a job that is not running never clears the request
    r = run(main, ["stop", "halfway", "--storage", "runs", "--wait", "0.3"])
    assert r.exit_code == 2 and "job halfway did not stop within 0.3 s" in r.output, r.output
    r = run(main, ["stop", "halfway", "--storage", str(tmp_path / "runs"), "--wait", "1",
                   "--address", "http://127.0.0.1:9"])  # fmt: skip
    assert r.exit_code == 2 and "--wait reads the storage here" in r.output

    # by job file: its name and cluster.storage_path (relative to where cadist runs)
    stop_file.unlink()
    demo = os.path.join(JOBS, "demo.yaml")
    r = run(main, ["stop", demo, "--set", "name=halfway", "--set", "cluster.storage_path=runs"])
    assert r.exit_code == 0 and "stop requested for job halfway" in r.output, r.output
    assert stop_file.is_file()

    r = run(main, ["stop", "done", "--storage", "runs"])
    assert r.exit_code == 2 and "job done already finished (step 600/600" in r.output
    r = run(main, ["stop", "nothere", "--storage", "runs"])
    assert r.exit_code == 2, r.output
    assert "no job or sweep named 'nothere' here (jobs: done, halfway; sweeps: none)" in r.output
    r = run(main, ["stop", "halfway", "--storage", str(tmp_path / "elsewhere")])
    assert r.exit_code == 2 and "no cadist jobs here" in r.output
    # a sweep's trial: refused (the sweep is stopped as a whole and resumed by rerunning it)
    (meta / "sweep-sw.state.json").write_text("{}")
    (meta / "sw-0a1b.yaml").write_text((meta / "halfway.yaml").read_text())
    r = run(main, ["stop", "sw-0a1b", "--storage", "runs"])
    assert r.exit_code == 2 and "job sw-0a1b is a trial of sweep sw" in r.output, r.output
    assert not (meta / "sw-0a1b.stop.json").exists()
    r = run(main, ["stop", demo, "--storage", "runs"])
    assert r.exit_code == 2 and "--storage goes with a name" in r.output


def test_stop_request_for_a_sweep_by_name_or_file_and_its_errors(tmp_path, monkeypatch):
    import json
    import threading
    import time

    import yaml
    from click.testing import CliRunner

    from cadist.cli import main

    monkeypatch.chdir(tmp_path)
    meta = tmp_path / "runs" / ".cadist"
    meta.mkdir(parents=True)
    sweep = {
        "name": "sw",
        "job": os.path.join(JOBS, "demo.yaml"),
        "set": {"cluster.storage_path": "runs"},
        "search": {"model.edge_threshold": {"uniform": [0.05, 0.5]}},
        "objectives": {"val/miou": "max"},
        "num_samples": 3,
    }
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    run = CliRunner().invoke
    r = run(main, ["stop", "sweep.yaml"])
    assert r.exit_code == 2 and "no sweep named 'sw' here (sweeps: none)" in r.output, r.output
    (meta / "sweep-sw.state.json").write_text(json.dumps({"sweep": sweep}))
    r = run(main, ["stop", "sweep.yaml", "--json"])  # by file: its name, its base job's storage
    assert r.exit_code == 0, r.output
    request = json.loads(r.stdout)
    stop_file = meta / "sweep-sw.stop.json"
    assert request["sweep"] == "sw" and request["stop_file"] == str(stop_file)
    assert json.loads(stop_file.read_text())["sweep"] == "sw" and not list(meta.glob("*.tmp"))
    r = run(main, ["status", "runs", "--json"])
    assert json.loads(r.stdout)["sweeps"][0]["state"] == "stop requested"
    # --wait: a sweep that is not running never clears the request
    r = run(main, ["stop", "sw", "--storage", "runs", "--wait", "0.3"])
    assert r.exit_code == 2 and "sweep sw did not stop within 0.3 s" in r.output, r.output
    # once the sweep cleared it, --wait prints how its trials ended
    stop_file.unlink()
    r = run(main, ["stop", "sw", "--storage", "runs"])
    assert r.exit_code == 0 and "stop requested for sweep sw" in r.output, r.output
    stop_file.unlink()
    trials = [{"job": "sw-a", "state": "finished"}, {"job": "sw-b", "state": "stopped"}]

    def driver(stopped: bool):  # the sweep's driver: once its trials ended, results, then clear
        deadline = time.monotonic() + 10
        while not stop_file.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        done = trials if stopped else [trials[0], {"job": "sw-b", "state": "finished"}]
        (meta / "sweep-sw.results.json").write_text(
            json.dumps({"stopped": stopped, "trials": done})
        )
        stop_file.unlink(missing_ok=True)

    for stopped, said in (
        (True, "sweep sw stopped (1 finished, 1 stopped); rerun `cadist tune` to resume"),
        (False, "sweep sw ended before it read the request (2 finished)"),
    ):  # (a rerun of a stopped sweep may be stopped again)
        (meta / "sweep-sw.results.json").write_text(json.dumps({"stopped": True, "trials": []}))
        clearing = threading.Thread(target=driver, args=(stopped,))
        clearing.start()
        r = run(main, ["stop", "sw", "--storage", "runs", "--wait", "10"])
        clearing.join()
        assert r.exit_code == 0 and said in r.output, r.output
    # one that ended may not
    r = run(main, ["stop", "sw", "--storage", "runs"])
    assert r.exit_code == 2 and "sweep sw already ended" in r.output, r.output
    # a job and a sweep of the same name: the file says which
    job = load_job(os.path.join(JOBS, "demo.yaml"), ["name=sw"])
    (meta / "sw.yaml").write_text(job.to_yaml())
    r = run(main, ["stop", "sw", "--storage", "runs"])
    assert r.exit_code == 2 and "both a job and a sweep are named 'sw'" in r.output, r.output
    r = run(main, ["stop", os.path.join(JOBS, "demo.yaml"), "--set", "name=sw",
                   "--set", "cluster.storage_path=runs"])  # fmt: skip
    assert r.exit_code == 0 and "stop requested for job sw" in r.output, r.output


def test_sweep_results_name_how_each_trial_ended(tmp_path):
    """The rows a sweep writes from Ray Tune's results: finished, stopped early by ASHA (or, with
    no scheduler, interrupted), stopped on request at its checkpoint, not started (a trial that
    waited, or one Tune had not configured yet), interrupted before it reported, failed; the
    Pareto front only of trials that ended; a stopped or interrupted trial's step is its newest
    checkpoint's."""
    import json

    from ray.tune import Result

    from cadist.config.jobfile import validate_job
    from cadist.sweep.files import ENDED, SweepStopped
    from cadist.sweep.outcome import _rows
    from cadist.sweep.spec import SweepConfig

    base = validate_job(
        _job("cluster.storage_path=" + str(tmp_path), "mlflow.enabled=false"), "demo"
    )
    _checkpoint(tmp_path / "sw-c", 8)
    _checkpoint(tmp_path / "sw-c", 12)
    (tmp_path / "sw-c" / "step_00000016").mkdir()  # being written when it stopped: not it

    _checkpoint(tmp_path / "sw-e", 4)

    def res(trial, error=None, reported=True, **metrics):
        last = {"trial_id": trial, "config": {"model.edge_threshold": 0.1}} | metrics
        path = str(tmp_path / "sweep-sw" / trial) if trial else ""  # (named by its id)
        return Result(metrics=last if reported else {}, checkpoint=None, error=error, path=path)

    done = {"job": "sw-a", "val/miou": 0.5, "step": 20}
    grid = [
        res("a", **done),
        res("b", **{"val/miou": 0.6, "step": 10}),  # no final report
        res("c", error=SweepStopped("job sw-c: stopped at step 12 on request")),
        res("d", error=SweepStopped("job sw-d: not started, the sweep was asked to stop")),
        res(None, reported=False),  # pending: Tune has no metrics (nor config) for it yet
        res("e", reported=False),  # cut short (Ctrl-C) before it reported: found by its folder
        res("f", error=RuntimeError("boom")),
        res("g", **{"val/miou": 0.4, "step": 5}),  # no final report either
        res("h"),  # still pending when the sweep ended: Tune gives its id and config, no step
    ]
    ended = tmp_path / "sweep-sw" / ENDED  # the trials Tune ended (finished, or stopped by ASHA)
    ended.parent.mkdir()
    for scheduler, ids, b_state, g_state in (
        ("asha", ["a", "b"], "stopped early", "interrupted"),  # g: cut short by an interruption
        ("asha", None, "stopped early", "stopped early"),  # a sweep from before the record
        ("fifo", ["a", "b"], "interrupted", "interrupted"),
    ):
        ended.unlink(missing_ok=True)
        if ids is not None:
            ended.write_text(json.dumps(ids))
        sweep = SweepConfig.model_validate(
            {
                "name": "sw",
                "job": "demo.yaml",
                "scheduler": scheduler,
                "search": {"model.edge_threshold": {"uniform": [0.05, 0.5]}},
                "objectives": {"val/miou": "max"},
            }  # fmt: skip
        )
        rows = _rows(grid, sweep, base, Storage(tmp_path))
        got = [(r["job"], r["state"], r["step"], r["pareto"], bool(r["error"])) for r in rows]
        assert got == [
            ("sw-a", "finished", 20, scheduler == "fifo", False),
            # ASHA's is on the front; interrupted, its step is its checkpoint's (none here)
            ("sw-b", b_state, 10 if scheduler == "asha" else None, scheduler == "asha", False),
            ("sw-c", "stopped", 12, False, False),
            (None, "not started", None, False, False),
            (None, "not started", None, False, False),
            ("sw-e", "interrupted", 4, False, False),
            ("sw-f", "failed", None, False, True),
            ("sw-g", g_state, 5 if g_state == "stopped early" else None, False, False),
            (None, "not started", None, False, False),
        ], got
        assert rows[0]["params"] == {"model.edge_threshold": 0.1} and rows[4]["params"] == {
            "model.edge_threshold": None
        }
