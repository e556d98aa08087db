"""What the kernel lets a process do with its CPU priority, found by trying it in a child.

A process's capability mask does not answer this: root in a user namespace shows every
capability in ``CapEff`` and is still refused (EPERM), and a container without CAP_SYS_ADMIN
is held to one autogroup write per 100 ms, host-wide (EAGAIN). The child runs in a session of
its own, so what it raises is its own autogroup and nothing of the caller's.
"""

from __future__ import annotations

import subprocess
import sys

_TRY = r"""
import errno, os, sys, time
nice, mode = int(sys.argv[1]), sys.argv[2]
if mode == "thread":
    try:
        os.setpriority(os.PRIO_PROCESS, 0, nice)
    except OSError:
        sys.exit(1)
    sys.exit(0)
for _ in range(20):  # the rate limit lets one write through every 100 ms
    fd = os.open("/proc/self/autogroup", os.O_WRONLY)
    try:
        os.write(fd, str(nice).encode())
        sys.exit(0)
    except OSError as exc:
        if exc.errno != errno.EAGAIN:
            sys.exit(1)
    finally:
        os.close(fd)
    time.sleep(0.11)
sys.exit(2)
"""


def kernel_lets_raise(nice: int, mode: str, prefix: tuple[str, ...] = ()) -> bool:
    """Whether a process (run under ``prefix``, e.g. a ``setpriv`` command) may lower its
    autogroup's (``mode="autogroup"``) or its thread's (``mode="thread"``) nice to ``nice``."""
    child = subprocess.run([*prefix, sys.executable, "-c", _TRY, str(nice), mode],
                           start_new_session=True, timeout=30, check=False)  # fmt: skip
    if child.returncode == 2:
        raise RuntimeError("the kernel's autogroup rate limit answered EAGAIN for 2 s")
    return child.returncode == 0
