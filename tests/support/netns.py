"""Test hosts with network stacks of their own: one Linux network namespace per node.

Loopback "nodes" (127.0.0.2, 127.0.0.3) share one `lo` and one /dev/shm, so per-node interface
counters and shared-memory transports cannot tell them apart. Here each node is a network
namespace joined to a bridge on this host (a /24 in 198.18.0.0/15, the range set aside for
network tests), with its own `eth0`, its own sshd on port 22 and its own /dev/shm; files and
processes stay visible host-wide. The controller (the test process) stays in the host's own
namespace and reaches the nodes over the bridge, as it would reach real machines.

Needs root (network namespaces, a bridge, a tmpfs per node) and iproute2.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import random
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from cluster.runner import SSHConfig
from tests.support.sshd import launch_sshd, make_keys, stop_process_tree

SSH_PORT = 22  # each namespace has a port space of its own
IFACE = "eth0"
# Every node gets a /dev/shm of its own, as separate machines have (Ray's object store and
# vLLM's shared-memory transports must not find each other's segments).
_OWN_SHM = 'mount -t tmpfs -o mode=1777,size=50% tmpfs /dev/shm && exec "$@"'


def _ip(*args: str) -> str:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


def _free_subnet() -> int:
    """N such that 198.18.N.0/24 is on no interface or route of this host."""
    used = _ip("-o", "-4", "addr", "show") + _ip("-4", "route", "show")
    candidates = list(range(1, 255))
    random.shuffle(candidates)
    for n in candidates:
        if f"198.18.{n}." not in used:
            return n
    raise RuntimeError("no free /24 in 198.18.0.0/16 on this host")


@dataclass
class NetnsHosts:
    """Running namespace nodes: their addresses (head first), names, and the keys reaching
    their sshd as ``user``."""

    tag: str
    addresses: tuple[str, ...] = ()
    namespaces: tuple[str, ...] = ()
    gateway: str = ""
    bridge: str = ""
    user: str = field(default_factory=getpass.getuser)
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="lc-netns-")))
    client_key: Path | None = None
    sshd: list[subprocess.Popen] = field(default_factory=list)
    stopped: bool = False

    @property
    def port(self) -> int:
        """The SSH port of every node."""
        return SSH_PORT

    def inventory_text(self) -> str:
        """A deploy/ips.txt for these nodes, head first."""
        lines = [f"{self.user}@{a}:{SSH_PORT}" for a in self.addresses]
        return "\n".join([lines[0] + "   # head", *lines[1:]]) + "\n"

    def ssh_config(self) -> SSHConfig:
        """Client settings with a known_hosts file and a ControlMaster directory of their own
        (short: unix socket paths are limited to about 100 bytes)."""
        fresh = Path(tempfile.mkdtemp(prefix="c", dir=self.workdir))
        return SSHConfig(known_hosts_file=fresh / "known_hosts", control_dir=fresh / "cm")

    def run_in(self, index: int, *cmd: str) -> str:
        """Run ``cmd`` inside node ``index``'s namespace and return its stdout."""
        done = subprocess.run(
            ["ip", "netns", "exec", self.namespaces[index], *cmd],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        )
        return done.stdout

    def stop(self) -> None:
        """Stop every process left in these namespaces (all started by this fixture or by the
        cluster on them), then remove the namespaces and the bridge; safe to repeat."""
        if self.stopped:
            return
        self.stopped = True
        for proc in self.sshd:
            if proc.poll() is None:
                stop_process_tree(proc)
        for ns in self.namespaces:
            for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 2.0)):
                pids = self._pids(ns)
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, sig)
                deadline = time.monotonic() + grace
                while pids and time.monotonic() < deadline:
                    time.sleep(0.1)
                    pids = self._pids(ns)
            with contextlib.suppress(RuntimeError):
                _ip("netns", "del", ns)
        if self.bridge:
            with contextlib.suppress(RuntimeError):
                _ip("link", "del", self.bridge)
        shutil.rmtree(self.workdir, ignore_errors=True)

    @staticmethod
    def _pids(ns: str) -> list[int]:
        with contextlib.suppress(RuntimeError):
            return [int(p) for p in _ip("netns", "pids", ns).split()]
        return []


def start_netns_hosts(count: int = 2) -> NetnsHosts:
    """Create ``count`` namespace nodes on a fresh bridge, each with its own sshd and /dev/shm."""
    tag = f"{os.getpid() % 10000:04d}{random.randrange(256):02x}"
    hosts = NetnsHosts(tag=tag)
    try:
        n = _free_subnet()
        hosts.bridge, hosts.gateway = f"lcb{tag}", f"198.18.{n}.1"
        _ip("link", "add", hosts.bridge, "type", "bridge")
        _ip("addr", "add", f"{hosts.gateway}/24", "dev", hosts.bridge)
        _ip("link", "set", hosts.bridge, "up")
        namespaces, addresses = [], []
        for i in range(count):
            ns, veth, addr = f"lc{tag}n{i}", f"lc{tag}v{i}", f"198.18.{n}.{i + 2}"
            _ip("netns", "add", ns)
            namespaces.append(ns)
            hosts.namespaces = tuple(namespaces)  # recorded at once: stop() removes it
            _ip("link", "add", veth, "type", "veth", "peer", "name", IFACE, "netns", ns)
            _ip("link", "set", veth, "master", hosts.bridge, "up")
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", IFACE)
            _ip("-n", ns, "link", "set", IFACE, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "route", "add", "default", "via", hosts.gateway)
            addresses.append(addr)
        hosts.addresses = tuple(addresses)
        _, hosts.client_key, _ = make_keys(hosts.workdir)
        for ns, addr in zip(namespaces, addresses, strict=True):
            launcher = ("ip", "netns", "exec", ns, "sh", "-c", _OWN_SHM, "sh")
            hosts.sshd.append(
                launch_sshd(
                    hosts.workdir, addresses=(addr,), port=SSH_PORT, name=ns, launcher=launcher
                )
            )
    except BaseException:
        hosts.stop()
        raise
    return hosts
