"""The progress display and its channel (cadist.progress): plain lines with ETA where output is not
a terminal, the worker's progress file (a heartbeat too) and the driver's watcher of it."""

import io
import re
import time

from cadist.progress import Bar, ProgressFile, TrainView, Watcher, clock, mode


def test_plain_lines_count_the_rate_from_the_first_report(monkeypatch):
    monkeypatch.setenv("CADIST_PROGRESS_INTERVAL", "0")
    out = io.StringIO()
    assert mode(out) == "plain"  # not a terminal
    bar = Bar("train job", 100, "step", initial=20, stream=out)
    bar.update_to(20, "loss 1.0")  # the first report: no rate yet, so no ETA figure
    time.sleep(0.2)
    bar.update_to(40, "loss 0.5")
    bar.close()
    lines = out.getvalue().splitlines()
    assert lines[0] == "train job: 20/100 step (20%), ETA ? | loss 1.0"
    m = re.fullmatch(r"train job: 40/100 step \(40%\), ETA (\d+):(\d\d) \| loss 0.5", lines[1])
    assert m, lines[1]
    # 20 steps in ≈0.2 s: 60 left ≈ 0.6 s (the 20 done before the first report do not count)
    assert int(m[1]) * 60 + int(m[2]) <= 2
    assert len(lines) == 2  # close() repeats no line it printed already
    assert clock(3725) == "1:02:05" and clock(65) == "1:05" and clock(None) == "?"


def test_plain_lines_wait_for_the_interval(monkeypatch):
    monkeypatch.setenv("CADIST_PROGRESS_INTERVAL", "3600")
    out = io.StringIO()
    bar = Bar("eval job", 10, "img", stream=out)
    for _ in range(10):
        bar.add(1)
    assert out.getvalue().count("\n") == 1  # the first update only
    bar.close("mIoU 0.5000")
    assert out.getvalue().splitlines()[-1] == "eval job: 10/10 img (100%) | mIoU 0.5000"


def test_progress_file_is_a_heartbeat_the_watcher_reads(tmp_path, monkeypatch):
    import cadist.progress as p

    monkeypatch.setattr(p, "HEARTBEAT_S", 1.5)
    uri = str(tmp_path / ".cadist" / "j.progress.json")
    seen = []
    with Watcher(uri, "tok", seen.append, poll_s=0.2):
        f = ProgressFile(uri, token="tok", job="j", step=0, iterations=10)
        f.update(step=5, loss=0.25)
        deadline = time.time() + 10
        while not any(r.get("step") == 5 for r in seen) and time.time() < deadline:
            time.sleep(0.1)
        first = [r for r in seen if r.get("step") == 5][0]
        time.sleep(3.5)  # nothing changed: the heartbeat rewrites the record with a newer time
        f.close("done", step=10)
    assert first["loss"] == 0.25 and first["phase"] == "train" and first["pid"] > 0
    beats = [r["time"] for r in seen if r.get("step") == 5]
    assert len(beats) >= 2 and beats[-1] - beats[0] >= 1.0, beats
    assert seen[-1]["phase"] == "done" and seen[-1]["step"] == 10
    # another run's file (another token) is not ours
    other = []
    ProgressFile(uri, token="other", job="j").close("done")
    w = Watcher(uri, "tok", other.append)
    w.stop()
    assert other == []


def test_train_view_says_the_resume_and_shows_the_metrics(monkeypatch):
    monkeypatch.setenv("CADIST_PROGRESS_INTERVAL", "0")
    out = io.StringIO()
    view = TrainView("j", 40, "2", stream=out)
    view.on_record({"step": 20, "start_step": 20, "phase": "train"})
    view.on_record({"step": 30, "loss": 0.5, "images_per_s": 3.5, "val_miou": 0.31,
                    "checkpoint_step": 30, "phase": "eval"})  # fmt: skip
    view.on_record({"step": 40, "loss": 0.4, "phase": "done", "checkpoint_step": 40})
    lines = out.getvalue().splitlines()
    assert lines[0] == "cadist: job j: starting 2 Ray Train worker(s)…"
    assert lines[1] == "cadist: job j resumed from the checkpoint of step 20"
    assert "train j: 30/40 step (75%)" in lines[3]
    assert lines[3].endswith("| loss 0.5000 · 3.5 img/s · val mIoU 0.3100 · ckpt 30 · evaluating…")
    assert lines[-1].startswith("train j: 40/40 step (100%) | loss 0.4000")


def test_rays_known_noise_is_dropped_and_nothing_else():
    from cadist.cluster.ray import _drop_noise

    timeout = ["a", "Failed to send resource request for train-1. If this only happens transiently"
               " … it's safe to ignore this error.", "Traceback (most recent call last):",
               '  File "x.py", line 1', "ray.exceptions.GetTimeoutError: Get timed out", "b"]  # fmt: skip
    assert _drop_noise(timeout, "TrainController") == ["a", "b"]
    # the same message ending in another error is not the known noise: kept whole
    other = [*timeout[:4], "ValueError: something else"]
    assert _drop_noise(other, "TrainController") == other
    # only from the actor that says it
    assert _drop_noise(timeout, "RayTrainWorker") == timeout
    pg = ["Failed to query Ray Train Controller actor state. State API may be temporarily "
          "unavailable. Continuing to monitor.", "Exception in thread PlacementGroupCleanerMonitor:",
          "Traceback (most recent call last):", "ConnectionError: Found multiple active Ray "
          "instances: {'a', 'b'}.", "Detected that the Ray Train controller actor is dead."]  # fmt: skip
    assert _drop_noise(pg, "PlacementGroupCleaner") == [pg[-1]]
    core = ["[2026-12-06 E core_worker.cc:2465] Actor with class name: 'PreemptionWatcher' and ID: "
            "'f7' has constructor arguments in the object store and max_restarts > 0. If …"]  # fmt: skip
    assert _drop_noise(core, "TrainController") == []


def test_a_noise_traceback_cut_between_two_batches_is_dropped_whole():
    """A busy machine hands one traceback over in two batches: the known one is dropped across them,
    and a line after it that is no traceback line prints; an unknown ending is not awaited."""
    from cadist.cluster.ray import _drop_noise

    head = ["x", "Exception in thread PlacementGroupCleanerMonitor:", "Traceback (most recent call "
            "last):", '  File "a.py", line 80, in _monitor_loop']  # fmt: skip
    tail = ['  File "b.py", line 759', "    raise ConnectionError(", "ConnectionError: Found "
            "multiple active Ray instances: {'a', 'b'}.", "Detected that the controller is dead."]  # fmt: skip
    pending: dict = {}
    assert _drop_noise(head, "PlacementGroupCleaner", pending) == ["x"]
    assert _drop_noise(tail, "PlacementGroupCleaner", pending) == [tail[-1]]
    assert pending == {}
    # a batch that goes on with something else than a traceback: not held back
    other = [*head[1:], "an ordinary line"]
    assert _drop_noise(other, "PlacementGroupCleaner", {}) == other
    # waiting for the end, a line that belongs to no traceback ends the wait and prints
    pending = {}
    _drop_noise(head, "PlacementGroupCleaner", pending)
    assert _drop_noise(["  more", "plain output"], "PlacementGroupCleaner", pending) == [
        "plain output"
    ]
    assert pending == {}
