"""The storage layer (cadist.storage.store): the same verbs on a local folder and on a real S3 API
server (moto), atomic writes, the job layout, and one clear error for each bad storage input."""

import json

import pytest

from cadist.errors import CadistError
from cadist.storage.fetch import local_copy
from cadist.storage.store import Storage
from cadist.storage.uri import StorageError, job_key
from tests.conftest import s3_server


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return Storage(tmp_path / "runs")
    return Storage(f"s3://{s3_server().bucket()}/runs")


def test_the_verbs_behave_the_same_on_a_folder_and_on_s3(store, tmp_path):
    assert not store.exists(job_key("j", "job")) and store.jobs() == []
    uri = store.write(job_key("j", "job"), "name: j\n")
    assert (
        uri == store.uri(".cadist/j.yaml") and store.read_text(job_key("j", "job")) == "name: j\n"
    )
    assert store.is_file(job_key("j", "job")) and store.is_dir(".cadist") and store.jobs() == ["j"]
    store.write_json(job_key("j", "mlflow"), {"run_id": "r1"})
    assert store.read_json(job_key("j", "mlflow")) == {"run_id": "r1"}
    assert store.read_json("missing.json", "none") == "none"
    with pytest.raises(FileNotFoundError, match="missing.json"):
        store.read_bytes("missing.json")
    # no temporary file is left beside what was written
    assert store.list(".cadist") == ["j.mlflow.json", "j.yaml"]
    # checkpoints: complete and registered folders only
    for step in (10, 20):
        store.write(f"j/step_{step:08d}/model.pt", b"w")
        store.write(f"j/step_{step:08d}/state/mp_rank_00_model_states.pt", b"s")
        store.write(f"j/step_{step:08d}/manifest.json", b"{}")
    store.write("j/step_00000030/model.pt", b"w")  # half-uploaded: no DeepSpeed state yet
    assert store.latest_checkpoint("j") is None  # none registered: Ray Train would start over
    registered = [{"checkpoint_dir_name": f"step_000000{n}0"} for n in (1, 2, 3)]
    store.write_json("j/checkpoint_manager_snapshot.json", {"checkpoint_results": registered})
    assert store.latest_checkpoint("j") == (20, store.uri("j/step_00000020"))
    store.write_json("j/checkpoint_manager_snapshot.json",
                     {"checkpoint_results": [{"checkpoint_dir_name": "step_00000010"}]})  # fmt: skip
    assert store.latest_checkpoint("j")[0] == 10  # 20 is complete but Ray never registered it
    # local copies of a weights file and of a checkpoint folder's model.pt
    weights = local_copy(store.uri("j/step_00000010"), tmp_path / "dl")
    assert weights.name == "model.pt" and weights.read_bytes() == b"w"
    # set aside: renamed, nothing deleted
    moved = store.set_aside(["j", job_key("j", "job")])
    assert len(moved) == 2 and store.jobs() == [] and not store.is_dir("j")
    assert store.list("", "j.before-*") and store.walk(moved[0][len(store.uri()) + 1 :])
    (tmp_path / "w.pt").write_bytes(b"w")
    store.upload(tmp_path / "w.pt", "exports/best.pt")
    assert store.download("exports/best.pt", tmp_path / "b.pt").read_bytes() == b"w"
    store.delete("exports")
    assert not store.exists("exports/best.pt")


def test_bad_storage_inputs_each_get_one_clear_error(monkeypatch):
    from cadist.config.jobfile import load_job

    with pytest.raises(CadistError, match=r"unknown storage scheme 'hdfs'.*s3://bucket/prefix"):
        load_job("jobs/demo.yaml", ["cluster.storage_path=hdfs://nn/runs"])
    with pytest.raises(CadistError, match="credentials do not go in the URI"):
        load_job("jobs/demo.yaml", ["cluster.storage_path=s3://key:secret@bucket/runs"])
    s3_server()
    with pytest.raises(
        StorageError, match=r"s3://no-such-bucket/runs: bucket no-such-bucket does not exist"
    ):
        Storage("s3://no-such-bucket/runs").check()
    monkeypatch.setenv("CADIST_STORAGE_RETRIES", "2")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    with pytest.raises(StorageError, match=r"s3://b1/runs: cannot reach .*does not answer"):
        Storage("s3://b1/runs").check()


def test_shards_build_to_s3_and_stream_from_it(tmp_path):
    """`cadist shards build --out s3://…` uploads as it writes; manifests and tars on S3 are read
    through the same layer, and `shards verify` checks the sha256 there."""
    from click.testing import CliRunner

    from cadist.cli import main
    from cadist.data.stream import ShardStream, expand_shards
    from cadist.data.synthetic import write_tree

    s3 = s3_server()
    bucket = s3.bucket()
    write_tree(tmp_path / "cs", num_train=4, num_val=2, height=32, width=64, seed=0)
    out = f"s3://{bucket}/shards"
    r = CliRunner().invoke(main, ["shards", "build", "--cityscapes-root", str(tmp_path / "cs"),
                                  "--split", "val", "--out", out, "--samples-per-shard", "1",
                                  "--workers", "1"])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert s3.keys(bucket) == [
        "shards/val-000000.tar",
        "shards/val-000001.tar",
        "shards/val-manifest.json",
    ]  # fmt: skip (no staging left)
    urls = expand_shards(f"{out}/val-manifest.json")
    assert urls == [f"{out}/val-000000.tar", f"{out}/val-000001.tar"]
    batches = list(ShardStream(f"{out}/val-manifest.json", train=False, batch_size=2))
    assert len(batches) == 1 and batches[0]["image"].shape == (2, 3, 32, 64)
    assert batches[0]["shard"] == urls
    r = CliRunner().invoke(main, ["shards", "verify", f"{out}/val-manifest.json"])
    assert r.exit_code == 0 and "all shards match" in r.output
    # a replaced shard fails verification; a missing one is a clear error when streamed
    Storage(out).write("val-000001.tar", Storage(out).read_bytes("val-000000.tar"))
    r = CliRunner().invoke(main, ["shards", "verify", f"{out}/val-manifest.json"])
    assert r.exit_code != 0 and f"{out}/val-000001.tar: sha256 differs" in r.output
    r = CliRunner().invoke(main, ["shards", "build", "--cityscapes-root", str(tmp_path / "cs"),
                                  "--split", "val", "--out", out])  # fmt: skip
    assert r.exit_code != 0 and "already holds val shards" in r.output
    Storage(out).delete("val-000001.tar")
    with pytest.raises(CadistError, match=r"val-000001.tar: no such shard"):
        list(ShardStream(f"{out}/val-manifest.json", train=False, batch_size=2))
    assert json.loads(Storage(out).read_bytes("val-manifest.json"))["num_samples"] == 2


def test_stop_and_status_by_name_on_s3():
    """`cadist stop NAME --storage s3://…` writes the request where the job's workers look for it,
    and `cadist status s3://…` reads it back; a name the storage does not hold is one error."""
    from click.testing import CliRunner

    from cadist.cli import main
    from cadist.config.jobfile import load_job

    root = f"s3://{s3_server().bucket()}/runs"
    store = Storage(root)
    job = load_job("jobs/demo.yaml", ["name=far", f"cluster.storage_path={root}"])
    store.write(job_key("far", "job"), job.to_yaml())
    for step in (50, 100):
        store.write(f"far/step_{step:08d}/model.pt", b"w")
        store.write(f"far/step_{step:08d}/state/mp_rank_00_model_states.pt", b"s")
        store.write(f"far/step_{step:08d}/manifest.json", b"{}")
    store.write_json("far/checkpoint_manager_snapshot.json", {"checkpoint_results": [
        {"checkpoint_dir_name": "step_00000050"}, {"checkpoint_dir_name": "step_00000100"}]})  # fmt: skip
    r = CliRunner().invoke(main, ["stop", "far", "--storage", root, "--json"])
    assert r.exit_code == 0, r.output
    asked = json.loads(r.stdout)
    assert asked["stop_file"] == f"{root}/.cadist/far.stop.json"
    assert (
        asked["last_checkpoint_step"] == 100
        and store.read_json(job_key("far", "stop"))["job"] == "far"
    )
    r = CliRunner().invoke(main, ["status", root, "--json"])
    (row,) = json.loads(r.stdout)["jobs"]
    assert (row["step"], row["state"], row["checkpoint"]) == (
        100,
        "stop requested",
        f"{root}/far/step_00000100",
    )
    r = CliRunner().invoke(main, ["stop", "near", "--storage", root])
    assert r.exit_code == 2 and f"{root}: no job or sweep named 'near' here (jobs: far" in r.output
    r = CliRunner().invoke(main, ["status", f"s3://{s3_server().bucket()}/empty"])
    assert r.exit_code == 2 and "no cadist jobs here" in r.output


def test_manifests_over_http_and_file_urls_are_read_as_urls(tmp_path):
    """`data.*_shards: http://host/…/val-manifest.json` (and file://) is a URL: the manifest is
    fetched, its shards streamed from beside it, `shards verify` checks them there; a missing one
    and a server that does not answer are one error each."""
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    from cadist.data.manifest import verify_shards
    from cadist.data.shards import build_shards
    from cadist.data.stream import ShardStream, expand_shards
    from cadist.data.synthetic import write_tree
    from cadist.errors import ShardError

    write_tree(tmp_path / "cs", num_train=0, num_val=3, height=32, width=64, seed=2)
    build_shards(tmp_path / "cs", "val", tmp_path / "www" / "shards", samples_per_shard=2,
                 workers=1, progress=False)  # fmt: skip
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(tmp_path / "www"))
    handler.log_message = lambda *a: None
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}/shards"
    try:
        manifest = f"{base}/val-manifest.json"
        assert expand_shards(manifest) == [f"{base}/val-000000.tar", f"{base}/val-000001.tar"]
        keys = [k for b in ShardStream(manifest, train=False, batch_size=2) for k in b["key"]]
        assert len(keys) == 3 and all(s.startswith(base) for b in ShardStream(
            manifest, train=False, batch_size=2) for s in b["shard"])  # fmt: skip
        assert verify_shards(manifest) == []
        (tmp_path / "www" / "shards" / "val-000001.tar").unlink()
        assert verify_shards(manifest) == [f"{base}/val-000001.tar: missing"]
        with pytest.raises(ShardError, match=rf"{base}/nope-manifest.json: no such manifest"):
            expand_shards(f"{base}/nope-manifest.json")
        url = (tmp_path / "www" / "shards" / "val-manifest.json").as_uri()
        assert expand_shards(url)[0] == url.replace("val-manifest.json", "val-000000.tar")
        tar = url.replace("manifest.json", "000000.tar")
        assert sum(len(b["key"]) for b in ShardStream(tar, train=False)) == 2
    finally:
        server.shutdown()
        server.server_close()
    with pytest.raises(ShardError, match="cannot reach the server"):
        expand_shards(f"{base}/val-manifest.json")


def test_a_worker_s_storage_and_checkpoint_errors_are_recognised_on_the_driver():
    """Ray Train hands the driver a worker's traceback as text: the driver finds cadist's errors in
    it by their class's current module (a regression once a module moved)."""
    import traceback

    from cadist.errors import CheckpointError, ShardError
    from cadist.storage.store import Storage
    from cadist.storage.uri import StorageError
    from cadist.train.driver import _storage_failure

    def as_text(exn):
        try:
            raise exn
        except Exception:  # noqa: BLE001 - formatted as Ray Train does
            return RuntimeError("Training failed due to worker errors:\n" + traceback.format_exc())

    store = Storage("s3://runs/runs")
    err = _storage_failure(as_text(StorageError("s3://runs/x: cannot look up (no answer)")), store)
    assert isinstance(err, StorageError) and str(err) == (
        "training stopped: s3://runs/x: cannot look up (no answer)"
    )
    err = _storage_failure(as_text(ShardError("cannot open shard: s3://runs/s-0.tar")), store)
    assert isinstance(err, StorageError) and str(err).endswith("s3://runs/s-0.tar")
    err = _storage_failure(as_text(CheckpointError("step_10/model.pt: not a checkpoint")), store)
    assert isinstance(err, CheckpointError) and str(err) == "step_10/model.pt: not a checkpoint"
    assert _storage_failure(as_text(ValueError("something else")), store) is None
