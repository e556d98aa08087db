"""The load client's share of the CPU when it runs on the machine of the server it measures.

A closed-loop client that waits on the run queue sends its next request late and reads each
token late, and the server looks slower than it is. On Linux with autogroup scheduling
(``kernel.sched_autogroup_enabled=1``) the CPU is shared first between sessions, and a task's
own nice value orders it only among the tasks of its session: a client in one session and a
server's busy processes in another (the Ray daemons and every Ray worker share the session of
``ray start``) are weighed as groups. Measured on a 2-core machine at c=16 (docs/BENCHMARKS.md,
"The load client's share of the CPU"): the client waited 25-30 s of a 40 s load on the run
queue against a Ray Serve replica, 10 s against plain vLLM's API server (a session of its own),
and about 1 s with its group at nice -10 against either.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path

AUTOGROUP_SWITCH = Path("/proc/sys/kernel/sched_autogroup_enabled")
AUTOGROUP_SELF = Path("/proc/self/autogroup")
DEFAULT_NICE = -10
# How the benchmarks record a priority that could not be raised.
NOT_RAISED = "not raised (needs CAP_SYS_NICE; a container may drop it even for root)"
# Without CAP_SYS_ADMIN the kernel takes one autogroup nice write per 100 ms, host-wide, and
# answers EAGAIN to the others; a write is retried this long before it counts as refused.
AUTOGROUP_RETRY_S = 2.0


def autogroup_enabled() -> bool:
    """Whether the kernel shares the CPU between sessions first (autogroup scheduling)."""
    try:
        return AUTOGROUP_SWITCH.read_text().strip() == "1" and AUTOGROUP_SELF.exists()
    except OSError:
        return False


def has_own_autogroup() -> bool:
    """Whether this process's session has an autogroup of its own to raise.

    A session that never left the init process's (a container's first process and the
    children it starts without ``setsid``) sits in the root group: ``/proc/self/autogroup``
    shows nothing and the kernel refuses a write (EINVAL). Its threads are scheduled beside the
    other sessions' groups, each by its own nice value.
    """
    return autogroup_enabled() and autogroup_nice() is not None


def lever() -> str:
    """What :func:`raised_priority` raises here: ``"autogroup"`` (this session's group) or
    ``"thread"`` (the calling thread's nice value: no autogroup scheduling, or a session in
    the root group)."""
    return "autogroup" if has_own_autogroup() else "thread"


def set_autogroup_nice(nice: int, retry_s: float = AUTOGROUP_RETRY_S) -> None:
    """Write this session's autogroup nice value, retrying the kernel's rate limit (EAGAIN).

    Raises OSError when refused (EPERM: no CAP_SYS_NICE in the machine's namespace) or when
    the rate limit still answers after ``retry_s``.
    """
    deadline = time.monotonic() + retry_s
    while True:
        fd = os.open(AUTOGROUP_SELF, os.O_WRONLY)
        try:
            os.write(fd, str(nice).encode())
            return
        except OSError as exc:
            if exc.errno != errno.EAGAIN or time.monotonic() >= deadline:
                raise
        finally:
            os.close(fd)
        time.sleep(0.02)


def autogroup_nice() -> int | None:
    """The nice value of this process's autogroup (``/autogroup-N nice K``), if readable."""
    try:
        match = re.search(r"nice\s+(-?\d+)", AUTOGROUP_SELF.read_text())
    except OSError:
        return None
    return int(match.group(1)) if match else None


@contextlib.contextmanager
def raised_priority(nice: int = DEFAULT_NICE) -> Iterator[str | None]:
    """Run the block with this process's CPU priority raised to ``nice``; restore it after.

    Under autogroup scheduling the session's group is raised (``/proc/self/autogroup``: every
    process of this session, so start the servers in sessions of their own); otherwise, or
    when the session is in the root group (:func:`lever`), the calling thread's nice value
    (threads it starts inside the block inherit it). Needs
    CAP_SYS_NICE in the machine's namespace (root has it unless a container drops it; root in
    a user namespace does not) or a high enough RLIMIT_NICE. Autogroup writes are retried past
    the kernel's rate limit, so blocks back to back are each raised and restored. Yields what
    was raised, or None when it could not be (nothing changed).
    """
    if lever() == "autogroup":
        before = autogroup_nice()
        try:
            set_autogroup_nice(nice)
        except OSError:
            yield None
            return
        try:
            yield f"session autogroup nice {before} -> {nice}"
        finally:
            restore = before if before is not None else 0
            try:
                set_autogroup_nice(restore)
            except OSError as exc:  # the session keeps the raised value: say how to undo it
                print(f"warning: this session's CPU priority stays at autogroup nice {nice} "
                      f"({exc.strerror}); undo with: echo {restore} > /proc/{os.getpid()}/autogroup",
                      file=sys.stderr)  # fmt: skip
        return
    before = os.getpriority(os.PRIO_PROCESS, 0)
    try:
        os.setpriority(os.PRIO_PROCESS, 0, nice)
    except OSError:
        yield None
        return
    try:
        yield f"thread nice {before} -> {nice}"
    finally:
        os.setpriority(os.PRIO_PROCESS, 0, before)
