"""A shell (or one command with a terminal) on a node of a recorded cluster, for a person."""

from __future__ import annotations

import os
from dataclasses import replace

from cluster.errors import ConfigError
from cluster.inventory import Node


def pick_node(name: str, selector: str | None = None) -> Node:
    """The node of cluster ``name`` that ``selector`` names (index in the inventory, 0 being
    the head; ``head``/``workerN``; host, label or private address); the head by default."""
    from cluster.lifecycle import cluster_of
    from cluster.state import load_state

    cluster = cluster_of(load_state(name))
    if selector is None:
        return cluster.head
    picked = cluster.select([selector])
    if len(picked) > 1:
        choices = ", ".join(f"{n.index}: {n.name} ({n.label})" for n in picked)
        raise ConfigError(
            f"{selector!r} matches {len(picked)} nodes", hint=f"name one of: {choices}"
        )
    return picked[0]


def shell_argv(name: str, selector: str | None = None, *, command: str | None = None) -> list[str]:
    """The argv that opens a login shell (or runs ``command`` with a terminal) on a node.

    SSH uses the runner's own options, key and known-hosts policy (``ssh_argv``), without
    BatchMode so a person may answer prompts, and without a shared master connection, like the
    tunnel. A node of a ``--local`` cluster is this machine: the shell runs here directly.
    """
    from cluster.lifecycle import _ssh_config
    from cluster.runner import ssh_argv
    from cluster.state import load_state

    state = load_state(name)
    node = pick_node(name, selector)
    if node.local:
        shell = os.environ.get("SHELL") or "bash"
        return [shell, "-c", command] if command is not None else [shell, "-l"]
    return ssh_argv(
        node,
        replace(_ssh_config(state), multiplex=False),
        batch=False,
        extra_args=["-t"] if command is not None else [],
        remote_command=command,
    )
