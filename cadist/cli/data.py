"""`cadist data`, `cadist shards`: generated datasets and WebDataset shards."""

from __future__ import annotations

import click

from cadist.cli.app import _Group, main
from cadist.errors import CadistError


# -- data ---------------------------------------------------------------------------------------
@main.group(cls=_Group)
def data() -> None:
    """Generate datasets in the Cityscapes layout."""


@data.command("synth")
@click.option(
    "--out", required=True, type=click.Path(file_okay=False), help="Root of the tree to write."
)
@click.option("--num-train", default=60, show_default=True, type=click.IntRange(0))
@click.option("--num-val", default=20, show_default=True, type=click.IntRange(0))
@click.option("--height", default=256, show_default=True, type=click.IntRange(32))
@click.option("--width", default=512, show_default=True, type=click.IntRange(32))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1), help="Processes.")
def data_synth(out, num_train, num_val, height, width, seed, workers):
    """Write generated street scenes as leftImg8bit/ + gtFine/ (Cityscapes labelIds)."""
    from cadist.data.synthetic import write_tree

    n = write_tree(out, num_train, num_val, height, width, seed, workers, progress=True)
    click.echo(f"wrote {n['train']} train and {n['val']} val scenes of {height}×{width} to {out}")


# -- shards -------------------------------------------------------------------------------------
@main.group(cls=_Group)
def shards() -> None:
    """Build and check WebDataset shards."""


@shards.command("build")
@click.option(
    "--cityscapes-root",
    required=True,
    type=click.Path(exists=True, file_okay=False),
    help="Folder holding leftImg8bit/ and gtFine/.",
)
@click.option("--split", required=True, type=click.Choice(["train", "val", "test"]))
@click.option(
    "--out",
    required=True,
    help="Folder, or s3://bucket/prefix / gs://bucket/prefix (each shard uploaded as it is "
    "written; credentials from the environment).",
)
@click.option("--samples-per-shard", default=32, show_default=True, type=click.IntRange(1))
@click.option(
    "--image-format",
    type=click.Choice(["jpeg", "png"]),
    default=None,
    help="Default: jpeg (q95) for train, png (lossless) for val/test.",
)
@click.option("--jpeg-quality", default=95, show_default=True, type=click.IntRange(1, 100))
@click.option(
    "--workers",
    default=0,
    show_default=True,
    type=click.IntRange(0),
    help="Processes; 0 = one per CPU.",
)
@click.option("--overwrite", is_flag=True, help="Replace existing shards of this split.")
@click.option("--skip-bad", is_flag=True, help="Skip bad samples (counted in the manifest).")
def shards_build(
    cityscapes_root,
    split,
    out,
    samples_per_shard,
    image_format,
    jpeg_quality,
    workers,
    overwrite,
    skip_bad,
):
    """Write SPLIT of a Cityscapes tree as {split}-000000.tar … plus {split}-manifest.json."""
    from cadist.data.shards import build_shards, manifest_path

    m = build_shards(
        cityscapes_root,
        split,
        out,
        samples_per_shard,
        image_format,
        jpeg_quality,
        workers,
        overwrite,
        skip_bad,
    )
    click.echo(
        f"wrote {m['num_samples']} samples in {len(m['shards'])} shards "
        f"({m['image_format']}) to {out}; manifest "
        + (
            f"{out.rstrip('/')}/{split}-manifest.json"
            if "://" in out
            else str(manifest_path(out, split))
        )
        + (f"; skipped {m['num_skipped']} bad samples" if m["num_skipped"] else "")
    )


@shards.command("verify")
@click.argument("manifest")
def shards_verify(manifest):
    """Check every shard of MANIFEST (a path, or s3://… / gs://…) against its sha256."""
    from cadist.data.manifest import verify_shards

    problems = verify_shards(manifest)
    for p in problems:
        click.echo(p, err=True)
    if problems:
        raise CadistError(f"{manifest}: {len(problems)} shards failed verification")
    click.echo(f"{manifest}: all shards match")
