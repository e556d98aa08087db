"""The transport-neutral core of running commands on a node: the Command, Result and OutputLine
types, command quoting, and the Runner base that every transport (local, OpenSSH) builds on."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shlex
import subprocess
import tarfile
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, NamedTuple

from cluster.errors import ConfigError, NodeFailure, NodesFailedError
from cluster.inventory import Node

# The package's name ("cluster.runner"), as before the split into modules.
log = logging.getLogger(__package__)

Command = str | Sequence[str]
"""A shell string (run by bash on the node) or an argv list (quoted by ``shell_join``)."""

Stdin = bytes | str | IO[bytes] | None

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Remote `timeout` sends TERM at the deadline and KILL this long after, so nothing lingers.
_KILL_AFTER_S = 5
# The node's own `timeout` is a backstop for a lost connection: it fires this much after the
# runner's deadline, so the runner (which kills and reports) normally acts first.
_REMOTE_MARGIN_S = 2.0
# After the process exits, how long to wait for its output pipes to close.
_DRAIN_S = 5.0


def shell_join(argv: Sequence[str | os.PathLike[str] | int]) -> str:
    """Quote an argv list for a POSIX shell. The one place commands are quoted."""
    return shlex.join([os.fspath(a) if isinstance(a, os.PathLike) else str(a) for a in argv])


def command_string(cmd: Command) -> str:
    """The shell text of a command: a string as given, an argv list quoted by ``shell_join``."""
    if isinstance(cmd, str):
        return cmd
    if not cmd:
        raise ValueError("empty command")
    return shell_join(cmd)


class OutputLine(NamedTuple):
    """One line of live output: which node, ``stdout`` or ``stderr``, and the text (no newline)."""

    node: str
    stream: str
    text: str


LineSink = Callable[[OutputLine], None]


@dataclass(frozen=True)
class Result:
    """The outcome of one command on one node.

    ``command`` is the command text only: environment values (secrets) are never part of it.
    """

    node: str
    command: str
    returncode: int
    stdout: str
    stderr: str
    duration_s: float
    timed_out: bool = False
    connection_failed: bool = False
    attempts: int = 1

    @property
    def ok(self) -> bool:
        """True when the command ran to the end and exited 0."""
        return self.returncode == 0 and not self.timed_out

    def tail(self, n: int = 10, *, stream: str = "stderr") -> str:
        """The last ``n`` non-empty lines of ``stderr`` (or ``stdout``), for error messages."""
        text = self.stderr if stream == "stderr" else self.stdout
        lines = [line for line in text.splitlines() if line.strip()]
        return "\n".join(lines[-n:])

    def failure(self) -> NodeFailure:
        """The structured description of this result for a NodesFailedError."""
        return NodeFailure(
            self.node,
            command=self.command,
            returncode=self.returncode,
            stderr_tail=self.tail(5) or self.tail(5, stream="stdout"),
            timed_out=self.timed_out,
            connection_failed=self.connection_failed,
        )

    def check(self, *, what: str = "command", hint: str | None = None) -> Result:
        """Return self when ok, else raise NodesFailedError naming this node."""
        if not self.ok:
            raise NodesFailedError([self.failure()], total=1, what=what, hint=hint)
        return self


def _script(command: str, env: Mapping[str, str] | None, timeout: float | None) -> bytes:
    """The line fed to ``bash -s`` on the node: exports (kept off every command line) and the
    command, exec'd in a fresh bash (under ``timeout`` when one is given).

    bash reads a script from a pipe one byte at a time, so whatever follows this line on stdin is
    left for the command itself.
    """
    parts: list[str] = []
    for key, value in (env or {}).items():
        if not _ENV_NAME.match(key):
            raise ConfigError(f"bad environment variable name {key!r}", hint="use [A-Za-z_0-9]")
        parts.append(shell_join(["export", f"{key}={value}"]))
    inner = ["bash", "-c", command]
    if timeout is not None:
        limit = timeout + _REMOTE_MARGIN_S
        inner = ["timeout", f"--kill-after={_KILL_AFTER_S}", f"{limit:.3f}", *inner]
    parts.append("exec " + shell_join(inner))
    return ("; ".join(parts) + "\n").encode()


def _feed(pipe: IO[bytes], script: bytes, stdin: Stdin) -> None:
    """Write the script and then the caller's stdin into the process, then close its stdin."""
    try:
        pipe.write(script)
        if isinstance(stdin, str):
            pipe.write(stdin.encode())
        elif isinstance(stdin, bytes):
            pipe.write(stdin)
        elif stdin is not None:
            while chunk := stdin.read(1 << 16):
                pipe.write(chunk)
    except (BrokenPipeError, OSError, ValueError):
        pass  # the process ended early; its exit code tells why
    finally:
        with contextlib.suppress(OSError):
            pipe.close()


def _pump(pipe: IO[bytes], sink: list[bytes], emit: Callable[[str], None] | None) -> None:
    for raw in iter(pipe.readline, b""):
        sink.append(raw)
        if emit is not None:
            try:
                emit(raw.decode("utf-8", "replace").rstrip("\r\n"))
            except Exception:
                # A broken display must not stop the reading: the pipe would fill and the
                # command would hang. Keep collecting without live output.
                log.exception("live output callback failed; continuing without it")
                emit = None


class Runner(ABC):
    """Runs commands on one node. Everything above the transport is written against this."""

    node: Node

    @property
    def label(self) -> str:
        """The node's display label (prefix of its output lines, key of error listings)."""
        return self.node.label

    @abstractmethod
    def _argv(self) -> list[str]:
        """The local argv that starts ``bash -s`` on the node."""

    def _classify(self, returncode: int, stdout: str, stderr: str) -> tuple[bool, bool]:
        """(connection_failed, worth_retrying) for a finished attempt; local runs never fail so."""
        return False, False

    def _popen_kwargs(self) -> dict:
        return {}

    def _kill(self, proc: subprocess.Popen) -> None:
        proc.kill()

    def run(
        self,
        cmd: Command,
        *,
        timeout: float | None = None,
        env: Mapping[str, str] | None = None,
        stdin: Stdin = None,
        on_line: LineSink | None = None,
    ) -> Result:
        """Run ``cmd`` on the node with bash and return its Result (never raises for a failure).

        ``env`` values travel on stdin, never on a command line (``ps``) or in logs. A ``timeout``
        kills the command (here and on the node) and marks the Result ``timed_out``. Connection
        failures (not failures of the command) are retried by runners that can have them.
        """
        command = command_string(cmd)
        script = _script(command, env, timeout)
        log.debug("%s: run %s (env: %s)", self.label, command, ", ".join(env or {}) or "-")
        start = time.monotonic()
        attempt = 0
        while True:
            attempt += 1
            # The timeout covers all attempts together.
            left = None if timeout is None else max(0.0, timeout - (time.monotonic() - start))
            result = self._attempt(command, script, left, stdin, on_line, start, attempt, timeout)
            retry = self._retry_delay(result, attempt, stdin)
            if retry is None or (left is not None and retry >= left):
                return result
            log.debug("%s: connection failed, retrying in %.1f s", self.label, retry)
            time.sleep(retry)

    def _retry_delay(self, result: Result, attempt: int, stdin: Stdin) -> float | None:
        return None

    def _attempt(
        self,
        command: str,
        script: bytes,
        timeout: float | None,
        stdin: Stdin,
        on_line: LineSink | None,
        start: float,
        attempt: int,
        full_timeout: float | None,
    ) -> Result:
        proc = subprocess.Popen(
            self._argv(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            **self._popen_kwargs(),
        )
        out: list[bytes] = []
        err: list[bytes] = []

        def emitter(stream: str) -> Callable[[str], None] | None:
            if on_line is None:
                return None
            return lambda text: on_line(OutputLine(self.label, stream, text))

        threads = [
            threading.Thread(target=_feed, args=(proc.stdin, script, stdin), daemon=True),
            threading.Thread(target=_pump, args=(proc.stdout, out, emitter("stdout")), daemon=True),
            threading.Thread(target=_pump, args=(proc.stderr, err, emitter("stderr")), daemon=True),
        ]
        for t in threads:
            t.start()
        timed_out = False
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            self._kill(proc)
            proc.wait()
        except BaseException:
            self._kill(proc)
            proc.wait()
            raise
        for t, pipe in zip(threads[1:], (proc.stdout, proc.stderr), strict=True):
            t.join(_DRAIN_S)
            if not t.is_alive():
                pipe.close()
        stdout = b"".join(out).decode("utf-8", "replace")
        stderr = b"".join(err).decode("utf-8", "replace")
        returncode = proc.returncode
        if (
            not timed_out
            and returncode == 124
            and full_timeout is not None
            and time.monotonic() - start >= full_timeout
        ):
            timed_out = True  # the node's backstop fired first (this process woke up late)
        if timed_out:
            returncode = 124
            stderr += f"\n[llamacluster] timed out after {full_timeout:g} s and was killed\n"
        failed, _ = (False, False) if timed_out else self._classify(returncode, stdout, stderr)
        return Result(
            node=self.label,
            command=command,
            returncode=returncode,
            stdout=stdout,
            stderr=stderr,
            duration_s=time.monotonic() - start,
            timed_out=timed_out,
            connection_failed=failed,
            attempts=attempt,
        )

    def copy_to(
        self,
        local: str | os.PathLike[str],
        remote: str,
        *,
        mode: int | None = None,
        timeout: float | None = None,
        check: bool = True,
    ) -> Result:
        """Copy a local file or directory to ``remote`` on the node, over the runner's own
        transport (so SSH options, keys and multiplexing are the same as for commands).

        A file is written to a temp name with a restrictive umask, given ``mode`` (default: the
        local file's mode) and renamed into place, so a secret is never readable by others and
        never half-written. A directory's contents are unpacked into ``remote`` (created if
        needed); copying again overwrites, so it is safe to repeat. ``~/`` at the start of
        ``remote`` means the node user's home.
        """
        src = Path(local)
        if not src.exists():
            raise ConfigError(f"cannot copy {src}: no such file or directory")
        target = _remote_path(remote.rstrip("/") or "/")
        if src.is_dir():
            command = f"mkdir -p -- {target} && tar -x --no-same-owner -f - -C {target}"
            read_end, write_end = os.pipe()
            writer = threading.Thread(target=_write_tar, args=(src, write_end), daemon=True)
            writer.start()
            with os.fdopen(read_end, "rb") as stream:
                result = self.run(command, stdin=stream, timeout=timeout)
            writer.join(_DRAIN_S)
        else:
            perm = mode if mode is not None else src.stat().st_mode & 0o777
            tmp = f"{target}.llamacluster-tmp"
            command = (
                f'umask 077 && mkdir -p -- "$(dirname -- {target})" && cat > {tmp} && '
                f"chmod {perm:o} {tmp} && mv -f -- {tmp} {target}"
            )
            with src.open("rb") as stream:
                result = self.run(command, stdin=stream, timeout=timeout)
        result = replace(result, command=f"copy {src} -> {remote}")
        if check:
            result.check(what=f"copying {src} to {remote}")
        return result


def _remote_path(path: str) -> str:
    """Shell text for a path on the node; a leading ``~/`` stays the node user's home."""
    if path == "~":
        return '"$HOME"'
    if path.startswith("~/"):
        return '"$HOME"/' + shell_join([path[2:]])
    return shell_join([path])


def _write_tar(src: Path, fd: int) -> None:
    """Stream ``src``'s contents as a tar archive into ``fd`` (closes it)."""
    try:
        with os.fdopen(fd, "wb") as out, tarfile.open(fileobj=out, mode="w|") as tar:
            for child in sorted(src.iterdir()):
                tar.add(child, arcname=child.name)
    except (BrokenPipeError, OSError):
        pass  # the receiving side stopped; its Result says why
