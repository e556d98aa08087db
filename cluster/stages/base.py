"""The stage framework of `up`: named, skippable, idempotent stages run in order over a context."""

from __future__ import annotations

import os
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from rich.console import Console
from rich.markup import escape
from rich.text import Text

from cluster.errors import LlamaclusterError
from cluster.inventory import Cluster, Node
from cluster.runner import (
    Command,
    OutputLine,
    Result,
    Runner,
    command_string,
    prefixed_printer,
    run_on_nodes,
)
from cluster.stages.config import UpConfig
from cluster.state import SECTION_OWNERS, ClusterState, NodeState, StageResult, StageStatus


class StageFailed(LlamaclusterError):
    """A stage of `up` failed: names the stage, keeps the cause's exit code, points at the log."""


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
        self.console = console or Console(highlight=False, soft_wrap=True, emoji=False)
        self.verbose = verbose
        self._lines = prefixed_printer(self.console) if verbose else None
        self.log_path: Path | None = None
        self._log: RunLog | None = None

    def open_log(self, path: Path, secrets: Sequence[str] = ()) -> Path:
        """Write everything of this run (every command per node, its output, every message) to
        ``path`` (0600) as well, with ``secrets`` masked; the person's output stays as it is."""
        self._log = RunLog(path, secrets)
        self.log_path = path
        return path

    def close_log(self) -> None:
        """Flush and close the run log (kept on disk)."""
        if self._log is not None:
            self._log.close()
            self._log = None

    def _to_log(self, text: str) -> None:
        if self._log is not None:
            self._log.write(text)

    @property
    def on_line(self):
        """Live output sink for the runner: the run log always, the terminal with -v."""
        if self._log is None:
            return self._lines
        log, lines = self._log, self._lines

        def sink(line: OutputLine) -> None:
            log.write(f"[{line.node}] {'! ' if line.stream == 'stderr' else ''}{line.text}")
            if lines is not None:
                lines(line)

        return sink

    def stage(self, name: str, title: str) -> None:
        """A stage starts."""
        self._to_log(f"== {name}: {title}")
        self.console.print(f"[bold]▸ {name}[/]: {title}")

    def node(self, node: str, message: str, *, ok: bool = True) -> None:
        """One node's result inside a stage."""
        mark = "[green]✓[/]" if ok else "[red]✗[/]"
        self._to_log(f"  {'ok' if ok else 'FAILED'} {node} {message}")
        # Node-supplied text (host names, OS strings, error tails) is shown, never read as markup.
        self.console.print(f"    {mark} [cyan]{escape(node)}[/] {escape(message)}")

    def info(self, message: str, *, style: str | None = None) -> None:
        """A line inside a stage (``message`` is plain text, shown in ``style`` when given)."""
        self._to_log(f"  {message}")
        text = escape(message)
        self.console.print(f"    [{style}]{text}[/]" if style else f"    {text}")

    def warn(self, message: str) -> None:
        """Something the person should know but that does not stop `up` (plain text)."""
        self._to_log(f"  warning: {message}")
        self.console.print(f"    [yellow]warning:[/] {escape(message)}")

    def command(self, node: str, command: str) -> None:
        """A command about to run: in the run log always, on the terminal with -v (shown as it
        is: brackets in it are not markup)."""
        self._to_log(f"{node}$ {command}")
        if self.verbose:
            self.console.print(f"    [dim]{escape(node)}$ {escape(command)}[/]")

    def outcome(self, name: str, outcome: StageOutcome, seconds: float) -> None:
        """A stage ended."""
        style, word = self._STYLE[outcome.status], self._WORD[outcome.status]
        self._to_log(f"  -> {word} ({seconds:.1f} s) {outcome.message}")
        self.console.print(
            f"  [{style}]{word}[/] ({seconds:.1f} s)"
            f"{': ' + escape(outcome.message) if outcome.message else ''}"
        )

    def print(self, text: str = "") -> None:
        """Plain output (summaries, the ready block): never folded at the console's width, so
        a URL, a path or a fingerprint stays whole on its line (copied as printed)."""
        self._to_log(Text.from_markup(text).plain if "[" in text else text)
        self.console.print(text, soft_wrap=True, emoji=False)


class RunLog:
    """One run's log file on the controller: timestamped lines, secrets masked, 0600."""

    def __init__(self, path: Path, secrets: Sequence[str] = ()) -> None:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.fchmod(fd, 0o600)
        self._fh = os.fdopen(fd, "w", encoding="utf-8", buffering=1)
        self._secrets = [x for x in secrets if x and len(x) >= 8]
        self._lock = threading.Lock()

    def mask(self, text: str) -> str:
        """``text`` with every secret value replaced by ``***``."""
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def write(self, text: str) -> None:
        """Append ``text`` (one or more lines), each line stamped with the time."""
        stamp = time.strftime("%H:%M:%S")
        body = "".join(f"{stamp} {line}\n" for line in self.mask(text).splitlines() or [""])
        with self._lock:
            if not self._fh.closed:
                self._fh.write(body)

    def close(self) -> None:
        """Close the file."""
        with self._lock:
            self._fh.close()


def run_log_path(directory: Path, command: str) -> Path:
    """``<cluster dir>/logs/<YYYYmmdd-HHMMSS>-<command>.log``: one file per run."""
    return directory / "logs" / f"{time.strftime('%Y%m%d-%H%M%S')}-{command}.log"


@dataclass
class StageCheck:
    """What a stage's ``check`` found: ``ok`` True (as `up` left it), False (broken: the message
    says what), None (nothing of this stage to check: skipped, not set up)."""

    ok: bool | None
    message: str
    per_node: dict[str, str] = field(default_factory=dict)


@dataclass
class ClusterContext:
    """A recorded cluster at work (`down`, `status`, and `up` through UpContext): nodes, their
    runners, the state, the output."""

    cluster: Cluster
    state: ClusterState
    runners: list[Runner]
    reporter: Reporter

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
        for r in picked:
            self.reporter.command(r.label, command_string(cmd(r.node) if callable(cmd) else cmd))
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


@dataclass
class UpContext(ClusterContext):
    """What a stage of `up` needs: a ClusterContext and the config `up` was given."""

    config: UpConfig = field(default_factory=lambda: UpConfig(local=True))
    #: Values stages hand to later ones in the same run.
    scratch: dict[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class Teardown:
    """What `down` asks of every stage's ``teardown``."""

    purge: bool = False
    drain_timeout: float = 30.0
    #: Nodes (labels) where a teardown step could not be confirmed; stages append to it, and
    #: `down --purge` keeps the cluster's state while it is not empty (unless --force).
    failed: list[str] = field(default_factory=list)


class Stage(ABC):
    """One named step of `up`: ``run`` brings its part of the cluster to the wanted state (and
    says "unchanged" when it already was), ``check`` reports on it for `status`, ``teardown``
    undoes it for `down` (stages run in reverse there). ``plan`` and ``skip_reason`` are pure.

    A stage writes only its own section of the state (``section``; SECTION_OWNERS), which
    run_stages enforces.
    """

    name: ClassVar[str]
    title: ClassVar[str]
    #: The state sections this stage writes (none: it records nothing).
    sections: ClassVar[tuple[str, ...]] = ()

    def skip_reason(self, ctx: UpContext) -> str | None:
        """Why this stage does not apply to this cluster (e.g. --local), or None."""
        return None

    def check(self, ctx: ClusterContext) -> StageCheck:
        """This stage's part of a running cluster, checked live (for `status`)."""
        return StageCheck(None, "nothing to check")

    def teardown(self, ctx: ClusterContext, how: Teardown) -> str | None:
        """Undo what ``run`` did, as far as `down` (or `down --purge`) should; a line saying
        what was done, or None when there was nothing to undo."""
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
        before = ctx.state.sections()
        try:
            outcome = StageOutcome("skipped", reason) if reason else stage.run(ctx)
            _check_ownership(stage, before, ctx.state.sections())
        except Exception as exc:
            seconds = time.monotonic() - started
            message = (
                exc.message
                if isinstance(exc, LlamaclusterError)
                else f"{type(exc).__name__}: {exc}"
            )
            ctx.state.stages[stage.name] = StageResult(
                status="failed", message=message, seconds=seconds
            )
            ctx.state.save()
            ctx.reporter.outcome(stage.name, StageOutcome("failed", message), seconds)
            hint = exc.hint if isinstance(exc, LlamaclusterError) else None
            hint = (hint + "; then " if hint else "fix that, then ") + (
                "rerun the same `llamacluster up` (finished stages are kept)"
            )
            if ctx.reporter.log_path is not None:
                hint += f"; full log: {ctx.reporter.log_path}"
            wrapped = StageFailed(f"up failed in stage '{stage.name}': {message}", hint=hint)
            wrapped.exit_code = getattr(exc, "exit_code", 1)
            raise wrapped from exc
        seconds = time.monotonic() - started
        ctx.reporter.outcome(stage.name, outcome, seconds)
        result = StageResult(status=outcome.status, message=outcome.message, seconds=seconds)
        results[stage.name] = result
        ctx.state.stages[stage.name] = result
        ctx.state.save()
    return results


class SectionOwnershipError(LlamaclusterError):
    """A stage wrote a section of the state that another stage owns (a bug in llamacluster)."""


def _check_ownership(stage: Stage, before: dict, after: dict) -> None:
    """Raise when ``stage`` changed a section it does not own."""
    foreign = [
        name for name in before if before[name] != after[name] and name not in stage.sections
    ]
    if foreign:
        owners = ", ".join(f"{n} (owned by {SECTION_OWNERS[n]})" for n in foreign)
        raise SectionOwnershipError(f"stage '{stage.name}' wrote the state's {owners}")


def print_plan(ctx: UpContext, stages: Sequence[Stage]) -> dict[str, dict[str, list[str]]]:
    """``--dry-run``: print every stage's commands per node (running nothing) and return them."""
    plans: dict[str, dict[str, list[str]]] = {}
    for stage in stages:
        reason = "--skip " + stage.name if stage.name in ctx.config.skip else stage.skip_reason(ctx)
        ctx.reporter.stage(stage.name, stage.title)
        if reason:
            ctx.reporter.info(f"skipped: {reason}", style="dim")
            plans[stage.name] = {}
            continue
        plan = stage.plan(ctx)
        plans[stage.name] = plan
        for label, commands in plan.items():
            for command in commands:
                ctx.reporter.console.print(f"    {label}$ {command}", markup=False)
    return plans
