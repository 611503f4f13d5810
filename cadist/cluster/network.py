"""Which network interface the workers' process group uses (gloo on CPUs, NCCL on GPUs).

Left alone, gloo picks the address the machine's hostname resolves to. Where `/etc/hosts` maps the
hostname to a loopback address (Debian's 127.0.1.1, many cloud images and containers), every rank
announces 127.0.0.1 and a group across hosts cannot connect (`Gloo connectFullMesh failed …
remote=[127.0.0.1]`). cadist instead names the interface that carries each worker's Ray node IP —
the address the other nodes reach it at — in `GLOO_SOCKET_IFNAME` and `NCCL_SOCKET_IFNAME`,
before Ray Train creates the group. `cluster.network_interface`, or those variables already set
in the environment, override the choice. No Ray here: `cadist.train.driver` runs it on each
worker through Ray Train's torch backend.
"""

from __future__ import annotations

import ipaddress
import os
import socket

IFNAME_VARS = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")


def interface_of(ip: str) -> str | None:
    """The name of the local interface that holds address `ip`, or None."""
    import psutil

    for name, addrs in psutil.net_if_addrs().items():
        if any(a.family in (socket.AF_INET, socket.AF_INET6) and a.address.split("%")[0] == ip
               for a in addrs):  # fmt: skip
            return name
    return None


def hostname_is_loopback() -> bool:
    """Whether this machine's hostname resolves to a loopback address (what gloo would use)."""
    try:
        return ipaddress.ip_address(socket.gethostbyname(socket.gethostname())).is_loopback
    except (OSError, ValueError):
        return False


def choose_interface(node_ip: str, configured: str | None, several_nodes: bool) -> dict:
    """Set the process group's interface for this worker; returns {"interface", "how",
    "warning"}. `configured`: `cluster.network_interface`; `several_nodes`: the group spans
    more than one node (only then does a loopback hostname matter)."""
    given = next((os.environ[v] for v in IFNAME_VARS if os.environ.get(v)), None)
    if given:
        return {"interface": given, "how": "environment", "warning": None}
    name, how = (configured, "cluster.network_interface") if configured else (
        interface_of(node_ip), f"the interface of the Ray node IP {node_ip}")  # fmt: skip
    warning = None
    if name:
        for var in IFNAME_VARS:
            os.environ[var] = name
    elif several_nodes and hostname_is_loopback():
        warning = (
            f"{socket.gethostname()}: the hostname resolves to a loopback address and no local "
            f"interface holds the Ray node IP {node_ip}, so the workers' process group would "
            f"announce 127.0.0.1 to the other nodes; set cluster.network_interface (e.g. eth0), "
            f"or map the hostname to this node's address in /etc/hosts"
        )
    return {"interface": name, "how": how, "warning": warning}
