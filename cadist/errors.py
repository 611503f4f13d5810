"""Errors a user can act on.

Every message says what is wrong, where (file:key, shard URL and sample key, rank), what was
expected and how to fix it. The CLI prints a `CadistError` as one `error:` line; anything else is a
bug and keeps its traceback.
"""


class CadistError(Exception):
    """Base class for mistakes in user input (files, configs, checkpoints, data)."""


class ConfigError(CadistError):
    """A job file or command-line option is invalid."""


class DataError(CadistError):
    """A dataset tree on disk is incomplete or holds invalid files."""


class ShardError(CadistError):
    """A WebDataset shard, its manifest or one of its samples is unusable."""


class CheckpointError(CadistError):
    """A checkpoint or weights file cannot be loaded into the requested model."""


class ClusterError(CadistError):
    """The Ray cluster cannot run the job (any more): too few nodes, or nodes lost for good."""


class TrackingError(CadistError):
    """The MLflow tracking server stopped answering and what it should hold waits in a spool."""
