"""Programs a node runs as ``python3 - ARGS`` with their source on stdin: nothing to install.

Such a module (cluster/fscache.py, cluster/supervisor.py, cluster/promctl.py) imports only the
standard library at its top, since the node has only its text; its controller-side helpers call
these two functions lazily.
"""

from __future__ import annotations

import shlex


def stdin_command(*args: str, python: str = "python3", sudo: str = "") -> str:
    """The shell command that runs a module whose source comes on stdin, with ``args``."""
    prefix = f"{sudo} " if sudo else ""
    return f"{prefix}{python} - " + " ".join(shlex.quote(a) for a in args)


def source_of(path: str) -> str:
    """The source text of the module file at ``path`` (what goes on stdin)."""
    with open(path, encoding="utf-8") as fh:
        return fh.read()
