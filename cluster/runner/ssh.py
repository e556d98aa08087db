"""The OpenSSH transport: SSHConfig, the ``ssh`` options and argv (known-hosts policy,
ControlMaster directory), SSHRunner, reading ssh's failures, and ``runner_for``."""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cluster.errors import ConfigError
from cluster.inventory import Node
from cluster.runner.base import Result, Runner, Stdin
from cluster.runner.local import LocalRunner


@dataclass(frozen=True)
class SSHConfig:
    """How the controller talks SSH to the nodes; flags fill it, runners share it."""

    connect_timeout: int = 10
    config_file: Path | None = None
    strict_host_keys: bool = False
    known_hosts_file: Path | None = None
    multiplex: bool = True
    control_dir: Path | None = None
    control_persist: str = "60s"
    server_alive_interval: int = 15
    server_alive_count_max: int = 4
    connect_retries: int = 2
    retry_backoff_s: float = 1.0
    extra_options: tuple[tuple[str, str], ...] = field(default_factory=tuple)


def default_control_dir() -> Path:
    """A per-user 0700 directory for ControlMaster sockets (short path: sockets are limited)."""
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    return Path(base) / f"llamacluster-ssh-{os.getuid()}"


def _ensure_private_dir(path: Path) -> Path:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.stat()
    if st.st_uid != os.getuid():
        raise ConfigError(
            f"SSH control directory {path} belongs to another user",
            hint="remove it or set XDG_RUNTIME_DIR to a directory of your own",
        )
    if st.st_mode & 0o077:
        path.chmod(0o700)
    return path


def ssh_options(node: Node, config: SSHConfig) -> dict[str, str]:
    """The ``-o`` options for ``node``, as data; each one is there for the reason beside it."""
    opts: dict[str, str] = {
        # Never prompt (password, passphrase, unknown host): a prompt hangs a parallel run.
        "BatchMode": "yes",
        # A dead or firewalled node fails in seconds instead of the kernel's minutes.
        "ConnectTimeout": str(config.connect_timeout),
        # Notice a node that vanished mid-command (no RST) after interval x count seconds.
        "ServerAliveInterval": str(config.server_alive_interval),
        "ServerAliveCountMax": str(config.server_alive_count_max),
        # accept-new learns fresh nodes on first contact yet refuses a changed key (a possible
        # impostor); `yes` accepts only hosts already in known_hosts.
        "StrictHostKeyChecking": "yes" if config.strict_host_keys else "accept-new",
        # Keep ssh's own chatter ("Permanently added ...") out of the command's stderr; real
        # errors (refused, changed host key, denied) are still printed.
        "LogLevel": "ERROR",
    }
    if config.known_hosts_file is not None:
        # A separate known_hosts (tests, throwaway clusters) instead of ~/.ssh/known_hosts.
        opts["UserKnownHostsFile"] = str(config.known_hosts_file)
    if config.multiplex:
        control_dir = _ensure_private_dir(config.control_dir or default_control_dir())
        # One TCP and key exchange per node, reused by the many short commands of a bring-up;
        # %C hashes host, port and user so the socket path stays short and unique.
        opts["ControlMaster"] = "auto"
        opts["ControlPath"] = str(control_dir / "%C")
        opts["ControlPersist"] = config.control_persist
    if node.identity_file is not None:
        # Offer only the given key: an agent holding many keys trips the server's MaxAuthTries.
        opts["IdentitiesOnly"] = "yes"
    opts.update(dict(config.extra_options))
    return opts


def ssh_argv(
    node: Node,
    config: SSHConfig | None = None,
    *,
    batch: bool = True,
    extra_args: Sequence[str] = (),
    remote_command: str | None = None,
) -> list[str]:
    """The ``ssh`` argv for ``node`` with the project's options; ``-i``/``-p``/``-l`` only when
    set, so ``~/.ssh/config`` keeps deciding the rest. ``batch=False`` is for a person at a
    terminal (``llamacluster ssh``/``tunnel``): prompts are then allowed.
    """
    config = config or SSHConfig()
    opts = ssh_options(node, config)
    if not batch:
        opts.pop("BatchMode")
    argv = ["ssh"]
    if config.config_file is not None:
        argv += ["-F", str(config.config_file)]
    for key, value in opts.items():
        argv += ["-o", f"{key}={value}"]
    if node.identity_file is not None:
        argv += ["-i", str(node.identity_file)]
    if node.port is not None:
        argv += ["-p", str(node.port)]
    if node.user is not None:
        argv += ["-l", node.user]
    argv += list(extra_args)
    argv += ["--", node.host]
    if remote_command is not None:
        argv.append(remote_command)
    return argv


# What ssh prints when it cannot get a session for a reason a second try can fix (a node still
# booting, a transient network error).
_SSH_TRANSIENT = (
    "Connection refused",
    "Connection timed out",
    "Connection reset",
    "Connection closed by",
    "kex_exchange_identification",
    "banner exchange",
    "Network is unreachable",
    "No route to host",
)
# Everything ssh itself (not the remote command) prints when it cannot get a session.
_SSH_FAILURES = (
    *_SSH_TRANSIENT,
    "ssh: connect to host",
    "ssh: Could not resolve hostname",
    "Host key verification failed",
    "REMOTE HOST IDENTIFICATION HAS CHANGED",
    "Permission denied (",
    "Too many authentication failures",
)


class SSHRunner(Runner):
    """Runs commands on a node through the system ``ssh`` (keys, agent and ~/.ssh/config work)."""

    def __init__(self, node: Node, config: SSHConfig | None = None) -> None:
        self.node = node
        self.config = config or SSHConfig()

    def _argv(self) -> list[str]:
        return ssh_argv(self.node, self.config, extra_args=["-T"], remote_command="bash -s")

    def _classify(self, returncode: int, stdout: str, stderr: str) -> tuple[bool, bool]:
        # 255 is ssh's own failure code; output on stdout means the command did run.
        if returncode != 255 or stdout:
            return False, False
        failed = any(marker in stderr for marker in _SSH_FAILURES)
        return failed, failed and any(marker in stderr for marker in _SSH_TRANSIENT)

    def _retry_delay(self, result: Result, attempt: int, stdin: Stdin) -> float | None:
        if not result.connection_failed or attempt > self.config.connect_retries:
            return None
        _, transient = self._classify(result.returncode, result.stdout, result.stderr)
        # A stream given as stdin was consumed by the first try; bytes and str can be resent.
        if not transient or not (stdin is None or isinstance(stdin, bytes | str)):
            return None
        return self.config.retry_backoff_s * attempt

    def close(self) -> None:
        """Close this node's multiplexed master connection, if one is open."""
        if not self.config.multiplex:
            return
        subprocess.run(
            ssh_argv(self.node, self.config, extra_args=["-O", "exit"]),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            check=False,
            timeout=30,
        )

    def __repr__(self) -> str:
        return f"SSHRunner({self.label})"


def runner_for(node: Node, *, ssh_config: SSHConfig | None = None) -> Runner:
    """The runner for a node: local for a ``--local`` node, OpenSSH otherwise."""
    return LocalRunner(node) if node.local else SSHRunner(node, ssh_config)


def ssh_failure_hint(result: Result) -> str | None:
    """What to do about an SSH failure, read from ssh's own message; None if nothing specific."""
    err = result.stderr
    if "REMOTE HOST IDENTIFICATION HAS CHANGED" in err or "Host key verification failed" in err:
        host = result.node if ":" not in result.node else f"[{result.node.rsplit(':', 1)[0]}]"
        return (
            f"the host key of {result.node} is unknown or changed; if the machine was reinstalled, "
            f"remove the old key with `ssh-keygen -R '{host}'` (add `-f FILE` for a custom "
            "known_hosts) and run again"
        )
    if "Permission denied" in err:
        return "SSH key not accepted: pass --ssh-key / --ssh-user or fix ~/.ssh/config"
    if result.connection_failed:
        return "check that the node is up and sshd listens on that address and port"
    return None
