"""The `cadist` command line. Subcommands import their heavy modules lazily, so `--help` is instant;
they live by area in this package (data, models, training, clusters, keypoints).

A `CadistError` (a user's mistake) is printed as one `error:` line with exit code 2; anything else
is a bug and keeps its traceback.
"""

# the subcommands register themselves on `main` when imported
from cadist.cli import clusters, data, evaluation, keypoints, models, runs, training  # noqa: E402, F401
from cadist.cli.app import main

__all__ = ["main"]
