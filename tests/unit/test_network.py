"""The workers' process-group interface (cadist.cluster.network): the interface of the Ray node IP,
unless cluster.network_interface or GLOO_SOCKET_IFNAME/NCCL_SOCKET_IFNAME say otherwise; a
loopback hostname with no interface found is one warning naming the fix."""

import socket

import psutil
import pytest

from cadist.cluster import network
from cadist.cluster.network import IFNAME_VARS, choose_interface, interface_of
from cadist.config.jobfile import load_job
from cadist.errors import CadistError


@pytest.fixture(autouse=True)
def _clean_env():
    """choose_interface sets the variables in this process: none may outlive a test (a later
    gloo group in this process would bind to a made-up interface)."""
    import os

    saved = {v: os.environ.pop(v, None) for v in IFNAME_VARS}
    yield
    for var, value in saved.items():
        os.environ.pop(var, None)
        if value is not None:
            os.environ[var] = value


def _an_interface() -> tuple[str, str]:
    """(name, IPv4 address) of a real interface of this machine (loopback at least)."""
    for name, addrs in sorted(psutil.net_if_addrs().items(), key=lambda kv: kv[0] == "lo"):
        for a in addrs:
            if a.family == socket.AF_INET:
                return name, a.address
    raise AssertionError("no IPv4 interface")


def test_the_node_ip_names_its_interface(monkeypatch):
    import os

    name, ip = _an_interface()
    assert interface_of(ip) == name and interface_of("203.0.113.77") is None
    got = choose_interface(ip, None, several_nodes=True)
    assert (got["interface"], got["warning"]) == (name, None)
    assert all(os.environ[v] == name for v in IFNAME_VARS)


def test_configured_and_environment_win(monkeypatch):
    import os

    name, ip = _an_interface()
    assert choose_interface(ip, "ens5", True)["how"] == "cluster.network_interface"
    assert os.environ["GLOO_SOCKET_IFNAME"] == "ens5"
    monkeypatch.setenv("NCCL_SOCKET_IFNAME", "ib0")
    monkeypatch.delenv("GLOO_SOCKET_IFNAME")
    got = choose_interface(ip, "ens5", True)
    assert (got["interface"], got["how"]) == ("ib0", "environment")


def test_a_loopback_hostname_without_an_interface_is_a_warning_with_the_fix(monkeypatch):
    monkeypatch.setattr(network, "hostname_is_loopback", lambda: True)
    got = choose_interface("203.0.113.77", None, several_nodes=True)
    assert got["interface"] is None
    assert "resolves to a loopback address" in got["warning"]
    assert "set cluster.network_interface" in got["warning"]
    assert choose_interface("203.0.113.77", None, several_nodes=False)["warning"] is None


def test_the_job_key_is_checked():
    job = load_job("jobs/demo.yaml", ["cluster.network_interface=eth0"])
    assert job.cluster.network_interface == "eth0"
    with pytest.raises(CadistError, match="cluster.network_interface"):
        load_job("jobs/demo.yaml", ["cluster.network_interface=eth0; rm -rf /"])
