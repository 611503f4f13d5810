"""What a user sees in a terminal: `cadist train` and `cadist eval` run in a real pseudo-terminal
show a live bar whose ETA advances, no worker output line by line and no traceback; a job piped
beside it shows plain lines. Meanwhile `cadist status` from another process says the job is
running, and `cadist logs JOB` prints its driver's log from the storage path afterwards."""

import fcntl
import json
import os
import re
import select
import struct
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path

import pytest

from ..conftest import shared_ray, tiny_shards

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def in_pty(cmd: list[str], cwd, env: dict, timeout: float = 300) -> tuple[int, str]:
    """Run `cmd` with stdin, stdout and stderr on a new pseudo-terminal (160 columns); returns its
    exit code and everything it wrote there."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=slave, stdout=slave, stderr=slave,
                            start_new_session=True)  # fmt: skip
    os.close(slave)
    out, deadline = bytearray(), time.time() + timeout
    try:
        while time.time() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                data = os.read(master, 1 << 16)
            except OSError:  # EIO: the terminal's other side is closed
                break
            if not data:
                break
            out += data
        else:
            proc.kill()
            pytest.fail(f"{cmd} ran past {timeout} s:\n{out.decode(errors='replace')[-3000:]}")
        return proc.wait(60), out.decode(errors="replace")
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("console")
    train, val = tiny_shards(root, num_train=8, num_val=4, seed=4)
    ray = shared_ray()  # (conftest: shared with test_train_ray and test_submit)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("CADIST_", "NO_COLOR", "RAY_API_SERVER"))}  # fmt: skip
    env |= {
        "PYTHONPATH": str(ROOT),
        "TERM": "xterm",
        "COLUMNS": "160",
        "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    }  # (one machine: as cadist's local Ray)
    sets = {
        "data.train_shards": train, "data.val_shards": val, "data.crop_size": 64,
        "data.num_workers": 0, "train.batch_size": 2, "train.log_every": 2,
        "train.checkpoint_every": 10, "eval.interval": 10, "eval.log_images": 0,
        "cluster.num_workers": 1, "cluster.storage_path": str(root / "runs"),
        "mlflow.tracking_uri": f"sqlite:///{root / 'mlflow.db'}",
    }  # fmt: skip
    return root, env, sets, ray.gcs_address


def _train_cmd(sets: dict, name: str, iterations: int, address: str) -> list[str]:
    over = sets | {"name": name, "train.iterations": iterations}
    return [sys.executable, "-m", "cadist", "train", str(ROOT / "jobs" / "demo.yaml"),
            "--address", address, *(a for k, v in over.items() for a in ("--set", f"{k}={v}"))]  # fmt: skip


def _no_worker_lines_no_traceback(text: str) -> None:
    lines = re.split(r"[\r\n]+", text)
    assert not [ln for ln in lines if ln.lstrip().startswith("(RayTrainWorker")], text[-3000:]
    assert "Traceback" not in text, text[-3000:]


def test_train_and_eval_in_a_terminal_and_piped(setup):
    """One job in a terminal and, beside it on the same Ray cluster, one piped with --verbose."""
    from click.testing import CliRunner

    from cadist.cli import main

    root, env, sets, address = setup
    status, piped = {}, {}

    def status_while_running():  # this process asks while the job's driver trains
        beat = root / "runs" / ".cadist" / "tty.progress.json"
        deadline = time.time() + 240
        while time.time() < deadline:
            rec = json.loads(beat.read_text()) if beat.is_file() else {}
            if rec.get("phase") == "train" and rec.get("step", 0) >= 4:
                r = CliRunner().invoke(main, ["status", str(root / "runs"), "--json"])
                status.update(json.loads(r.output))
                return
            time.sleep(0.3)

    def run_piped():  # a line per report (to count them), and the workers' lines (--verbose)
        # (its own MLflow store: two first starts on one new SQLite file race to create its tables)
        own = sets | {"mlflow.tracking_uri": f"sqlite:///{root / 'piped.db'}"}
        cmd = _train_cmd(own, "piped", 60, address)
        piped["r"] = subprocess.run([*cmd[:3], "--verbose", *cmd[3:]], cwd=root, capture_output=True,
                                    env=env | {"CADIST_PROGRESS_INTERVAL": "0"}, text=True,
                                    timeout=300)  # fmt: skip

    threads = [threading.Thread(target=status_while_running), threading.Thread(target=run_piped)]
    for t in threads:
        t.start()
    rc, text = in_pty(_train_cmd(sets, "tty", 120, address), root, env)
    for t in threads:
        t.join(300)
    assert rc == 0, text[-3000:]
    # tqdm's bar: "train tty:  45%|…| 54/120 [00:04<00:05,  12.1step/s, loss …]"
    seen = re.findall(r"train tty:.*?(\d+)/120 \[[\d:]+<([\d:?]+)", text)
    known = [(int(n), eta) for n, eta in seen if eta != "?"]
    assert len({n for n, _ in known}) >= 3, seen
    assert len({eta for _, eta in known}) >= 2, known  # the ETA advances
    assert re.search(r"loss \d\.\d{4} · [\d.]+ img/s", text), text[-2000:]
    assert "val mIoU" in text and "cadist: job tty finished at step 120" in text
    _no_worker_lines_no_traceback(text)
    (row,) = [j for j in status["jobs"] if j["job"] == "tty"]
    assert row["state"] == "running" and 4 <= row["step"] < 120, row
    assert row["heartbeat"]["pid"] > 0 and row["heartbeat"]["age_s"] < 60, row

    # piped: plain lines, no bar redraws or colour; with --verbose rank 0's lines as well
    r = piped["r"]
    assert r.returncode == 0, r.stderr[-3000:]
    plain = re.findall(r"^train piped: (\d+)/60 step \((\d+)%\)(, ETA [\d:?]+)?", r.stderr, re.M)
    assert [int(n) for n, _, _ in plain][-1] == 60 and len(plain) >= 3, r.stderr
    whole = re.findall(r"^train piped: \d+/60 step.*$", r.stderr, re.M)
    assert len(set(whole)) == len(whole), whole  # no line twice (the same step may come again
    # with another note — "evaluating…", a new val mIoU — on a busy machine)
    assert any(eta and "?" not in eta for _, _, eta in plain), plain
    ours = [ln for ln in r.stderr.splitlines() if ln.startswith(("train piped", "cadist:"))]
    assert "\r" not in r.stderr and not [
        ln for ln in ours if "\x1b[" in ln
    ]  # (Ray colours its own)
    assert "Traceback" not in r.stdout + r.stderr
    assert re.search(r"\[cadist\] step 60/60 loss", r.stdout + r.stderr), r.stderr[-3000:]

    # the driver's log, from the storage path
    r = subprocess.run([sys.executable, "-m", "cadist", "logs", "tty", "--storage",
                        str(root / "runs")], env=env, capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "starting 1 Ray Train worker(s)" in r.stdout and "step 120/120 done" in r.stdout
    assert "finished at step 120" in r.stdout and "tty: finished" in r.stderr, r.stdout

    # evaluation in a terminal: images done/total
    ckpt = sorted((root / "runs" / "tty").glob("step_*"))[-1]
    over = sets | {"name": "tty"}
    cmd = [sys.executable, "-m", "cadist", "eval", str(ROOT / "jobs" / "demo.yaml"), "--ckpt",
           str(ckpt), *(a for k, v in over.items() for a in ("--set", f"{k}={v}"))]  # fmt: skip
    rc, text = in_pty(cmd, root, env)
    assert rc == 0, text[-3000:]
    assert re.search(r"eval tty: +100%\|.*\| 4/4 \[", text), text[-2000:]
    result = json.loads(text[text.index("{") :].replace("\r\n", "\n"))
    assert re.search(rf"mIoU {result['miou']:.4f}", text)
    _no_worker_lines_no_traceback(text)
