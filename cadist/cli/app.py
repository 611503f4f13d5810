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
def main() -> None:
    """Content-adaptive downsampling for segmentation CNNs, trained with Ray + DeepSpeed."""


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
