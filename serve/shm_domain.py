"""Which shared memory a process sees: ranks with the same domain can share /dev/shm segments."""

from __future__ import annotations

import os
from pathlib import Path

BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
SHM_DIR = "/dev/shm"


def shm_domain() -> str:
    """``<boot id>:<device of /dev/shm>``: equal for processes of one running kernel that see
    the same /dev/shm mount; different across machines, and across containers or namespaces
    of one machine that mount a /dev/shm of their own."""
    try:
        boot = BOOT_ID.read_text().strip()
    except OSError:
        boot = os.uname().nodename
    try:
        device = os.stat(SHM_DIR).st_dev
    except OSError:
        device = -1
    return f"{boot}:{device}"


if __name__ == "__main__":
    print(shm_domain())
