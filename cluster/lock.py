"""One operator at a time: an exclusive lock per cluster on the controller.

`up`, `down` and `download` on one cluster take ``<cluster dir>/lock`` (flock, 0600) for as long
as they run; a second caller gets one line naming the holder (host, pid, command, since when) or,
with ``--wait``, queues behind it. The kernel drops a flock when its process dies, so a crashed
`up` never leaves the cluster locked.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from cluster.errors import ConfigError
from cluster.state import cluster_dir, ensure_private_dir

LOCK_FILE = "lock"


class ClusterBusyError(ConfigError):
    """Another operator holds the cluster (exit code 3, like other input the user can fix)."""


def _holder(path: Path) -> dict[str, object]:
    try:
        data = json.loads(path.read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def describe_holder(holder: dict[str, object]) -> str:
    """```up` (pid 123 on host, since 12:00:01, 42 s)`` from a lock file's record."""
    if not holder:
        return "another process"
    since = float(holder.get("since", 0) or 0)
    age = f", {time.time() - since:.0f} s" if since else ""
    when = time.strftime("%H:%M:%S", time.localtime(since)) if since else "?"
    return (
        f"`{holder.get('command', '?')}` (pid {holder.get('pid', '?')} on "
        f"{holder.get('host', '?')}, since {when}{age})"
    )


@contextlib.contextmanager
def cluster_lock(name: str, command: str, *, wait: bool = False, on_wait=None) -> Iterator[Path]:
    """Hold cluster ``name``'s lock while the block runs, as ``command`` (what the holder is
    doing, shown to whoever waits). Without ``wait`` a held lock raises ClusterBusyError at once;
    with it, ``on_wait(line)`` is called once and the call blocks until the lock is free."""
    directory = ensure_private_dir(cluster_dir(name))
    path = directory / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = describe_holder(_holder(path))
            if not wait:
                raise ClusterBusyError(
                    f"cluster {name!r} is busy: {holder} holds it",
                    hint="wait until it ends, or pass --wait to queue behind it",
                ) from None
            if on_wait is not None:
                on_wait(f"cluster {name!r} is busy: {holder}; waiting for it (--wait)")
            fcntl.flock(fd, fcntl.LOCK_EX)
        record = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "command": command,
            "since": time.time(),
            "argv": " ".join(sys.argv[1:])[:200],
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        try:
            yield path
        finally:
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # releases the flock
