"""The stage framework of `up`: named, skippable, idempotent stages run in order over a context."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

from rich.console import Console
from rich.markup import escape

from cluster.errors import LlamaclusterError
from cluster.inventory import Cluster, Node
from cluster.runner import Command, Result, Runner, command_string, prefixed_printer, run_on_nodes
from cluster.stages.config import UpConfig
from cluster.state import ClusterState, NodeState, StageResult, StageStatus


@dataclass
class StageOutcome:
    """What a stage did: ``done`` (changed something), ``unchanged`` (already done), ``skipped``."""

    status: StageStatus
    message: str
    per_node: dict[str, str] = field(default_factory=dict)


class Reporter:
    """Per-stage, per-node progress for a person (rich); quiet enough to read, -v shows commands."""

    _STYLE: ClassVar[dict[str, str]] = {
        "done": "green",
        "unchanged": "cyan",
        "skipped": "dim",
        "failed": "bold red",
    }
    _WORD: ClassVar[dict[str, str]] = {
        "done": "done",
        "unchanged": "already done",
        "skipped": "skipped",
        "failed": "FAILED",
    }

    def __init__(self, console: Console | None = None, *, verbose: bool = False) -> None:
        self.console = console or Console(highlight=False, soft_wrap=True)
        self.verbose = verbose
        self._lines = prefixed_printer(self.console) if verbose else None

    @property
    def on_line(self):
        """Live output sink for the runner (only with -v)."""
        return self._lines

    def stage(self, name: str, title: str) -> None:
        """A stage starts."""
        self.console.print(f"[bold]▸ {name}[/]: {title}")

    def node(self, node: str, message: str, *, ok: bool = True) -> None:
        """One node's result inside a stage."""
        mark = "[green]✓[/]" if ok else "[red]✗[/]"
        self.console.print(f"    {mark} [cyan]{node}[/] {message}")

    def info(self, message: str) -> None:
        """A line inside a stage."""
        self.console.print(f"    {message}")

    def warn(self, message: str) -> None:
        """Something the person should know but that does not stop `up`."""
        self.console.print(f"    [yellow]warning:[/] {message}")

    def command(self, node: str, command: str) -> None:
        """A command about to run (-v); shown as it is (brackets in it are not markup)."""
        if self.verbose:
            self.console.print(f"    [dim]{escape(node)}$ {escape(command)}[/]")

    def outcome(self, name: str, outcome: StageOutcome, seconds: float) -> None:
        """A stage ended."""
        style, word = self._STYLE[outcome.status], self._WORD[outcome.status]
        self.console.print(
            f"  [{style}]{word}[/] ({seconds:.1f} s){': ' + outcome.message if outcome.message else ''}"
        )

    def print(self, text: str = "") -> None:
        """Plain output (summaries, the ready block)."""
        self.console.print(text)


@dataclass
class UpContext:
    """Everything a stage needs: the config, the nodes and their runners, the state, the output."""

    config: UpConfig
    cluster: Cluster
    state: ClusterState
    runners: list[Runner]
    reporter: Reporter
    #: Values stages hand to later ones in the same run (e.g. the resolved model directory).
    scratch: dict[str, object] = field(default_factory=dict)

    @property
    def head(self) -> Node:
        """The head node."""
        return self.cluster.head

    @property
    def head_runner(self) -> Runner:
        """The runner of the head node."""
        return self.runners[0]

    def node_state(self, node: Node) -> NodeState:
        """The recorded state of ``node`` (created by preflight)."""
        found = self.state.node(node.name)
        if found is None:
            raise LlamaclusterError(
                f"no preflight record for {node.label}",
                hint="run `llamacluster up` without --skip preflight",
            )
        return found

    def run(
        self,
        cmd: Command | Callable[[Node], Command],
        *,
        what: str,
        nodes: Sequence[Node] | None = None,
        timeout: float | None = 120,
        env: Mapping[str, str] | None = None,
        stdin: bytes | str | None = None,
        check: bool = True,
    ) -> dict[Node, Result]:
        """Run a command on ``nodes`` (default: all) in parallel; one error names every failure."""
        picked = [r for r in self.runners if nodes is None or r.node in nodes]
        if self.reporter.verbose:
            for r in picked:
                self.reporter.command(
                    r.label, command_string(cmd(r.node) if callable(cmd) else cmd)
                )
        return run_on_nodes(
            picked,
            cmd,
            timeout=timeout,
            env=env,
            stdin=stdin,
            on_line=self.reporter.on_line,
            check=check,
            what=what,
        )

    def run_head(self, cmd: Command, *, what: str, **kwargs) -> Result:
        """Run a command on the head only and return its Result."""
        return self.run(cmd, what=what, nodes=[self.head], **kwargs)[self.head]


class Stage(ABC):
    """One named step of `up`. ``run`` must detect "already done" and say so (status unchanged)."""

    name: ClassVar[str]
    title: ClassVar[str]

    def skip_reason(self, ctx: UpContext) -> str | None:
        """Why this stage does not apply to this cluster (e.g. --local), or None."""
        return None

    @abstractmethod
    def plan(self, ctx: UpContext) -> dict[str, list[str]]:
        """The commands this stage would run, per node label (``--dry-run``); built from the same
        snippets ``run`` uses, with placeholders for what only earlier stages find out."""

    @abstractmethod
    def run(self, ctx: UpContext) -> StageOutcome:
        """Bring this stage's part of the cluster to the wanted state."""


def run_stages(ctx: UpContext, stages: Sequence[Stage]) -> dict[str, StageResult]:
    """Run ``stages`` in order, record each result in the state (saved after every stage).

    A failing stage is recorded, the state saved, and its error re-raised with the stage named
    in the message and a next step in the hint.
    """
    results: dict[str, StageResult] = {}
    for stage in stages:
        started = time.monotonic()
        ctx.reporter.stage(stage.name, stage.title)
        reason = "--skip " + stage.name if stage.name in ctx.config.skip else stage.skip_reason(ctx)
        try:
            outcome = StageOutcome("skipped", reason) if reason else stage.run(ctx)
        except LlamaclusterError as exc:
            seconds = time.monotonic() - started
            ctx.state.stages[stage.name] = StageResult(
                status="failed", message=exc.message, seconds=seconds
            )
            ctx.state.save()
            ctx.reporter.outcome(stage.name, StageOutcome("failed", ""), seconds)
            exc.message = f"up failed in stage '{stage.name}': {exc.message}"
            exc.args = (exc.message,)
            exc.hint = (exc.hint + "; then " if exc.hint else "fix that, then ") + (
                "rerun the same `llamacluster up` (finished stages are kept)"
            )
            raise
        seconds = time.monotonic() - started
        ctx.reporter.outcome(stage.name, outcome, seconds)
        result = StageResult(status=outcome.status, message=outcome.message, seconds=seconds)
        results[stage.name] = result
        ctx.state.stages[stage.name] = result
        ctx.state.save()
    return results


def print_plan(ctx: UpContext, stages: Sequence[Stage]) -> dict[str, dict[str, list[str]]]:
    """``--dry-run``: print every stage's commands per node (running nothing) and return them."""
    plans: dict[str, dict[str, list[str]]] = {}
    for stage in stages:
        reason = "--skip " + stage.name if stage.name in ctx.config.skip else stage.skip_reason(ctx)
        ctx.reporter.stage(stage.name, stage.title)
        if reason:
            ctx.reporter.info(f"[dim]skipped: {reason}[/]")
            plans[stage.name] = {}
            continue
        plan = stage.plan(ctx)
        plans[stage.name] = plan
        for label, commands in plan.items():
            for command in commands:
                ctx.reporter.console.print(f"    {label}$ {command}", markup=False)
    return plans
