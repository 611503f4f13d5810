"""Where a sweep keeps its files on the storage path (Tune's experiment folder, cadist's state and
MLflow marker, the record of ended trials) and the error of a trial stopped on request. No Ray."""

from __future__ import annotations

from cadist.storage.store import Storage
from cadist.storage.uri import sweep_key
from cadist.sweep.spec import SweepConfig


class SweepStopped(RuntimeError):
    """A trial ended by `cadist stop SWEEP` (after a checkpoint, or before it started): Tune marks it
    errored, and a rerun of the sweep resumes it (`resume_errored`) from that checkpoint."""


ENDED = "cadist_trials_ended.json"  # in the Tune experiment folder (set aside with it on --restart)


def _ended(uri: str) -> set[str] | None:
    """The trial ids `_RecordEnded` wrote; None where it did not run (sweeps from older cadist)."""
    ids = Storage(uri).read_json("")
    return set(ids) if isinstance(ids, list) else None


def _sweep_files(sweep: SweepConfig) -> tuple[str, str, str]:
    """Keys of the sweep's Tune experiment folder, its state (settings it started with), its MLflow
    marker."""
    return (f"sweep-{sweep.name}", sweep_key(sweep.name, "state"),
            sweep_key(sweep.name, "mlflow"))  # fmt: skip
