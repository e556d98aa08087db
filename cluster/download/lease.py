"""One download per model directory: a lease file on the shared filesystem, renewed while it runs.

flock is not reliable on NFS, so the lease is a plain file, ``<dir>/.llamacluster/download/
lease.json``, holding who downloads (host, pid, command), since when and until when. It is taken
with ``link()`` of a fully written temp file (atomic, and refused when the name exists, on NFS
too), renewed by rewriting it through a temp file and ``rename()``, and removed on exit. A lease
whose expiry passed (its holder stopped renewing it), or whose holder is a dead process on the
same host, is taken over.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import time
from collections.abc import Callable
from pathlib import Path

from pydantic import BaseModel, Field, ValidationError

from cluster.download.records import state_dir
from cluster.errors import ConfigError
from cluster.files import atomic_write
from cluster.lock import describe_holder

LEASE_NAME = "lease.json"
DEFAULT_TTL_S = 120.0


class DownloadBusyError(ConfigError):
    """Another download holds the model directory's lease (exit code 3, like the cluster lock)."""


class Lease(BaseModel):
    """Who is downloading into a model directory, and until when the claim holds."""

    id: str = Field(description="Random id of this claim: only its holder renews or removes it.")
    host: str = Field(description="Host name of the process that started the download.")
    pid: int = Field(description="Process id of that process on its host.")
    command: str = Field(description="What it runs, e.g. `download org/model`.")
    since: float = Field(description="Unix time the lease was first taken.")
    expires_at: float = Field(description="Unix time after which anyone may take it over.")
    ttl_s: float = Field(gt=0, description="Seconds each renewal extends the lease by.")

    def describe(self) -> str:
        """```download x` (pid 12 on host, since 12:00:01, 42 s)``, the cluster lock's style."""
        return describe_holder(self.model_dump())


def new_lease(command: str, *, ttl_s: float = DEFAULT_TTL_S, now: float | None = None) -> Lease:
    """A claim for this process (host, pid) running ``command``, valid ``ttl_s`` from now."""
    now = time.time() if now is None else now
    return Lease(
        id=secrets.token_hex(8),
        host=socket.gethostname(),
        pid=os.getpid(),
        command=command,
        since=now,
        expires_at=now + ttl_s,
        ttl_s=ttl_s,
    )


def lease_path(target: Path) -> Path:
    """Where the lease of a model directory lives."""
    return state_dir(Path(target)) / LEASE_NAME


def read_lease(target: Path) -> Lease | None:
    """The current lease, or None when there is none (an unreadable one counts as none)."""
    try:
        return Lease.model_validate_json(lease_path(target).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (ValidationError, json.JSONDecodeError, UnicodeDecodeError, OSError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def is_live(lease: Lease, *, now: float | None = None, host: str | None = None) -> bool:
    """True while the holder may still be at work: not expired, and (on the holder's own host)
    its process still exists. On other hosts only the expiry tells."""
    now = time.time() if now is None else now
    if now >= lease.expires_at:
        return False
    here = socket.gethostname() if host is None else host
    return not (lease.host == here and not _pid_alive(lease.pid))


def busy_error(target: Path, holder: Lease) -> DownloadBusyError:
    """The one line a second download gets: who holds the directory, and the way out."""
    until = time.strftime("%H:%M:%S", time.localtime(holder.expires_at))
    return DownloadBusyError(
        f"{target} is busy: {holder.describe()} is downloading into it (lease until {until}, "
        "renewed while it runs)",
        hint="wait until it ends, or pass --wait to queue behind it",
    )


def _write_temp(target: Path, lease: Lease) -> Path:
    path = lease_path(target)
    tmp = path.with_name(f".{LEASE_NAME}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(lease.model_dump_json() + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    return tmp


def _remove_expired(target: Path, judged: Lease) -> None:
    """Move the expired lease ``judged`` out of the way. If, in between, another process had
    already replaced it with its own live lease, put that one back."""
    path = lease_path(target)
    aside = path.with_name(f".{LEASE_NAME}.expired-{secrets.token_hex(4)}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return  # someone else removed it first
    try:
        moved = Lease.model_validate_json(aside.read_text(encoding="utf-8"))
    except (ValidationError, json.JSONDecodeError, UnicodeDecodeError, OSError):
        moved = None
    if moved is not None and moved.id != judged.id:
        with contextlib.suppress(FileExistsError):
            os.link(aside, path)  # restore the other process's fresh lease
    aside.unlink(missing_ok=True)


def acquire_lease(
    target: Path,
    lease: Lease,
    *,
    wait: bool = False,
    poll_s: float = 2.0,
    on_wait: Callable[[str], None] | None = None,
) -> Lease:
    """Take the lease of ``target`` for ``lease``'s holder; raise DownloadBusyError while another
    live lease exists (with ``wait``: call ``on_wait`` once, then poll until it is free)."""
    target = Path(target)
    state_dir(target).mkdir(parents=True, exist_ok=True)
    told = False
    while True:
        lease = lease.model_copy(update={"expires_at": time.time() + lease.ttl_s})
        tmp = _write_temp(target, lease)
        try:
            os.link(tmp, lease_path(target))  # atomic, and fails if a lease exists (NFS too)
            return lease
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
        current = read_lease(target)
        if current is not None and current.id == lease.id:
            return lease
        if current is None or not is_live(current):
            if current is None:
                # Unreadable (or just removed): judge it by age so a torn file cannot block forever.
                try:
                    age = time.time() - lease_path(target).stat().st_mtime
                except FileNotFoundError:
                    continue
                if age < lease.ttl_s:
                    time.sleep(min(poll_s, 0.2))
                    continue
                lease_path(target).unlink(missing_ok=True)
                continue
            _remove_expired(target, current)
            continue
        if not wait:
            raise busy_error(target, current)
        if on_wait is not None and not told:
            on_wait(f"{busy_error(target, current).message}; waiting for it (--wait)")
            told = True
        time.sleep(poll_s)


def renew_lease(target: Path, lease: Lease) -> Lease | None:
    """Extend our lease by its ttl (temp + rename); None when it is no longer ours (it expired
    and another download took it over)."""
    target = Path(target)
    current = read_lease(target)
    if current is None or current.id != lease.id:
        return None
    renewed = lease.model_copy(update={"expires_at": time.time() + lease.ttl_s})
    atomic_write(lease_path(target), renewed.model_dump_json() + "\n", mode=0o644)
    return renewed


def release_lease(target: Path, lease: Lease) -> bool:
    """Remove our lease (never another holder's); True when it was ours."""
    current = read_lease(Path(target))
    if current is None or current.id != lease.id:
        return False
    lease_path(Path(target)).unlink(missing_ok=True)
    return True
