"""Progress on the terminal, one display for every long command: a tqdm bar with ETA on a terminal,
plain lines at an interval where output is piped, `NO_COLOR` is set or `--quiet` was given; and
the channel that feeds it from Ray workers — a small JSON file on the storage path that rank 0
rewrites at every progress report and at least every `HEARTBEAT_S` seconds, which is also the job's
heartbeat for `cadist status`. Imports storage only.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
import time
from pathlib import Path

#: seconds between two rewrites of a running job's progress file while nothing changes
HEARTBEAT_S = 15.0
#: a progress file older than this: its job is not running (`cadist status`)
ALIVE_S = 60.0


def log_file() -> Path:
    """cadist's log file for what libraries say that is not news on the console (MLflow creating a
    store's tables, Ray's token-auth notice): CADIST_LOG_FILE, default
    ~/.local/state/cadist/cadist.log."""
    if os.environ.get("CADIST_LOG_FILE"):
        return Path(os.environ["CADIST_LOG_FILE"])
    state = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(state) / "cadist" / "cadist.log"


class LibraryLog(logging.Handler):
    """A logging handler appending to `log_file()` (opened per record: a read-only home loses the
    line, never the command)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            path = log_file()
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a") as f:
                stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.created))
                f.write(f"{stamp} {record.levelname} {record.name}: {record.getMessage()}\n")
        except OSError:
            pass


def library_log(record: logging.LogRecord) -> None:
    LibraryLog().emit(record)


def verbose() -> bool:
    """`cadist --verbose`: worker output line by line (each progress line of rank 0)."""
    return os.environ.get("CADIST_VERBOSE", "") not in ("", "0")


def quiet() -> bool:
    return os.environ.get("CADIST_QUIET", "") not in ("", "0")


def mode(stream=None) -> str:
    """Either "bar" (a live tqdm bar: stderr is a terminal, neither NO_COLOR nor --quiet set) or
    "plain" (one line now and then)."""
    stream = stream or sys.stderr
    tty = getattr(stream, "isatty", lambda: False)()
    if os.environ.get("CADIST_PROGRESS") in ("bar", "plain"):
        return os.environ["CADIST_PROGRESS"]
    return "bar" if tty and not quiet() and "NO_COLOR" not in os.environ else "plain"


def interval() -> float:
    """Seconds between two plain progress lines (CADIST_PROGRESS_INTERVAL; 10, or 60 with
    --quiet)."""
    default = 60.0 if quiet() else 10.0
    try:
        return float(os.environ.get("CADIST_PROGRESS_INTERVAL", default))
    except ValueError:
        return default


def clock(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds < 0:
        return "?"
    s = int(round(seconds))
    return (
        f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"
    )


class Bar:
    """One task's progress (`total` units, `initial` of them done before): `update_to(n, note)`
    from any thread, `close(summary)` at the end. On a terminal a tqdm bar (rate, ETA, the note);
    elsewhere a plain line `desc: n/total unit (p%) … ETA m:ss | note` every `interval()` seconds
    and one at the end."""

    def __init__(self, desc: str, total: int | None, unit: str = "it", initial: int = 0,
                 stream=None):  # fmt: skip
        self.desc, self.total, self.unit = desc, total, unit
        self.stream = stream or sys.stderr
        self.mode = mode(self.stream)
        self.n = self.first = initial
        self.note = ""
        self.t_first: float | None = None  # when the first unit after `initial` was reported
        self.t_printed: float | None = None  # (not 0: the monotonic clock starts at boot)
        self.closed = False
        self._last = None
        self._lock = threading.Lock()
        self._tqdm = None
        if self.mode == "bar":
            from tqdm import tqdm

            self._tqdm = tqdm(total=total, initial=initial, unit=unit, desc=desc, file=self.stream,
                              dynamic_ncols=True, smoothing=0.1, leave=True)  # fmt: skip

    def eta(self) -> float | None:
        """Seconds left at the rate since the first update (None until two updates)."""
        if self.total is None or self.t_first is None or self.n <= self.first:
            return None
        rate = (self.n - self.first) / max(time.monotonic() - self.t_first, 1e-9)
        return (self.total - self.n) / rate if rate > 0 else None

    def line(self) -> str:
        done = f"{self.n}/{self.total}" if self.total else str(self.n)
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        eta = f", ETA {clock(self.eta())}" if self.total and self.n < self.total else ""
        return f"{self.desc}: {done} {self.unit}{pct}{eta}" + (
            f" | {self.note}" if self.note else ""
        )

    def update_to(self, n: int, note: str | None = None) -> None:
        with self._lock:
            self._set(n, note)

    def add(self, k: int = 1, note: str | None = None) -> None:
        """`k` more units done (from any thread)."""
        with self._lock:
            self._set(self.n + k, note)

    def _set(self, n: int, note: str | None) -> None:
        if self.closed:
            return
        now = time.monotonic()
        if self.t_first is None:
            # the rate counts from the first report: what came before (starting workers, loading
            # weights) is not work and would make the first ETA far too long
            self.t_first, self.first = now, n
        if note is not None:
            self.note = note
        if self._tqdm is not None:
            if n != self.n:
                self._tqdm.update(n - self.n)
            if note is not None:
                self._tqdm.set_postfix_str(note, refresh=False)
            self._tqdm.refresh()
            self.n = n
            return
        self.n = n
        if self.t_printed is None or now - self.t_printed >= interval():
            self.t_printed = now
            self._print()

    def _print(self) -> None:
        line = self.line()
        if line != self._last:  # (the same line twice says nothing)
            self._last = line
            print(line, file=self.stream, flush=True)

    def say(self, text: str) -> None:
        """A line above the bar (or a plain line)."""
        with self._lock:
            if self._tqdm is not None:
                self._tqdm.write(text, file=self.stream)
            else:
                print(text, file=self.stream, flush=True)

    def close(self, note: str | None = None) -> None:
        with self._lock:
            if self.closed:
                return
            self.closed = True
            if note is not None:
                self.note = note
            if self._tqdm is not None:
                if note is not None:
                    self._tqdm.set_postfix_str(note, refresh=False)
                self._tqdm.close()
            elif self.t_first is not None or note is not None:
                self._print()


class _Rewriter:
    """A file on the storage path that a thread rewrites whole (`Storage.write`: a temporary name
    and a rename; one PUT on object storage) once its content changed — at most every `every_s`
    seconds — and, with `heartbeat_s`, at least that often; `close()` writes what is left. A write
    that fails is tried again at the next turn: these files never stop the job."""

    def __init__(self, uri: str, name: str, every_s: float, heartbeat_s: float | None = None):
        from cadist.storage.store import Storage

        self.store, self.every_s, self.heartbeat_s = Storage(uri), every_s, heartbeat_s
        self._dirty, self._written = True, 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def _content(self) -> str:  # called under the lock
        raise NotImplementedError

    def _write(self) -> None:
        with self._lock:
            content, self._dirty = self._content(), False
        try:
            self.store.write("", content)
        except Exception:  # noqa: BLE001 - see the class docstring
            self._dirty = True
        self._written = time.monotonic()

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            due = self.heartbeat_s is not None and (
                time.monotonic() - self._written >= self.heartbeat_s
            )
            if self._dirty or due:
                self._write()

    def _close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        if self._dirty:
            self._write()


class ProgressFile(_Rewriter):
    """Rank 0's side of the channel: `update(**fields)` merges fields into the record, written
    once something changed (at most once a second) and at least every `HEARTBEAT_S` seconds, with
    the time; `close(phase)` writes the last one. Progress never stops training (the checkpoints
    meet a storage outage)."""

    def __init__(self, uri: str, **fields):
        super().__init__(uri, "cadist-progress", 1.0, HEARTBEAT_S)
        self.record = {"host": socket.gethostname(), "pid": os.getpid(), "phase": "train", **fields}
        self._thread.start()

    def _content(self) -> str:
        return json.dumps(dict(self.record, time=time.time()))

    def update(self, **fields) -> None:
        with self._lock:
            self.record.update(fields)
            self._dirty = True

    def close(self, phase: str = "done", **fields) -> None:
        self.update(phase=phase, **fields)
        self._close()


class Watcher:
    """The driver's side: reads the progress file at `uri` every `poll_s` seconds in a thread and
    hands each new record (one whose `token` is ours) to `on_record`; `stop()` ends it after one
    last read."""

    def __init__(self, uri: str, token: str, on_record, poll_s: float = 1.0):
        from cadist.storage.store import Storage

        self.store, self.token, self.on_record, self.poll_s = Storage(uri), token, on_record, poll_s
        self._seen = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cadist-watch", daemon=True)

    def __enter__(self) -> Watcher:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _read(self) -> None:
        try:
            rec = self.store.read_json("")
        except Exception:  # noqa: BLE001 - a storage hiccup: the next read tries again
            return
        if isinstance(rec, dict) and rec.get("token") == self.token and rec != self._seen:
            self._seen = rec
            self.on_record(rec)

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            self._read()

    def stop(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)
        self._read()


class LogFile(_Rewriter):
    """A driver's log on the storage path (`cadist logs JOB` reads it from any machine): `line()`
    adds a time-stamped line, written at most every `flush_s` seconds while lines come; `close()`
    writes the rest. Lines of an earlier start of the job are kept above."""

    def __init__(self, uri: str, flush_s: float = 5.0):
        super().__init__(uri, "cadist-log", flush_s)
        try:
            self.text = self.store.read_text("")
        except Exception:  # noqa: BLE001 - none yet (or unreadable: start afresh)
            self.text = ""
        self._dirty = False
        self._thread.start()

    def _content(self) -> str:
        return self.text

    def line(self, text: str) -> None:
        with self._lock:
            self.text += f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text}\n"
            self._dirty = True

    def close(self) -> None:
        self._close()


class TrainView:
    """What the driver shows of a training job, from its progress records: a bar of steps (from
    the step it resumed at) with loss, images/s, the last val mIoU and the last checkpoint."""

    def __init__(
        self, job: str, iterations: int, workers: str, stream=None, log: str | None = None
    ):
        self.job, self.iterations, self.stream = job, iterations, stream or sys.stderr
        self.bar: Bar | None = None
        self.log = LogFile(log) if log else None
        self._logged = None
        self.say(f"cadist: job {job}: starting {workers} Ray Train worker(s)…")

    def say(self, text: str) -> None:
        """A line on the console (above the bar) and in the log."""
        if self.bar is not None:
            self.bar.say(text)
        else:
            print(text, file=self.stream, flush=True)
        if self.log is not None:
            self.log.line(text)

    def on_record(self, rec: dict) -> None:
        step = int(rec.get("step") or 0)
        if self.bar is None:
            start = int(rec.get("start_step") or 0)
            if start:
                self.say(f"cadist: job {self.job} resumed from the checkpoint of step {start}")
            # (the bar starts where the first report is: the rate and ETA count from there)
            self.bar = Bar(f"train {self.job}", self.iterations, "step", initial=step,
                           stream=self.stream)  # fmt: skip
        parts = []
        if rec.get("loss") is not None:
            parts.append(f"loss {rec['loss']:.4f}")
        if rec.get("images_per_s") is not None:
            parts.append(f"{rec['images_per_s']:.1f} img/s")
        if rec.get("val_miou") is not None:
            parts.append(f"val mIoU {rec['val_miou']:.4f}")
        if rec.get("checkpoint_step") is not None:
            parts.append(f"ckpt {rec['checkpoint_step']}")
        phase = rec.get("phase")
        if phase in ("eval", "export"):
            parts.append("evaluating…" if phase == "eval" else "exporting weights…")
        self.bar.update_to(step, " · ".join(parts))
        if self.log is not None and (step, phase) != self._logged:
            self._logged = (step, phase)
            self.log.line(f"step {step}/{self.iterations} {phase} | {' · '.join(parts)}")
        if phase in ("done", "stopped", "failed"):
            self.bar.close()

    def close(self, text: str | None = None) -> None:
        """End the display; `text` (the outcome) on the console and in the log."""
        if self.bar is not None:
            self.bar.close()
        if text:
            self.say(text)
        if self.log is not None:
            self.log.close()
