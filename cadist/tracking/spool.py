"""Tracking that training never waits on: records spooled on the storage path while the MLflow server
does not answer and sent in order once it does, and the nodes' system metrics sampled alongside."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from cadist.redact import redact_text
from cadist.tracking.runs import Tracker


def unreachable(exn: BaseException) -> bool:
    """A tracking server that does not answer (connection refused or reset, a timeout, HTTP 503
    after the client's retries), as opposed to a request it answers and rejects."""
    import requests
    from mlflow.exceptions import MlflowException

    if isinstance(exn, MlflowException):
        return str(exn).startswith("API request to") or exn.error_code == "TEMPORARILY_UNAVAILABLE"
    return isinstance(exn, (requests.exceptions.RequestException, ConnectionError, TimeoutError))


#: how a training worker's MLflow client waits on a server that does not answer (unless set): a
#: few seconds, not the client's default of several minutes per call
WORKER_HTTP_ENV = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}


class SpooledTracker(Tracker):
    """A Tracker that training does not wait on. When the tracking server does not answer, each
    record goes to a spool on the storage path instead (`spool` a folder or s3://… / gs://… URI:
    `q/<time>.json` one record each — metrics with their steps and times, texts, files — and the
    files themselves under `files/`) and training goes on; the spool is sent in order once the
    server answers again — by this process, by a restarted worker on any node, or by the driver at
    the end. While the server is down it is tried at most once every `retry_s` seconds."""

    def __init__(self, uri: str, run_id: str, spool: str | Path, echo=print, retry_s=60.0):
        from cadist.storage.store import Storage

        super().__init__(uri, run_id)
        self.store = Storage(spool)
        self.spool, self.echo, self.retry_s = self.store.uri(), echo, retry_s
        self._next_try, self._down_at_step, self._step = 0.0, None, 0
        self._maybe_pending = True  # until a look finds the spool empty (a crash may have left one)

    # -- what training calls ------------------------------------------------------------------
    def log_metrics(self, metrics: dict[str, float], step: int, ts: int | None = None) -> None:
        self._step = step
        clean = {k: float(v) for k, v in metrics.items() if v is not None and np.isfinite(v)}
        ts = int(time.time() * 1000) if ts is None else ts
        self._record({"op": "metrics", "metrics": clean, "step": step, "ts": ts})

    def log_text(self, text: str, artifact_file: str) -> None:
        self._record({"op": "text", "text": redact_text(text), "artifact_file": artifact_file})

    def log_image(self, image: np.ndarray, artifact_file: str) -> None:
        def spooled(dest: Path) -> None:
            from PIL import Image

            Image.fromarray(np.asarray(image)).save(dest)

        self._record_file(
            lambda: super(SpooledTracker, self).log_image(image, artifact_file),
            Path(artifact_file).name,
            str(Path(artifact_file).parent) if "/" in artifact_file else None,
            spooled,
        )

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        import shutil

        self._record_file(
            lambda: super(SpooledTracker, self).log_artifact(path, artifact_path),
            Path(path).name,
            artifact_path,
            lambda dest: shutil.copyfile(path, dest),
        )

    def flush(self, force: bool = False) -> bool:
        """Send what the spool holds; True when it is empty afterwards."""
        pending = self._pending() if self._maybe_pending else []
        if not pending:
            self._maybe_pending = False
            return True
        if not force and time.monotonic() < self._next_try:
            return False
        sent = 0
        try:
            for key, rec in pending:
                self._send(rec)
                self._drop(key, rec)
                sent += 1
        except Exception as exn:
            if not unreachable(exn):
                raise
            self._went_down(exn)
            return False
        self.store.delete("")
        self._maybe_pending = False
        if self._down_at_step is not None:
            self.echo(
                f"[cadist] MLflow at {self.uri} answers again: sent the {sent} records kept since "
                f"step {self._down_at_step}"
            )
        self._down_at_step = None
        return True

    def pending_count(self) -> int:
        return len(self.store.list("q", "*.json"))

    # -- the spool ------------------------------------------------------------------------------
    def _pending(self) -> list[tuple[str, dict]]:
        out = []
        for name in self.store.list("q", "*.json"):
            rec = self.store.read_json(f"q/{name}")
            if rec is not None:  # (a record cut short by a crash is never written: one PUT)
                out.append((f"q/{name}", rec))
        return out

    def _append(self, rec: dict) -> None:
        self._maybe_pending = True
        self.store.write_json(f"q/{time.time_ns():020d}-{os.getpid()}.json", rec, indent=None)

    def _drop(self, key: str, rec: dict) -> None:
        """A record sent: its entry (and spooled file) go."""
        self.store.delete(key)
        if rec["op"] == "artifact":
            self.store.delete(rec["key"].rsplit("/", 1)[0])

    def _send(self, rec: dict) -> None:
        if rec["op"] == "metrics":
            super().log_metrics(rec["metrics"], rec["step"], rec["ts"])
        elif rec["op"] == "text":
            super().log_text(rec["text"], rec["artifact_file"])
        elif rec["op"] == "artifact":
            import tempfile

            with tempfile.TemporaryDirectory() as tmp:  # the file keeps its name as an artifact
                local = self.store.download(rec["key"], Path(tmp) / rec["key"].rsplit("/", 1)[1])
                super().log_artifact(local, rec["artifact_path"])

    def _record(self, rec: dict) -> None:
        if self.flush():
            try:
                self._send(rec)
                return
            except Exception as exn:
                if not unreachable(exn):
                    raise
                self._went_down(exn)
        self._append(rec)

    def _record_file(self, send, name: str, artifact_path: str | None, copy) -> None:
        """Files are sent as they are; only when the server does not answer is a copy spooled
        (`files/<n>/<name>`, as the artifact keeps its file name)."""
        import tempfile

        if self.flush():
            try:
                send()
                return
            except Exception as exn:
                if not unreachable(exn):
                    raise
                self._went_down(exn)
        key = f"files/{time.time_ns()}/{name}"
        with tempfile.TemporaryDirectory() as tmp:
            copy(Path(tmp) / name)
            self.store.upload(Path(tmp) / name, key)
        self._append({"op": "artifact", "key": key, "artifact_path": artifact_path})

    def _went_down(self, exn: BaseException) -> None:
        self._next_try = time.monotonic() + self.retry_s
        if self._down_at_step is None:
            self._down_at_step = self._step
            reason = str(exn).splitlines()[0][:160]
            self.echo(
                f"[cadist] MLflow at {self.uri} does not answer at step {self._step} ({reason}); "
                f"training goes on, records are kept in {self.spool} and sent once it answers"
            )


def system_metrics(uri: str, run_id: str, node: str, interval_s: float, retry_s: float = 60.0):
    """Sample this machine's CPU, memory, disk, network and (with NVML) GPU use for the run, as
    `system/<node>/…` metrics continuing the run's earlier steps; returns the sampler (call
    `finish()`), or None when it cannot start. MLflow's sampler stops for good the first time the
    server does not answer; this one starts it again, at most every `retry_s` seconds, once the
    server answers and the run is still running."""
    import logging

    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
    sampler = SystemSampler(uri, run_id, node, interval_s, retry_s)
    return sampler if sampler.monitor is not None else None


class SystemSampler:
    """MLflow's SystemMetricsMonitor, started again after a tracking-server outage (see
    `system_metrics`). Samples taken while the server is down are not kept."""

    def __init__(self, uri: str, run_id: str, node: str, interval_s: float, retry_s: float):
        import threading

        self.uri, self.run_id, self.node = uri, run_id, node
        self.interval_s, self.retry_s = interval_s, retry_s
        self.restarts = 0
        self.monitor = self._start()
        self._stop = threading.Event()
        self._watch = threading.Thread(target=self._watch_loop, daemon=True, name="cadist-sysmet")
        if self.monitor is not None:
            self._watch.start()

    def _start(self):
        import logging

        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        try:
            monitor = SystemMetricsMonitor(
                self.run_id,
                sampling_interval=self.interval_s,
                samples_before_logging=1,
                resume_logging=True,  # steps continue after the run's last system metric
                node_id=self.node,
                tracking_uri=self.uri,
            )
            monitor.start()
        except Exception as exn:  # a sampler is never worth stopping training for
            logging.getLogger("cadist.train").warning(f"[cadist] no system metrics: {exn}")
            return None
        return monitor

    def _stopped(self) -> bool:
        thread = getattr(self.monitor, "_process", None)  # MLflow's sampling thread
        return thread is not None and not thread.is_alive()

    def _watch_loop(self) -> None:
        from mlflow.tracking import MlflowClient

        while not self._stop.wait(self.retry_s):
            if not self._stopped():
                continue
            try:  # the server answers again? (else MLflow would restart its steps at 0)
                status = MlflowClient(self.uri).get_run(self.run_id).info.status
            except Exception:
                continue
            if status != "RUNNING":
                return
            monitor = self._start()
            if monitor is not None:
                self.monitor, self.restarts = monitor, self.restarts + 1

    def finish(self) -> None:
        self._stop.set()
        if self._watch.is_alive():
            self._watch.join(timeout=10)  # it may be waiting on a server that does not answer
        if self.monitor is not None:
            self.monitor.finish()
