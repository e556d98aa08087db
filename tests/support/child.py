"""Run a Python snippet in a fresh interpreter (a process of its own, as a replica or a node
program is) and read the JSON line it ends with."""

from __future__ import annotations

import json
import select
import subprocess
import sys
import time
from typing import Any


def child_json(script: str, *args: str, timeout: float = 120) -> Any:
    """``python -c script args...``; it must exit 0; its last stdout line, parsed as JSON."""
    proc = subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def next_json_line(proc: subprocess.Popen, timeout_s: float) -> dict:
    """The next JSON line (starting with "{") a running driver prints on stdout; the driver is
    killed and the test fails with its stderr when none comes within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 1.0)
        if ready:
            line = proc.stdout.readline()
            if not line:
                break
            if line.startswith("{"):
                return json.loads(line)
    proc.kill()
    raise AssertionError(f"driver said nothing in {timeout_s:.0f}s: {proc.stderr.read()[-3000:]}")
