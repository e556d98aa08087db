"""A real OpenSSH server on loopback addresses (127.0.0.2, 127.0.0.3) for the runner tests."""

from __future__ import annotations

import contextlib
import getpass
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from cluster.inventory import Cluster, Node
from cluster.runner import SSHConfig, SSHRunner

SSHD_BIN = Path("/usr/sbin/sshd")
ADDRESSES = ("127.0.0.2", "127.0.0.3")

_SSHD_CONFIG = """\
{listen}HostKey {host_key}
PidFile {pid_file}
AuthorizedKeysFile {authorized_keys}
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
StrictModes no
UsePAM no
AcceptEnv none
PrintMotd no
LogLevel ERROR
Subsystem sftp internal-sftp
"""


@dataclass
class SSHServer:
    """A running sshd: the addresses and port it listens on, and the keys that reach it."""

    port: int
    addresses: tuple[str, ...]
    user: str
    client_key: Path
    host_public_key: str
    workdir: Path
    process: subprocess.Popen

    def node(self, address: str = ADDRESSES[0], *, index: int = 0, port: int | None = None) -> Node:
        """An inventory node reaching this server on ``address`` with the test key."""
        return Node(
            index=index,
            host=address,
            user=self.user,
            port=port if port is not None else self.port,
            identity_file=self.client_key,
        )

    def cluster(self) -> Cluster:
        """Both loopback addresses as a two-node cluster (head 127.0.0.2)."""
        return Cluster(nodes=tuple(self.node(a, index=i) for i, a in enumerate(self.addresses)))

    def ssh_config(
        self,
        *,
        known_hosts: Path | None = None,
        strict: bool = False,
        multiplex: bool = True,
        **overrides,
    ) -> SSHConfig:
        """Client settings with a fresh known_hosts and a fresh, short ControlMaster directory,
        so no test reuses another test's master connection or learned keys."""
        fresh = Path(tempfile.mkdtemp(prefix="c", dir=self.workdir))
        return SSHConfig(
            known_hosts_file=known_hosts or fresh / "known_hosts",
            strict_host_keys=strict,
            multiplex=multiplex,
            control_dir=fresh / "cm",
            connect_timeout=5,
            **{"retry_backoff_s": 0.2, **overrides},
        )

    def runners(self, config: SSHConfig | None = None) -> list[SSHRunner]:
        """One SSHRunner per address, sharing ``config``."""
        config = config or self.ssh_config()
        return [SSHRunner(n, config) for n in self.cluster()]


def _free_port(addresses: tuple[str, ...]) -> int:
    """A port free on every address right now (sshd binds it a moment later)."""
    for _ in range(50):
        with socket.socket() as first:
            first.bind((addresses[0], 0))
            port = first.getsockname()[1]
            others = []
            try:
                for addr in addresses[1:]:
                    s = socket.socket()
                    others.append(s)
                    s.bind((addr, port))
                return port
            except OSError:
                continue
            finally:
                for s in others:
                    s.close()
    raise RuntimeError("no free port on the loopback addresses")


def _descendants(pid: int) -> list[int]:
    """All descendants of ``pid`` (sshd's per-connection children run in their own sessions)."""
    table = subprocess.run(
        ["ps", "-eo", "pid=,ppid="], capture_output=True, text=True, check=True
    ).stdout.split()
    children: dict[int, list[int]] = {}
    for child, parent in zip(table[::2], table[1::2], strict=True):
        children.setdefault(int(parent), []).append(int(child))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _alive(pid: int, proc: subprocess.Popen) -> bool:
    if pid == proc.pid:
        return proc.poll() is None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def stop_process_tree(proc: subprocess.Popen) -> None:
    """Stop exactly ``proc`` and its descendants: TERM, a short wait, then KILL what is left."""
    pids = [*_descendants(proc.pid), proc.pid]
    for sig, grace in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 0.0)):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(_alive(p, proc) for p in pids):
            time.sleep(0.05)
        pids = [p for p in pids if _alive(p, proc)]
        if not pids:
            break
    proc.wait(timeout=5)


def _keygen(path: Path, comment: str) -> None:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
        check=True,
        stdin=subprocess.DEVNULL,
    )


def _wait_listening(
    proc: subprocess.Popen, addresses: tuple[str, ...], port: int, log: Path
) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"sshd exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            for addr in addresses:
                with socket.create_connection((addr, port), timeout=1):
                    pass
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"sshd did not listen on port {port} within 15 s")


def make_keys(workdir: Path) -> tuple[Path, Path, Path]:
    """A host key, a client key and an authorized_keys file holding the client key."""
    host_key = workdir / "host_ed25519"
    client_key = workdir / "client_ed25519"
    _keygen(host_key, "llamacluster-test-host")
    _keygen(client_key, "llamacluster-test-client")
    authorized = workdir / "authorized_keys"
    shutil.copy(client_key.with_suffix(".pub"), authorized)
    with contextlib.suppress(PermissionError):  # sshd's privilege separation directory
        Path("/run/sshd").mkdir(parents=True, exist_ok=True)
    return host_key, client_key, authorized


def launch_sshd(
    workdir: Path,
    *,
    addresses: tuple[str, ...],
    port: int,
    name: str = "sshd",
    launcher: tuple[str, ...] = (),
) -> subprocess.Popen:
    """Start ``sshd -D`` on ``addresses``:``port`` with the keys of ``make_keys(workdir)``,
    through ``launcher`` (a command prefix such as ``ip netns exec NS``); returns once it
    listens on every address. Config, pid file and log are ``workdir/<name>.*``."""
    config = workdir / f"{name}_config"
    config.write_text(
        _SSHD_CONFIG.format(
            listen="".join(f"ListenAddress {a}:{port}\n" for a in addresses),
            host_key=workdir / "host_ed25519",
            pid_file=workdir / f"{name}.pid",
            authorized_keys=workdir / "authorized_keys",
        )
    )
    log = workdir / f"{name}.log"
    with log.open("ab") as log_file:
        proc = subprocess.Popen(
            [*launcher, str(SSHD_BIN), "-D", "-e", "-f", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
        )
    try:
        _wait_listening(proc, addresses, port, log)
    except BaseException:
        if proc.poll() is None:
            stop_process_tree(proc)
        raise
    return proc


def start_sshd(workdir: Path) -> SSHServer:
    """Start ``sshd -D`` on 127.0.0.2 and 127.0.0.3 with a temp config, host key and client
    key under ``workdir``."""
    host_key, client_key, _ = make_keys(workdir)
    last_error: Exception | None = None
    for _ in range(3):  # the free port may be taken between probing and sshd binding it
        port = _free_port(ADDRESSES)
        try:
            proc = launch_sshd(workdir, addresses=ADDRESSES, port=port)
        except RuntimeError as exc:
            last_error = exc
            continue
        return SSHServer(
            port=port,
            addresses=ADDRESSES,
            user=getpass.getuser(),
            client_key=client_key,
            host_public_key=host_key.with_suffix(".pub").read_text().strip(),
            workdir=workdir,
            process=proc,
        )
    raise RuntimeError(f"could not start sshd: {last_error}")
