"""The `cadist` command line: `app` holds the group and shared options, one module per area registers
its subcommands. Imports any package, lazily inside commands so `--help` stays instant."""

# the subcommands register themselves on `main` when imported
from cadist.cli import clusters, data, evaluation, keypoints, models, runs, training  # noqa: E402, F401
from cadist.cli.app import main

__all__ = ["main"]
