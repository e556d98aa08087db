"""Cluster-wide download progress: fold the nodes' JSON events into bytes, rate and ETA."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cluster.download.plan import DownloadPlan


@dataclass
class NodeProgress:
    """One node's counters, built only from its events."""

    node: str
    total_bytes: int
    total_files: int
    files_done: int = 0
    skipped_bytes: int = 0
    per_file: dict[str, int] = field(default_factory=dict)
    started_at: float | None = None
    finished_at: float | None = None
    retries: int = 0
    fallbacks: int = 0
    error: str | None = None

    @property
    def done_bytes(self) -> int:
        """Bytes in place: fetched so far plus those already verified by an earlier run."""
        return self.skipped_bytes + sum(self.per_file.values())

    @property
    def fetched_bytes(self) -> int:
        """Bytes moved over the network in this run."""
        return sum(self.per_file.values())


def rate_and_eta(
    *, fetched: int, remaining: int, started_at: float | None, now: float
) -> tuple[float, float | None]:
    """Average bytes/s since the start, and seconds left at that rate (None when unknown)."""
    if started_at is None or now <= started_at or fetched <= 0:
        return 0.0, None
    rate = fetched / (now - started_at)
    return rate, (remaining / rate if remaining > 0 else 0.0)


class ClusterProgress:
    """Aggregates every node's events; pure bookkeeping (the clock is injectable for tests)."""

    def __init__(self, plan: DownloadPlan, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.nodes = {
            a.node: NodeProgress(a.node, total_bytes=a.total_bytes, total_files=len(a.files))
            for a in plan.nodes
        }
        self.started_at: float | None = None

    def apply(self, event: dict[str, Any]) -> None:
        """Fold one event (as a node printed it) into the counters."""
        node = self.nodes.get(str(event.get("node")))
        if node is None or event.get("stage", "download") != "download":
            return  # the warm pass and the manifest are not download progress
        kind = event.get("event")
        now = self.clock()
        if kind == "start":
            node.started_at = now
            if self.started_at is None:
                self.started_at = now
        elif kind == "progress":
            node.per_file[event["path"]] = int(event["done"])
        elif kind == "file_done":
            node.files_done += 1
            if event.get("skipped"):
                node.skipped_bytes += int(event["size"])
                node.per_file.pop(event["path"], None)
            else:
                node.per_file[event["path"]] = int(event["size"])
        elif kind == "retry":
            node.retries += 1
            node.per_file[event["path"]] = 0
        elif kind == "fallback":
            node.fallbacks += 1
            node.per_file[event["path"]] = 0
        elif kind in ("error", "failed"):
            node.error = str(event.get("message"))
        elif kind == "done":
            node.finished_at = now

    def node_rate_eta(self, name: str) -> tuple[float, float | None]:
        """bytes/s and seconds left for one node."""
        n = self.nodes[name]
        end = n.finished_at if n.finished_at is not None else self.clock()
        return rate_and_eta(
            fetched=n.fetched_bytes,
            remaining=n.total_bytes - n.done_bytes,
            started_at=n.started_at,
            now=end,
        )

    def overall(self) -> tuple[int, int, float, float | None]:
        """(bytes done, bytes total, bytes/s, seconds left) for the whole cluster.

        The ETA is the slowest node's: the download ends when the last node does.
        """
        done = sum(n.done_bytes for n in self.nodes.values())
        total = sum(n.total_bytes for n in self.nodes.values())
        fetched = sum(n.fetched_bytes for n in self.nodes.values())
        finished = [n.finished_at for n in self.nodes.values()]
        end = max(finished) if all(f is not None for f in finished) else self.clock()  # type: ignore[type-var]
        rate, _ = rate_and_eta(
            fetched=fetched, remaining=total - done, started_at=self.started_at, now=end
        )
        etas = [self.node_rate_eta(name)[1] for name in self.nodes]
        pending = [
            e for e, n in zip(etas, self.nodes.values(), strict=True) if n.finished_at is None
        ]
        eta = None if any(e is None for e in pending) else max(pending, default=0.0)
        return done, total, rate, eta


def format_bytes(n: float) -> str:
    """1.2 GB style sizes (decimal units, like the hub shows)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def format_eta(seconds: float | None) -> str:
    """h:mm:ss, or '-' when unknown."""
    if seconds is None:
        return "-"
    s = round(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class ProgressView:
    """A rich progress display: one bar per node and one for the cluster, with rate and ETA."""

    def __init__(self, progress: ClusterProgress, *, console: Any = None) -> None:
        from rich.progress import BarColumn, Progress, TextColumn

        self.state = progress
        self.bars = Progress(
            TextColumn("{task.description:<10}"),
            BarColumn(),
            TextColumn("{task.fields[amount]:>21}"),
            TextColumn("{task.fields[rate]:>11}"),
            TextColumn("ETA {task.fields[eta]:>8}"),
            TextColumn("{task.fields[note]}"),
            console=console,
            refresh_per_second=4,
            transient=False,
        )
        self.tasks = {
            name: self.bars.add_task(name, total=max(n.total_bytes, 1), **self._blank())
            for name, n in progress.nodes.items()
        }
        self.all_task = self.bars.add_task("all", total=1, **self._blank())

    @staticmethod
    def _blank() -> dict[str, str]:
        return {"amount": "", "rate": "", "eta": "", "note": ""}

    def refresh(self) -> None:
        """Copy the counters into the bars."""
        for name, task in self.tasks.items():
            n = self.state.nodes[name]
            rate, eta = self.state.node_rate_eta(name)
            note = f"{n.files_done}/{n.total_files} files"
            if n.retries:
                note += f", {n.retries} retries"
            if n.fallbacks:
                note += f", {n.fallbacks} fallbacks"
            if n.error:
                note += f", error: {n.error[:60]}"
            self.bars.update(
                task,
                completed=n.done_bytes,
                amount=f"{format_bytes(n.done_bytes)}/{format_bytes(n.total_bytes)}",
                rate=f"{format_bytes(rate)}/s",
                eta=format_eta(eta if n.finished_at is None else 0),
                note=note,
            )
        done, total, rate, eta = self.state.overall()
        self.bars.update(
            self.all_task,
            total=max(total, 1),
            completed=done,
            amount=f"{format_bytes(done)}/{format_bytes(total)}",
            rate=f"{format_bytes(rate)}/s",
            eta=format_eta(eta),
        )

    def __enter__(self) -> ProgressView:
        self.bars.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.refresh()
        self.bars.__exit__(*exc)  # type: ignore[arg-type]
