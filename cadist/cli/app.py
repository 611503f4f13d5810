"""The `cadist` command group and the options several subcommands share; a `CadistError` is one
`error:` line (exit code 2), anything else keeps its traceback."""

from __future__ import annotations

import json
import sys

import click

from cadist import __version__
from cadist.errors import CadistError
from cadist.redact import redact_text


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except CadistError as exn:
            click.echo(f"error: {redact_text(_message(exn))}", err=True)
            sys.exit(2)


def _message(exn: CadistError) -> str:
    """The error's own message; one raised in a DataLoader worker comes back wrapped in that
    worker's traceback, with the message on its last line."""
    text = str(exn)
    if "Original Traceback" in text:
        last = text.strip().splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return text


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="cadist")
@click.option(
    "-v",
    "--verbose",
    is_flag=True,
    help="Echo the workers' output line by line (each progress line of rank 0).",
)
@click.option("-q", "--quiet", is_flag=True,
              help="Progress as a plain line a minute instead of a live bar.")  # fmt: skip
def main(verbose: bool, quiet: bool) -> None:
    """Content-adaptive downsampling for segmentation CNNs, trained with Ray + DeepSpeed.

    Long commands show a live progress bar with ETA on a terminal, and a plain line every 10 s
    where output is piped or NO_COLOR is set (CADIST_PROGRESS_INTERVAL changes it)."""
    import os

    # (read by the driver in this process, which passes --verbose on to the workers)
    if verbose:
        os.environ["CADIST_VERBOSE"] = "1"
    if quiet:
        os.environ["CADIST_QUIET"] = "1"
    _library_logs()


def _library_logs() -> None:
    """MLflow's informational lines (creating a store's tables, …) to cadist's log file, its warnings
    and errors on the console: MLflow is told not to set up its own logging, cadist does."""
    import logging
    import os

    os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")
    if os.environ["MLFLOW_CONFIGURE_LOGGING"].lower() != "false":
        return
    logger = logging.getLogger("mlflow")
    if any(getattr(h, "_cadist", False) for h in logger.handlers):
        return
    from cadist.progress import LibraryLog

    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.WARNING)
    console.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    for h in (console, LibraryLog()):
        h._cadist = True
        logger.addHandler(h)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    logging.getLogger("alembic").setLevel(logging.WARNING)  # (MLflow's store migrations)


def _print_json(obj) -> None:
    click.echo(json.dumps(obj, indent=1))


def _set_option(what: str):
    """The repeatable `--set KEY=VALUE` option of job and sweep commands."""
    return click.option(
        "--set", "overrides", multiple=True, metavar="KEY=VALUE",
        help=f"Override {what} (repeatable).",
    )  # fmt: skip


def _dry_run_options(what: str):
    """`--dry-run` and `--json` of `train` and `tune`: check `what` as a real start would and print
    what it would run."""

    def apply(f):
        f = click.option(
            "--json", "as_json", is_flag=True, help="With --dry-run: the plan as one JSON object."
        )(f)
        return click.option(
            "--dry-run",
            is_flag=True,
            help=f"Check {what} as a real start would and print what it would run; start and "
            "write nothing.",
        )(f)

    return apply


def _tta_options(f):
    """`--scales`, `--flip`, `--window` and `--stride` of `eval` and `predict` (test-time
    augmentation and sliding-window inference, `cadist.eval.tta`; the command turns them into an
    `Augmentation` with `Augmentation.parse`)."""
    f = click.option(
        "--stride",
        default=None,
        metavar="HxW",
        help="With --window: pixels between crops (default two thirds of the window).",
    )(f)
    f = click.option(
        "--window",
        default=None,
        metavar="HxW",
        help="Sliding-window inference: run the model on crops of this size, e.g. 512x1024, and "
        "average the logits where they overlap (mmsegmentation's slide mode). `eval` takes the "
        "job's eval.window (and eval.stride) by default; `whole` runs whole images.",
    )(f)
    f = click.option(
        "--flip/--no-flip",
        default=None,
        help="Test-time augmentation: also run each scale mirrored (`eval`: default the job's "
        "eval.flip; `predict`: no).",
    )(f)
    return click.option(
        "--scales",
        default=None,
        metavar="S1,S2,…",
        help="Test-time augmentation: run each image at these scales of its size, e.g. "
        "0.75,1,1.25, and average the class probabilities (not the paper's single-scale "
        "protocol). `eval`: default the job's eval.scales; `predict`: 1.",
    )(f)
