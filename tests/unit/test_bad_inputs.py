"""Bad input, as a new user hands it to the real CLI: each case is one `error:` line that names the
file, key, URI or address and says what was expected — exit code 2, no traceback, and nothing left
behind in the folder the command ran in. Families: weights files, MLflow stores, Ray addresses,
shards, HPatches sequences, job and cluster files."""

import io
import json
import os
import pickle
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cadist.cli import main

from ..conftest import tiny_shards

ROOT = Path(__file__).resolve().parents[2]
JOB = str(ROOT / "jobs" / "demo.yaml")


class Planted:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Good shards and weights to spoil one thing at a time, outside the folder commands run in."""
    from cadist.config.jobfile import load_job
    from cadist.nets.build import build_model
    from cadist.nets.weights import save_weights

    root = tmp_path_factory.mktemp("inputs")
    train, val = tiny_shards(root, num_train=4, num_val=2)
    job = load_job(JOB, [])
    torch.manual_seed(0)
    save_weights(build_model(**job.model.build_kwargs()), root / "w.pt", model=job.model.name)
    return {"root": root, "train": train, "val": val, "weights": root / "w.pt"}


def _files(d: Path) -> set[str]:
    return {str(p.relative_to(d)) for p in d.rglob("*")}


def _fails(args, *expected, cwd: Path):
    """Run `cadist ARGS` in `cwd`: one error line holding each of `expected`; nothing created."""
    before = _files(cwd)
    old = os.getcwd()
    os.chdir(cwd)
    try:
        r = CliRunner().invoke(main, [str(a) for a in args])
    finally:
        os.chdir(old)
    out = r.output
    assert r.exit_code == 2, (args, out, r.exception)
    assert "Traceback" not in out, out
    lines = [ln for ln in out.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, out
    for e in expected:
        assert e in lines[0], (e, lines[0])
    assert _files(cwd) == before, _files(cwd) - before
    return lines[0]


def _eval(inputs, *extra):
    return ["eval", JOB, "--set", f"data.val_shards={inputs['val']}", "--set",
            f"data.train_shards={inputs['train']}", "--set", "data.num_workers=0", *extra]  # fmt: skip


def test_weights_files_that_are_not_weights(inputs, tmp_path):
    bad = tmp_path.parent / f"{tmp_path.name}-bad"
    bad.mkdir()
    (bad / "empty.pt").write_bytes(b"")
    (bad / "random.pt").write_bytes(np.random.default_rng(0).bytes(4096))
    marker = bad / "ran"
    (bad / "plain-pickle.pt").write_bytes(pickle.dumps({"w": Planted(str(marker))}))
    buf = io.BytesIO()
    torch.save({"w": Planted(str(marker))}, buf)  # torch's zip format around a code pickle
    (bad / "torch-pickle.pt").write_bytes(buf.getvalue())
    assert not marker.exists()
    for name, expected in (
        ("empty.pt", "is empty (0 bytes), not a PyTorch checkpoint"),
        ("random.pt", "not a PyTorch checkpoint (it starts with"),
        ("plain-pickle.pt", "not a PyTorch checkpoint cadist can read tensor-only"),
        ("torch-pickle.pt", "holds Python objects other than tensors"),
        ("missing.pt", "no such checkpoint file"),
    ):
        _fails(_eval(inputs, "--ckpt", bad / name), f"{bad / name}: ", expected, cwd=tmp_path)
    assert not marker.exists()


def test_mlflow_stores_that_cannot_answer(inputs, tmp_path):
    for uri, expected in (
        ("foo://bar", "mlflow.tracking_uri 'foo://bar': expected a URI such as"),
        ("http://", "mlflow.tracking_uri 'http://': expected a URI"),
        ("http://127.0.0.1:9", "MLflow tracking server http://127.0.0.1:9 cannot be reached"),
        (f"sqlite:///{tmp_path}/missing/dir/m.db", "no such database"),
        (f"sqlite:///{tmp_path}/m.db", "no such database"),
    ):
        _fails(["report", "--tracking-uri", uri], expected, cwd=tmp_path)
    # a run's weights from a store that does not answer: within seconds, not minutes
    _fails(
        _eval(
            inputs,
            "--ckpt",
            "runs:/0123/checkpoints/best.pt",
            "--set",
            "mlflow.tracking_uri=http://127.0.0.1:9",
        ),  # fmt: skip
        "http://127.0.0.1:9 cannot be reached",
        cwd=tmp_path,
    )
    # credentials in a tracking URI are not printed
    line = _fails(["report", "--tracking-uri", "http://me:s3cret@127.0.0.1:9"], cwd=tmp_path)
    assert "s3cret" not in line and "http://***@127.0.0.1:9" in line


def test_addresses_that_are_not_addresses(inputs, tmp_path):
    _fails(_eval(inputs, "--ckpt", inputs["weights"], "--address", "ht!tp:/x"),
           "Ray cluster address 'ht!tp:/x': expected auto, HOST:PORT", cwd=tmp_path)  # fmt: skip
    for args in (["logs", "cadist-x"], ["submit", JOB, "--no-wait", "--no-upload"]):
        for address in ("ht!tp:/x", "127.0.0.1:8265"):
            _fails([*args, "--address", address], f"--address {address!r}: expected the Ray "
                   "dashboard's URL", cwd=tmp_path)  # fmt: skip
    _fails(["logs", "cadist-x", "--address", "http://127.0.0.1:9"],
           "Ray job API at http://127.0.0.1:9 does not answer", cwd=tmp_path)  # fmt: skip


def test_shards_that_are_not_what_the_manifest_says(inputs, tmp_path):
    bad = tmp_path.parent / f"{tmp_path.name}-shards"
    shutil.copytree(Path(inputs["val"]).parent, bad)
    # a validation shard whose first sample lost its label, read by a DataLoader worker process
    tar = sorted(bad.glob("val-*.tar"))[0]
    with tarfile.open(tar) as t:
        members = [(m, t.extractfile(m).read()) for m in t.getmembers()]
    first = members[0][0].name.split(".")[0]
    with tarfile.open(tar, "w") as t:
        for m, data in members:
            if m.name != f"{first}.label.png":
                t.addfile(m, io.BytesIO(data))
    job = _eval(inputs, "--ckpt", inputs["weights"], "--set", f"data.val_shards={bad}/val-manifest.json",
                "--set", "data.num_workers=1")  # fmt: skip
    _fails(job, f"{tar}: sample '{first}' misses label.png", "cadist shards build", cwd=tmp_path)
    for content, expected in ((b"\xff\xfe\x00", "not valid JSON"),
                              (b"[1, 2]", "not a cadist shard manifest (a JSON list)")):  # fmt: skip
        (bad / "bad-manifest.json").write_bytes(content)
        _fails(_eval(inputs, "--ckpt", inputs["weights"], "--set", f"data.val_shards={bad}/bad-manifest.json"),
               f"{bad}/bad-manifest.json: ", expected, cwd=tmp_path)  # fmt: skip


def test_hpatches_homographies_that_map_nothing(tmp_path):
    seqs = tmp_path.parent / f"{tmp_path.name}-hp"
    r = CliRunner().invoke(main, ["hpatches", "synth", "--out", seqs, "--illumination", "1",
                                  "--viewpoint", "0", "--height", "64", "--width", "64"])  # fmt: skip
    assert r.exit_code == 0, r.output
    (seq,) = seqs.iterdir()
    for h, expected in ((np.zeros((3, 3)), "the homography is singular"),
                        (np.array([[1, 0, np.inf], [0, 1, 0], [0, 0, 1]]), "holds inf or nan"),
                        (np.ones((2, 3)), "expected a 3×3 homography")):  # fmt: skip
        np.savetxt(seq / "H_1_4", h)
        _fails(["hpatches", "eval", "--root", seqs, "--json"], f"{seq / 'H_1_4'}: ", expected,
               cwd=tmp_path)  # fmt: skip


def test_job_and_cluster_files_that_cannot_be_read(tmp_path):
    bad = tmp_path.parent / f"{tmp_path.name}-files"
    bad.mkdir()
    (bad / "latin1.yaml").write_bytes("name: caf\xe9\n".encode("latin-1"))
    for cmd in (["config"], ["train"], ["train", "--dry-run"]):
        _fails([*cmd, bad / "latin1.yaml"], f"{bad / 'latin1.yaml'}: not UTF-8 text (byte 0xe9",
               "save it as UTF-8", cwd=tmp_path)  # fmt: skip
    for value in (".inf", "-.inf", "nan", "1e999"):
        _fails(["config", JOB, "--set", f"train.lr_head={value}"],
               f"{JOB}: train.lr_head: Input should be a finite number", cwd=tmp_path)  # fmt: skip
    (bad / "cluster.yaml").write_bytes(b"cluster_name: \xff\n")
    _fails(["cluster", "check", bad / "cluster.yaml"], "not UTF-8 text", cwd=tmp_path)


def test_credentials_in_job_values_are_not_shown(inputs, tmp_path):
    """`cadist config` and errors show a job's credentials as ***; its other values as given."""
    url = "https://me:s3cret@example.org/w.pt"
    presigned = ("https://b.s3.amazonaws.com/w.pt?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential"
                 "=AKIAEXAMPLE%2F20261206%2Fus-east-1%2Fs3%2Faws4_request&X-Amz-Signature=abc123")  # fmt: skip
    for weights, shown in ((url, "https://***@example.org/w.pt"),
                           (presigned, "X-Amz-Credential=***&X-Amz-Signature=***")):  # fmt: skip
        for extra in ([], ["--sources"]):
            r = CliRunner().invoke(
                main, ["config", JOB, "--set", f"model.weights={weights}", *extra]
            )
            assert r.exit_code == 0, r.output
            assert shown in r.output and "s3cret" not in r.output and "abc123" not in r.output
            assert "AKIAEXAMPLE" not in r.output and "data:" in r.output
    # the plan a dry run prints, and the error of weights that cannot be fetched
    r = CliRunner().invoke(main, ["train", JOB, "--dry-run", "--json", "--set",
                                  "model.weights=http://me:s3cret@127.0.0.1:9/w.pt",
                                  "--set", f"data.train_shards={inputs['train']}",
                                  "--set", f"data.val_shards={inputs['val']}"])  # fmt: skip
    assert r.exit_code == 2 and "s3cret" not in r.output, r.output
    assert "http://***@127.0.0.1:9/w.pt: cannot download" in r.output


def test_redaction_rules():
    from cadist.redact import has_secret, redact, redact_text

    assert redact_text("see s3://bucket/key and http://u@h/x?sig=1&a=2") == (
        "see s3://bucket/key and http://***@h/x?sig=***&a=2"
    )
    assert redact({"mlflow": {"token": "t", "tokens_per_s": None, "tracking_uri": "sqlite:///x"},
                   "keys": [1, 2], "train": {"lr_head": 0.01}}) == {
        "mlflow": {"token": "***", "tokens_per_s": None, "tracking_uri": "sqlite:///x"},
        "keys": [1, 2], "train": {"lr_head": 0.01}}  # fmt: skip
    assert has_secret({"model": {"weights": "gs://b/w.pt?X-Goog-Signature=ff"}}) == [
        "model.weights"
    ]
    assert has_secret({"model": {"weights": "s3://b/w.pt"}, "AWS_SECRET_ACCESS_KEY": ""}) == []
    assert json.dumps(redact({"api_key": "k"})) == '{"api_key": "***"}'


def test_a_damaged_demo_state_file_is_one_error_before_anything_runs(tmp_path):
    """`cadist demo` reads its record of finished stages first: a damaged one is one error naming
    the file and the fix, and no scene is generated."""
    from click.testing import CliRunner

    from cadist.cli import main

    for text in ("{not json", "[1, 2]"):
        (tmp_path / "demo-state.json").write_text(text)
        r = CliRunner().invoke(main, ["demo", "--workdir", str(tmp_path)])
        assert r.exit_code == 2, r.output
        assert f"{tmp_path / 'demo-state.json'}: expected the demo's JSON record" in r.output
        assert "delete it to run every stage again" in r.output and "Traceback" not in r.output
        assert sorted(p.name for p in tmp_path.iterdir()) == ["demo-state.json"]
