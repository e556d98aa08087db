"""Many nodes at once: run one command on every runner in parallel, report every failure
together, and print the live output prefixed by node."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor

from cluster.errors import NodesFailedError
from cluster.inventory import Node
from cluster.runner.base import Command, LineSink, OutputLine, Result, Runner
from cluster.runner.ssh import ssh_failure_hint


class _Printer:
    """Prints output lines prefixed by node label, one whole line at a time from any thread."""

    def __init__(self, console=None) -> None:
        from rich.console import Console

        self.console = console or Console(highlight=False, soft_wrap=True, emoji=False)
        self.lock = threading.Lock()

    def __call__(self, line: OutputLine) -> None:
        from rich.text import Text

        text = Text(f"[{line.node}] ", style="bold cyan")
        text.append(line.text, style="yellow" if line.stream == "stderr" else "")
        with self.lock:
            self.console.print(text)


def prefixed_printer(console=None) -> LineSink:
    """A LineSink that prints ``[node] line`` as lines arrive (the familiar ``runall`` view)."""
    return _Printer(console)


def run_on_nodes(
    runners: Iterable[Runner],
    cmd: Command | Callable[[Node], Command],
    *,
    parallel: bool = True,
    timeout: float | None = None,
    env: Mapping[str, str] | None = None,
    stdin: bytes | str | None = None,
    on_line: LineSink | None = None,
    check: bool = True,
    what: str = "command",
) -> dict[Node, Result]:
    """Run ``cmd`` (or ``cmd(node)`` per node) on every runner's node and return every Result.

    With ``check``, raises one NodesFailedError that lists EVERY failed node with its exit code
    and stderr tail (after all nodes finished), never only the first.
    """
    runners = list(runners)

    def one(runner: Runner) -> Result:
        command = cmd(runner.node) if callable(cmd) else cmd
        return runner.run(command, timeout=timeout, env=env, stdin=stdin, on_line=on_line)

    if parallel and len(runners) > 1:
        with ThreadPoolExecutor(max_workers=min(32, len(runners))) as pool:
            results = list(pool.map(one, runners))
    else:
        results = [one(r) for r in runners]
    by_node = {r.node: res for r, res in zip(runners, results, strict=True)}
    if check:
        raise_for_failures(by_node, what=what)
    return by_node


def raise_for_failures(results: Mapping[Node, Result], *, what: str = "command") -> None:
    """Raise one NodesFailedError naming every failed node in ``results`` (none failed: no-op)."""
    failed = [res for res in results.values() if not res.ok]
    if not failed:
        return
    hints = {h for h in (ssh_failure_hint(r) for r in failed) if h}
    hint = "; ".join(sorted(hints)) if hints else None
    raise NodesFailedError([r.failure() for r in failed], total=len(results), what=what, hint=hint)
