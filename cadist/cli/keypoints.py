"""`cadist hpatches`: keypoint descriptors on HPatches sequences."""

from __future__ import annotations

import json

import click

from cadist.cli.app import _print_json, main
from cadist.errors import CadistError


# -- keypoints ----------------------------------------------------------------------------------
@main.group("hpatches")
def hpatches_group():
    """Keypoint descriptors (D2-Net, adaptive APD2Net) on HPatches sequences (method §11, §12)."""


@hpatches_group.command("synth")
@click.option("--out", required=True, type=click.Path(file_okay=False))
@click.option("--illumination", default=2, show_default=True, type=click.IntRange(0))
@click.option("--viewpoint", default=2, show_default=True, type=click.IntRange(0))
@click.option("--height", default=240, show_default=True, type=click.IntRange(64))
@click.option("--width", default=320, show_default=True, type=click.IntRange(64))
@click.option("--seed", default=0, show_default=True, type=int)
def hpatches_synth_cmd(out, illumination, viewpoint, height, width, seed):
    """Generate sequences in HPatches layout (i_*: brightness, v_*: homography warps)."""
    from cadist.eval.hpatches import write_sequences

    seqs = write_sequences(out, illumination, viewpoint, height, width, seed)
    click.echo(f"{len(seqs)} sequences in {out}")


@hpatches_group.command("eval")
@click.option("--root", required=True, type=click.Path(file_okay=False), help="Sequences folder.")
@click.option(
    "--network", default="d2net", show_default=True, type=click.Choice(["d2net", "apd2net"])
)
@click.option(
    "--output-stride", default=4, show_default=True, type=click.Choice(["1", "2", "4", "8"])
)
@click.option("--start-stride", default=4, show_default=True, type=click.Choice(["1", "2", "4"]))
@click.option(
    "--windows", default="11", show_default=True, help="APD2Net window sizes d0,d1,… (§11.4)."
)
@click.option("--weights", type=click.Path(dir_okay=False), help="D2-Net weights (d2_tf.pth).")
@click.option("--device", default="auto", show_default=True)
@click.option(
    "--save-features",
    type=click.Path(file_okay=False),
    help="Also write <dir>/<sequence>/<k>.ppm.<method>.npz (keypoints, scores, descriptors).",
)
@click.option(
    "--save-results",
    type=click.Path(dir_okay=False),
    help="Write the per-pair results as method §12's cached results file (.npy), for "
    "`cadist hpatches compare`.",
)
@click.option(
    "--tracking-uri",
    "--mlflow-uri",
    "mlflow_uri",
    help="Log the scores as an MLflow run (e.g. sqlite:///mlflow.db; --mlflow-uri is the old name).",
)
@click.option("--experiment", default="hpatches", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def hpatches_eval_cmd(
    root, network, output_stride, start_stride, windows, weights, device, save_features,
    save_results, mlflow_uri, experiment, as_json,
):  # fmt: skip
    """Mean matching accuracy (MMA@1…15 px) of a descriptor network on HPatches sequences."""
    from cadist.keypoints.extract import Method

    try:
        ws = tuple(int(v) for v in windows.split(",") if v.strip())
    except ValueError:
        raise CadistError(f"--windows {windows!r}: expected integers like 21,21") from None
    method = Method(network, int(output_stride), int(start_stride), ws)
    _check_tracking(mlflow_uri)
    if not weights:
        click.echo(
            "warning: no --weights: random D2-Net weights (a pipeline check, not a score)", err=True
        )
    r = _score(method, root, weights, device, save_features, save_results)
    if mlflow_uri:
        _log_score(r, method, root, weights, mlflow_uri, experiment, save_results)
    if as_json:
        _print_json(r)
        return
    click.echo(
        f"{method.name} on {root}: {r['sequences']['i']} illumination + {r['sequences']['v']} viewpoint sequences"
    )
    click.echo(
        f"  MMA@3 {r['mma@3']:.4f} (illumination {r['mma_illumination'][2]:.4f}, viewpoint {r['mma_viewpoint'][2]:.4f})"
    )
    click.echo(
        f"  features/image {r['features_per_image']:.1f}, matches/pair {r['matches_per_pair']:.1f}"
    )
    click.echo(f"  {r['gmac_per_image']:.2f} GMac per image (method's counting rules)")


def _check_tracking(uri: str | None) -> None:
    """Before any image is scored: the MLflow store the scores go to answers (≤ 5 s)."""
    if uri:
        from cadist.tracking.runs import check_reachable, resolve_uri

        check_reachable(resolve_uri(uri))


def _score(method, root, weights, device, save_features=None, save_results=None) -> dict:
    """One descriptor network over a sequences folder (`evaluate`), weights loaded if given."""
    import torch

    from cadist.eval.hpatches import evaluate, sequences
    from cadist.keypoints.d2net import load_d2net_weights
    from cadist.keypoints.extract import describe
    from cadist.progress import Bar

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    net = method.build()
    if weights:
        load_d2net_weights(net, weights)
    net.to(device).eval()
    seqs = len(sequences(root))
    bar = Bar(f"hpatches {method.name}", 6 * seqs, "img")  # six images per sequence

    def described(rgb):
        out = describe(net, method, rgb, device)
        bar.add(1)
        return out

    try:
        r = evaluate(
            root,
            described,
            progress=lambda n, total, name: bar.add(0, f"{n}/{total} sequences ({name})"),
            save_to=save_features,
            suffix=method.name,
            save_results=save_results,
        )
    finally:
        bar.close()
    return {"method": method.name, "weights": weights} | r


def _log_score(r, method, root, weights, mlflow_uri, experiment, save_results=None) -> str:
    """A score as an MLflow run: MMA@3 and the MMA curve, features, matches, GMac per image."""
    from cadist.tracking.runs import Tracker, new_run

    tracker = Tracker(
        mlflow_uri, new_run(mlflow_uri, experiment, method.name, {"cadist.task": "hpatches"})
    )
    tracker.log_params({"network": method.network, "method": method.name, "root": str(root),
                        "weights": str(weights)})  # fmt: skip
    keys = {"mma@3": "hpatches/mma_3px", "features_per_image": "hpatches/features_per_image",
            "matches_per_pair": "hpatches/matches_per_pair", "gmac_per_image": "macs/gmac_per_image",
            "high_res_fraction": "hpatches/high_res_fraction"}  # fmt: skip
    tracker.log_metrics({v: r[k] for k, v in keys.items() if k in r}, 0)
    for t, v in zip(r["thresholds"], r["mma"], strict=True):
        tracker.log_metrics({"hpatches/mma": v}, t)
    tracker.log_text(json.dumps(r, indent=1), "hpatches/results.json")
    if save_results:
        tracker.log_artifact(save_results, "hpatches")
    tracker.finish()
    return tracker.run_id


@hpatches_group.command("table")
@click.option("--root", required=True, type=click.Path(file_okay=False), help="Sequences folder.")
@click.option("--weights", type=click.Path(dir_okay=False), help="D2-Net weights (d2_tf.pth).")
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False),
    help="Folder of the results files (<method>.npy); a method whose file exists is not run again.",
)
@click.option(
    "--methods",
    default=None,
    help="Comma-separated method names (d2net_os4, apd2net_s2_21-21, …); default: the 13 of the "
    "paper's table (§13.3).",
)
@click.option("--device", default="auto", show_default=True)
@click.option(
    "--tracking-uri",
    "--mlflow-uri",
    "mlflow_uri",
    help="Also log each method's score as an MLflow run (--mlflow-uri is the old name).",
)
@click.option("--experiment", default="hpatches", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def hpatches_table_cmd(root, weights, out, methods, device, mlflow_uri, experiment, as_json):
    """The paper's keypoint table: every method scored on the same SIFT keypoints (computed once
    per image), one §12 results file each in OUT, then the MMA table beside the paper's MMA@3.
    Rerunning continues where it stopped."""
    _check_tracking(mlflow_uri)
    from pathlib import Path

    from cadist.eval.hpatches import sequences
    from cadist.eval.hpatches_results import PAPER_MMA3
    from cadist.keypoints.extract import Method

    names = [m.strip() for m in methods.split(",") if m.strip()] if methods else list(PAPER_MMA3)
    try:
        chosen = [Method.from_name(n) for n in names]
    except ValueError as exn:
        raise CadistError(f"--methods: {exn}") from None
    sequences(root)  # a wrong folder fails before any network runs
    if not weights:
        click.echo("warning: no --weights: random D2-Net weights (a pipeline check, not a score)",
                   err=True)  # fmt: skip
    files = []
    for n, method in enumerate(chosen, 1):
        path = Path(out) / f"{method.name}.npy"
        files.append(str(path))
        if path.is_file():
            click.echo(f"[{n}/{len(chosen)}] {method.name}: {path} exists, kept", err=True)
            continue
        r = _score(method, root, weights, device, save_results=path)
        if mlflow_uri:
            _log_score(r, method, root, weights, mlflow_uri, experiment, path)
        click.echo(f"[{n}/{len(chosen)}] {method.name}: MMA@3 {r['mma@3']:.4f}", err=True)
    _print_compare(files, as_json)


@hpatches_group.command("compare")
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def hpatches_compare_cmd(files, as_json):
    """The MMA table of HPatches results files (method §12's cached format: cadist's
    `--save-results` or other evaluations'), one row per file, beside the paper's MMA@3 where the
    file is named after a method of §13.3 (e.g. d2net_os4.npy, apd2net_s2_21-21.npy). Files are
    read without executing anything they contain."""
    _print_compare(files, as_json)


def _print_compare(files, as_json: bool) -> None:
    from pathlib import Path

    from cadist.eval.hpatches_results import PAPER_MMA3, read_results, summarise

    rows = []
    for f in files:
        s = summarise(read_results(f))
        name = Path(f).name.removesuffix(".npy")
        rows.append({"file": f, "method": name, "paper_mma@3": PAPER_MMA3.get(name)} | s)
    if as_json:
        _print_json({"results": rows})
        return
    at = (1, 3, 5, 10)
    head = ["method", *(f"MMA@{t}" for t in at), "illum. @3", "viewp. @3", "features",
            "matches", "paper @3"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        mma = dict(zip(r["thresholds"], r["mma"], strict=True))
        i3 = dict(zip(r["thresholds"], r["mma_illumination"], strict=True)).get(3)
        v3 = dict(zip(r["thresholds"], r["mma_viewpoint"], strict=True)).get(3)
        cells = [r["method"], *(mma.get(t) for t in at), i3, v3, r["features_per_image"],
                 r["matches_per_pair"], r["paper_mma@3"]]  # fmt: skip
        text = [c if isinstance(c, str) else "–" if c is None else f"{c:.4f}" for c in cells]
        text[-3], text[-2] = f"{r['features_per_image']:.2f}", f"{r['matches_per_pair']:.1f}"
        lines.append("| " + " | ".join(text) + " |")
    click.echo("\n".join(lines))
