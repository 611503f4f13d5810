"""Hosts that share nothing but a network, made on one machine (root): each host is a network
namespace with its own address on a private bridge, a UTS namespace with its own hostname (which
its own /etc/hosts resolves to that address, as on a real machine) and a mount namespace with
private tmpfs on /dev/shm, /tmp and its working directory, and a PID namespace (a host sees
only its own processes, as Ray's search for local clusters does). The project and its venv stay
reachable (bind-mounted back where they lie under /tmp).

    with Hosts(["head", "node", "store"]) as hosts:
        hosts["head"].run(["ray", "start", "--head", ...])

Teardown ends every process of each namespace by PID (`ip netns pids`) and deletes the
namespaces, also after a failure; namespaces an earlier crash left behind (prefix `cdh-`) are
removed first. Nothing here builds a shell command from data: every command is an argument list.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

PREFIX = "cdh-"  # every namespace the harness makes
ROOT = Path("/srv/cadist-hosts")  # working directories (a private tmpfs inside each host)
PROJECT = Path(__file__).resolve().parents[2]


def available() -> str | None:
    """None where hosts can be made here; else why not (the reason a test is skipped with)."""
    if os.geteuid() != 0:
        return "making network and mount namespaces needs root"
    for tool in ("ip", "unshare", "nsenter"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed"
    return None


def _ip(*args: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    cmd = ["ip", *(["-n", ns] if ns else []), *args]
    return subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=30)


def _namespaces() -> list[str]:
    out = _ip("netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _kill_namespace(ns: str) -> None:
    """End every process in `ns` (SIGKILL, by PID) and delete it."""
    for _ in range(20):
        pids = _ip("netns", "pids", ns, check=False).stdout.split()
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        time.sleep(0.1)
    _ip("netns", "del", ns, check=False)


def clean_leftovers() -> list[str]:
    """Remove the namespaces (and working directories) an earlier run left behind."""
    gone = [ns for ns in _namespaces() if ns.startswith(PREFIX)]
    for ns in gone:
        _kill_namespace(ns)
    shutil.rmtree(ROOT, ignore_errors=True)
    return gone


def _free_subnet() -> ipaddress.IPv4Network:
    """A 10.213.x.0/24 no interface of this machine (or of any namespace) uses."""
    used = _ip("-o", "-4", "addr", check=False).stdout
    for ns in _namespaces():
        used += _ip("-o", "-4", "addr", ns=ns, check=False).stdout
    for x in range(1, 255):
        net = ipaddress.ip_network(f"10.213.{x}.0/24")
        if f" 10.213.{x}." not in used:
            return net
    raise RuntimeError("no free 10.213.x.0/24 subnet")


class Host:
    """One host: `run` a command there (waits), `start` one (returns the Popen)."""

    def __init__(self, name: str, ns: str, ip: str, workdir: Path):
        self.name, self.ns, self.ip, self.workdir = name, ns, ip, workdir
        self.pid: int | None = None  # the namespace's init (a `sleep infinity`)
        self.env = {
            "PATH": f"{Path(sys.executable).parent}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": str(workdir),
            "PYTHONPATH": str(PROJECT),
            "DS_ACCELERATOR": "cpu",
            "LANG": "C.UTF-8",
        }

    def _enter(self, args: list[str], env: dict | None) -> list[str]:
        full = self.env | (env or {})
        return ["nsenter", "-t", str(self.pid), "-m", "-u", "-n", "-p", "--", "env", "-i",
                *(f"{k}={v}" for k, v in full.items()), *args]  # fmt: skip

    def run(self, args: list[str], env: dict | None = None, timeout: float = 300,
            cwd: Path | None = None, check: bool = True) -> subprocess.CompletedProcess:  # fmt: skip
        cmd = self._enter(
            ["sh", "-c", 'cd "$0" && exec "$@"', str(cwd or self.workdir), *args], env
        )
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(
                f"{self.name}: {' '.join(args)} exited {r.returncode}\n"
                f"{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
            )
        return r

    def start(self, args: list[str], log: Path, env: dict | None = None,
              cwd: Path | None = None) -> subprocess.Popen:  # fmt: skip
        cmd = self._enter(
            ["sh", "-c", 'cd "$0" && exec "$@"', str(cwd or self.workdir), *args], env
        )
        with open(log, "ab") as out:
            return subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )

    def set_link(self, up: bool) -> None:
        """Plug or unplug this host's cable at the switch (its processes and address stay)."""
        switch, peer = self.link
        _ip("link", "set", peer, "up" if up else "down", ns=switch)

    def kill_all(self) -> None:
        """Every process of this host but its init: as the machine dying (the namespace stays)."""
        for pid in _ip("netns", "pids", self.ns, check=False).stdout.split():
            if int(pid) != self.pid:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def files(self) -> list[str]:
        """The files under this host's working directory (seen from inside it)."""
        r = self.run(["find", str(self.workdir), "-type", "f"], check=False)
        return sorted(r.stdout.split())


class Hosts:
    """N hosts on one bridge (a switch namespace); a context manager that tears all down."""

    def __init__(self, names: list[str], loopback_names: tuple[str, ...] = (),
                 shared: tuple[Path, ...] = (), mapped_names: bool = False):  # fmt: skip
        """`loopback_names`: hosts whose /etc/hosts maps their own name to 127.0.1.1, as Debian
        and many cloud images and containers do (the others resolve it to its address).
        `shared`: folders every host sees where they lie (bind-mounted back under its private
        /tmp), e.g. one the test reads the hosts' results from. `mapped_names`: /etc/hosts also
        names each IPv4-mapped IPv6 address (::ffff:IP), as a DNS server would answer: the hosts
        reach none, so that reverse lookup (torch's c10d makes it of each peer) would fail
        "temporarily" and torch warn about it on every start."""
        reason = available()
        if reason:
            raise RuntimeError(reason)
        self.names, self.loopback_names = names, loopback_names
        self.shared = tuple(Path(p).resolve() for p in shared)
        self.mapped_names = mapped_names
        self.tag = uuid.uuid4().hex[:4]
        self.switch = f"{PREFIX}{self.tag}-sw"
        self.hosts: dict[str, Host] = {}

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    def __enter__(self) -> Hosts:
        clean_leftovers()
        try:
            self._make()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _make(self) -> None:
        net = _free_subnet()
        _ip("netns", "add", self.switch)
        _ip("link", "add", "br0", "type", "bridge", ns=self.switch)
        _ip("link", "set", "br0", "up", ns=self.switch)
        addrs = {n: str(net.network_address + i + 1) for i, n in enumerate(self.names)}
        hosts_file = "127.0.0.1 localhost\n" + "".join(
            f"{ip} {n}\n" for n, ip in addrs.items()
        )  # fmt: skip
        for i, name in enumerate(self.names):
            ns = f"{PREFIX}{self.tag}-{name}"[:15]
            workdir = ROOT / self.tag / name
            workdir.mkdir(parents=True)
            etc_hosts = ROOT / self.tag / f"{name}.hosts"
            own = f"127.0.1.1 {name}\n" if name in self.loopback_names else ""
            lines = [ln for ln in hosts_file.splitlines() if not (own and ln.endswith(f" {name}"))]
            lines += [own.strip()] if own else []
            lines += [f"::ffff:{ln}" for ln in lines] if self.mapped_names else []
            etc_hosts.write_text("".join(ln + "\n" for ln in lines))
            _ip("netns", "add", ns)
            peer = f"{PREFIX}{self.tag}{i}"[:15]
            _ip("link", "add", peer, "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip("link", "set", peer, "netns", self.switch)
            _ip("link", "set", peer, "master", "br0", "up", ns=self.switch)
            _ip("addr", "add", f"{addrs[name]}/{net.prefixlen}", "dev", "eth0", ns=ns)
            _ip("link", "set", "eth0", "up", ns=ns)
            _ip("link", "set", "lo", "up", ns=ns)
            host = Host(name, ns, addrs[name], workdir)
            host.link = (self.switch, peer)  # its cable, at the switch
            host.pid = self._init(ns, name, workdir, etc_hosts, self.shared)
            self.hosts[name] = host

    @staticmethod
    def _init(ns: str, name: str, workdir: Path, etc_hosts: Path, shared: tuple[Path, ...]) -> int:
        """The host's init: a private mount + UTS namespace set up, then `sleep infinity`."""
        mounts = sorted({PROJECT, Path(sys.prefix).resolve(), *shared})  # parents first
        keep = [p for p in mounts if str(p).startswith("/tmp/")]
        # the mounts, as an argument list per step (no data in a shell string)
        steps = [["hostname", name], ["mount", "-t", "tmpfs", "tmpfs", "/dev/shm"]]
        stash = Path("/run") / f"{ns}-keep"
        for k, path in enumerate(keep):  # what must stay reachable under /tmp
            steps += [
                ["mkdir", "-p", f"{stash}/{k}"],
                ["mount", "--bind", str(path), f"{stash}/{k}"],
            ]
        steps += [["mount", "-t", "tmpfs", "tmpfs", "/tmp"]]
        for k, path in enumerate(keep):
            steps += [["mkdir", "-p", str(path)], ["mount", "--bind", f"{stash}/{k}", str(path)]]
        steps += [["mount", "--bind", str(etc_hosts), "/etc/hosts"],
                  ["mount", "-t", "tmpfs", "tmpfs", str(workdir)]]  # fmt: skip
        runner = (
            "import json, os, subprocess, sys\n"
            "steps = json.loads(sys.argv[1])\n"
            "for s in steps:\n"
            "    subprocess.run(s, check=True)\n"
            "os.execvp('sleep', ['sleep', 'infinity'])\n"
        )
        proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, "unshare", "--mount", "--uts", "--pid", "--fork",
             "--mount-proc", "--propagation", "private",
             sys.executable, "-c", runner, json.dumps(steps)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            pids = _ip("netns", "pids", ns, check=False).stdout.split()
            if proc.poll() is not None:
                raise RuntimeError(
                    f"host {name}: setup failed: {proc.stderr.read().decode()[-2000:]}"
                )
            for pid in pids:
                try:
                    if Path(f"/proc/{pid}/comm").read_text().strip() == "sleep":
                        return int(pid)
                except OSError:
                    pass
            time.sleep(0.05)
        raise RuntimeError(f"host {name}: its init did not start")

    def close(self) -> None:
        for host in self.hosts.values():
            _kill_namespace(host.ns)
        for ns in _namespaces():  # also those made before a failure
            if ns.startswith(f"{PREFIX}{self.tag}"):
                _kill_namespace(ns)
        _kill_namespace(self.switch)
        shutil.rmtree(ROOT / self.tag, ignore_errors=True)
        for p in Path("/run").glob(f"{PREFIX}{self.tag}*-keep"):
            shutil.rmtree(p, ignore_errors=True)


@contextlib.contextmanager
def own_host(name: str, shared: tuple[Path, ...]):
    """One host of its own (`Hosts([name], shared=shared, mapped_names=True)`) for a test whose
    commands start a local Ray, so that it cannot meet another test's: yields its Host, or None
    where hosts cannot be made (the commands then run here)."""
    if available() is not None:
        yield None
        return
    with Hosts([name], shared=shared, mapped_names=True) as hosts:
        yield hosts[name]


def run_on(host: Host | None, args: list[str], cwd: Path, timeout: float,
           env: dict | None = None) -> subprocess.CompletedProcess:  # fmt: skip
    """`args` in `cwd` on `host` (an `own_host`), or here where it is None (with `env`, else this
    process's environment); either way it passes this process's torch thread count on."""
    if host is None:
        return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=timeout)  # fmt: skip
    threads = {k: os.environ[k] for k in ("OMP_NUM_THREADS",) if k in os.environ}
    return host.run(args, env=threads, cwd=cwd, timeout=timeout, check=False)
