"""The runner for this machine: the same bash-on-stdin contract as SSH, without a network."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess

from cluster.inventory import Node, local_cluster
from cluster.runner.base import Runner


class LocalRunner(Runner):
    """Runs commands on this machine with the same bash-on-stdin contract as SSH.

    ``node`` defaults to a local node of 127.0.0.1; give one from the inventory (``--local``)
    or a loopback address to stand for one of several "nodes" on this host.
    """

    def __init__(self, node: Node | None = None) -> None:
        self.node = node if node is not None else local_cluster().head

    def _argv(self) -> list[str]:
        return ["bash", "-s"]

    def _popen_kwargs(self) -> dict:
        # Own session: a timeout kills the whole command tree, and Ctrl-C goes to us, not to it.
        return {"start_new_session": True}

    def _kill(self, proc: subprocess.Popen) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)

    def __repr__(self) -> str:
        return f"LocalRunner({self.label})"
