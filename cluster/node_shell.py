"""A shell (or one command with a terminal) on a node of a recorded cluster, for a person."""

from __future__ import annotations

import os

from cluster.inventory import Node
from cluster.recorded import RecordedCluster


def pick_node(name: str, selector: str | None = None) -> Node:
    """The node of cluster ``name`` that ``selector`` names (index in the inventory, 0 being
    the head; ``head``/``workerN``; host, label or private address); the head by default."""
    return RecordedCluster.load(name).pick_node(selector)


def shell_argv(name: str, selector: str | None = None, *, command: str | None = None) -> list[str]:
    """The argv that opens a login shell (or runs ``command`` with a terminal) on a node.

    SSH uses the runner's own options, key and known-hosts policy (``ssh_argv``), without
    BatchMode so a person may answer prompts, and without a shared master connection, like the
    tunnel. A node of a ``--local`` cluster is this machine: the shell runs here directly.
    """
    from cluster.runner import ssh_argv

    recorded = RecordedCluster.load(name)
    node = recorded.pick_node(selector)
    if node.local:
        shell = os.environ.get("SHELL") or "bash"
        return [shell, "-c", command] if command is not None else [shell, "-l"]
    return ssh_argv(
        node,
        recorded.ssh_config(multiplex=False),
        batch=False,
        extra_args=["-t"] if command is not None else [],
        remote_command=command,
    )
