"""`llamacluster ssh [NODE] [-- CMD]`: a shell, or one command with a terminal, on a node."""

from __future__ import annotations

import os
from pathlib import Path

import typer
from typer.core import TyperCommand

from cluster.cli.app import app
from cluster.cli.options import cluster_name, ips_option, local_option, name_option


class _KeepsRawArgs(TyperCommand):
    """Remembers the raw arguments: `ssh -- CMD` (no NODE) must not take CMD's first word as
    the node, and the parser forgets where `--` was."""

    def parse_args(self, ctx, args):
        ctx.meta["raw_args"] = list(args)
        return super().parse_args(ctx, args)


def split_node_and_command(
    raw: list[str], node: str | None, command: list[str]
) -> tuple[str | None, list[str]]:
    """(node, command) as meant: a value the parser took as NODE from after `--` is the
    command's first word."""
    if node is not None and "--" in raw and node not in raw[: raw.index("--")]:
        return None, [node, *command]
    return node, command


@app.command("ssh", cls=_KeepsRawArgs)
def ssh(
    ctx: typer.Context,
    node: str | None = typer.Argument(
        None, help="Node: index in the inventory (0 = head), head/workerN, host or address."
    ),
    command: list[str] | None = typer.Argument(
        None, help="After --: a command to run there with a terminal."
    ),
    name: str | None = name_option(),
    ips: Path | None = ips_option(),
    local: bool = local_option(),
) -> None:
    """Open a shell on a node (the head by default) with the cluster's SSH key and options."""
    from cluster.node_shell import shell_argv
    from cluster.runner import shell_join

    node, command = split_node_and_command(ctx.meta.get("raw_args", []), node, command or [])
    text = None
    if command:
        text = command[0] if len(command) == 1 else shell_join(command)
    argv = shell_argv(cluster_name(name, ips, local), node, command=text)
    # Replace this process: ssh owns the terminal, signals and the exit code from here on.
    os.execvp(argv[0], argv)
