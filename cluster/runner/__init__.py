"""Run commands on nodes: one Runner interface (local and OpenSSH siblings) and parallel fan-out.

- ``base``: the transport-neutral core (Command, Result, OutputLine, LineSink, quoting, Runner).
- ``local``: LocalRunner, this machine.
- ``ssh``: SSHConfig, ``ssh_argv``/``ssh_options``, SSHRunner, ssh failure hints, ``runner_for``.
- ``fanout``: ``run_on_nodes``, ``raise_for_failures``, ``prefixed_printer``.

Import from ``cluster.runner``; the modules are how it is laid out, not separate interfaces.
"""

from __future__ import annotations

from cluster.runner.base import (
    Command,
    LineSink,
    OutputLine,
    Result,
    Runner,
    Stdin,
    command_string,
    shell_join,
)
from cluster.runner.fanout import prefixed_printer, raise_for_failures, run_on_nodes
from cluster.runner.local import LocalRunner
from cluster.runner.ssh import (
    SSHConfig,
    SSHRunner,
    default_control_dir,
    runner_for,
    ssh_argv,
    ssh_failure_hint,
    ssh_options,
)

__all__ = [
    "Command",
    "LineSink",
    "LocalRunner",
    "OutputLine",
    "Result",
    "Runner",
    "SSHConfig",
    "SSHRunner",
    "Stdin",
    "command_string",
    "default_control_dir",
    "prefixed_printer",
    "raise_for_failures",
    "run_on_nodes",
    "runner_for",
    "shell_join",
    "ssh_argv",
    "ssh_failure_hint",
    "ssh_options",
]
