"""Fixtures of the `hosts` tests: hosts made of namespaces (harness.py), skipped where they cannot
be made (not root, no `ip`/`unshare`) — on CI, which runs as root, .ci/run fails if they were."""

import os

import pytest

from .harness import available


def pytest_collection_modifyitems(config, items):
    reason = available()
    ours = [i for i in items if "tests/hosts/" in str(i.fspath).replace("\\", "/")]
    if reason and ours and os.environ.get("CI") == "true":  # CI runs as root: they must run
        raise pytest.UsageError(f"the hosts tests cannot run on CI: {reason}")
    for item in items:
        if "tests/hosts/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.hosts)
            if reason:
                item.add_marker(pytest.mark.skip(reason=f"hosts: {reason}"))
