"""Run a Python snippet in a fresh interpreter (a process of its own, as a replica or a node
program is) and read the JSON line it ends with."""

from __future__ import annotations

import json
import subprocess
import sys
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
