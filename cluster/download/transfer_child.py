"""One hf_transfer download in its own process (hf_transfer holds the GIL for the whole transfer).

Run by path (not ``-m``, so no package import): reads one JSON object on stdin (url, filename,
headers, max_files, chunk_size, parallel_failures, max_retries) and prints the running byte count
as one decimal number per line, at most a few times a second. Headers (the token) come on stdin,
never on the command line.
"""

from __future__ import annotations

import json
import sys
import time


def _die_with_parent(parent_pid: int | None) -> None:
    """Linux: get SIGKILL when the node program dies, so no orphan keeps downloading."""
    import os
    import signal

    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(1)  # the parent was already gone before the signal was armed


def main() -> int:
    """Download one URL to one file with hf_transfer; exit 0, or 1 with the error on stderr."""
    job = json.loads(sys.stdin.read())
    _die_with_parent(job.get("parent_pid"))
    import hf_transfer

    done = 0
    last = 0.0

    def on_bytes(n: int) -> None:
        nonlocal done, last
        done += n
        now = time.monotonic()
        if now - last >= 0.2:
            last = now
            sys.stdout.write(f"{done}\n")
            sys.stdout.flush()

    try:
        hf_transfer.download(
            url=job["url"],
            filename=job["filename"],
            max_files=job["max_files"],
            chunk_size=job["chunk_size"],
            parallel_failures=job["parallel_failures"],
            max_retries=job["max_retries"],
            headers=job["headers"],
            callback=on_bytes,
        )
    except Exception as exc:
        sys.stderr.write(f"{type(exc).__name__}: {exc}\n")
        return 1
    sys.stdout.write(f"{done}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
