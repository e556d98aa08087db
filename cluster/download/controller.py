"""Controller side: plan on the controller, fetch on every node in parallel, merge the manifest."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cluster.download.errors import AccessDeniedError
from cluster.download.lease import DEFAULT_TTL_S, DownloadBusyError, Lease, new_lease
from cluster.download.manifest import Manifest, write_manifest
from cluster.download.node import FetchSettings, NodeRequest
from cluster.download.plan import DownloadPlan, plan_download
from cluster.errors import ConfigError, DownloadError
from cluster.runner import (
    LocalRunner,
    OutputLine,
    Result,
    Runner,
    raise_for_failures,
    run_on_nodes,
)

NODE_MODULE = "cluster.download.node"
# Environment the node program gets: where the hub is, and the token (never on a command line).
_FORWARDED_ENV = ("HF_ENDPOINT", "HF_HUB_ETAG_TIMEOUT", "HF_HUB_DOWNLOAD_TIMEOUT")

EventSink = Callable[[dict[str, Any]], None]


@dataclass
class DownloadResult:
    """What a download did: the plan, the manifest, and each node's summary."""

    plan: DownloadPlan
    manifest: Manifest | None = None
    summaries: dict[str, dict[str, Any]] = field(default_factory=dict)
    warm: dict[str, dict[str, Any]] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def fetched_bytes(self) -> int:
        """Bytes fetched over the network in this run (skipped files excluded)."""
        return sum(int(s.get("bytes", 0)) for s in self.summaries.values())


def node_env(token: str | None) -> dict[str, str]:
    """Environment for the node program; the runner keeps it off command lines and out of logs."""
    env = {k: os.environ[k] for k in _FORWARDED_ENV if os.environ.get(k)}
    env["HF_HUB_DISABLE_TELEMETRY"] = "1"
    if token:
        env["HF_TOKEN"] = token
    return env


class _EventRouter:
    """Parses JSON lines from every node; keeps each node's last failure for the error message."""

    def __init__(
        self,
        sink: EventSink | None,
        *,
        stage: str,
        on_wait: Callable[[str], None] | None = None,
    ) -> None:
        self.sink = sink
        self.stage = stage
        self.on_wait = on_wait
        self.lock = threading.Lock()
        self.failed: dict[str, dict[str, Any]] = {}
        self.done: dict[str, dict[str, Any]] = {}
        self.stderr: dict[str, list[str]] = {}

    def __call__(self, line: OutputLine) -> None:
        if line.stream != "stdout":
            return
        try:
            event = json.loads(line.text)
        except json.JSONDecodeError:
            return
        if not isinstance(event, dict) or "event" not in event:
            return
        event["stage"] = self.stage  # download, manifest or warm: one sink sees them all
        if event["event"] == "waiting" and self.on_wait is not None:
            self.on_wait(str(event.get("message")))
        with self.lock:
            node = str(event.get("node"))
            if event["event"] == "failed":
                self.failed[node] = event
            elif event["event"] == "done":
                self.done[node] = event
            if self.sink is not None:
                self.sink(event)


def _run_node_action(
    runners: Sequence[Runner],
    request: NodeRequest,
    *,
    python: str,
    token: str | None,
    on_event: EventSink | None,
    what: str,
    timeout: float | None,
    on_wait: Callable[[str], None] | None = None,
) -> dict[str, dict[str, Any]]:
    """Run the node program on every runner in parallel; one error naming every failed node."""
    router = _EventRouter(on_event, stage=what, on_wait=on_wait)
    names = {r.node: r.node.name for r in runners}
    results: dict[Any, Result] = run_on_nodes(
        runners,
        lambda node: [python, "-m", NODE_MODULE, "--node", names[node]],
        env=node_env(token),
        stdin=request.model_dump_json(),
        on_line=router,
        check=False,
        timeout=timeout,
        what=what,
    )
    reported = {}
    unreported = {}
    for node, res in results.items():
        name = names[node]
        if res.ok:
            continue
        if name in router.failed:
            reported[name] = router.failed[name]
        else:
            unreported[node] = res
    if unreported:
        raise_for_failures(unreported, what=what)  # ssh failures, crashes: stderr tails
    if reported:
        access = [e for e in reported.values() if e.get("kind") == "access"]
        if access:
            raise AccessDeniedError(access[0]["message"], hint=access[0].get("hint"))
        if what == "lease" and len(reported) == 1:
            # The head's lease and checks: its own line, with its own exit code.
            (name, event), (res,) = next(iter(reported.items())), results.values()
            raise _node_error(event, exit_code=res.returncode)
        listing = "; ".join(f"{n}: {e.get('message')}" for n, e in sorted(reported.items()))
        raise DownloadError(
            f"{what} failed on {len(reported)} of {len(results)} node(s): {listing}",
            hint=next((e["hint"] for e in reported.values() if e.get("hint")), None)
            or "re-run the same command: verified files are kept, only the rest is fetched",
        )
    return {names[n]: router.done.get(names[n], {}) for n in results}


def _node_error(event: dict[str, Any], *, exit_code: int) -> DownloadError:
    """A node's reported failure as an error of the same exit code (3: busy or mixed commits)."""
    message, hint = str(event.get("message")), event.get("hint")
    if event.get("kind") == "busy":
        return DownloadBusyError(message, hint=hint)
    if exit_code == ConfigError.exit_code:
        return ConfigError(message, hint=hint)
    return DownloadError(message, hint=hint)


class _LeaseKeeper:
    """Renews the directory's lease on the head every ttl/4 while the download runs."""

    def __init__(self, renew: Callable[[], dict[str, Any]], *, ttl_s: float) -> None:
        self._renew = renew
        self._interval = ttl_s / 4
        self._stop = threading.Event()
        self.lost = False
        self._thread = threading.Thread(target=self._loop, name="lease-renewal", daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                held = self._renew().get("held", True)
            except Exception:
                continue  # a missed renewal is made up by the next; the ttl has room for it
            if not held:
                self.lost = True
                return

    def __enter__(self) -> _LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def warm_lists(plan: DownloadPlan, nodes: Sequence[str]) -> dict[str, list[str]]:
    """Which files each node reads for --warm: every weight file, on every node.

    With tensor parallelism every worker opens every shard (each reads its slice of each
    tensor), so each node's page cache wants all of them; a caller that knows a finer split
    (pipeline stages) can pass its own lists.
    """
    weights = sorted(f.path for f in plan.files if f.is_weight)
    return {n: list(weights) for n in nodes}


def download_model(
    repo: str,
    *,
    target: str,
    runners: Sequence[Runner],
    python: str = sys.executable,
    revision: str | None = None,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    settings: FetchSettings | None = None,
    token: str | None = None,
    warm: bool | Mapping[str, list[str]] = False,
    on_event: EventSink | None = None,
    on_plan: Callable[[DownloadPlan], None] | None = None,
    timeout: float | None = None,
    command: str | None = None,
    wait: bool = False,
    on_wait: Callable[[str], None] | None = None,
    lease_ttl_s: float = DEFAULT_TTL_S,
) -> DownloadResult:
    """Fetch one commit of ``repo`` into ``target`` (shared by all nodes), every node its share.

    The plan is made here. The head takes the directory's lease (a second download into the same
    directory is refused, naming the holder, or with ``wait`` queues behind it), checks that the
    directory holds no other commit and has room for what is still to fetch; each node fetches,
    verifies and records its files; then the head merges the records into ``manifest.json``.
    The lease is renewed while this runs and removed at the end. Re-running resumes: verified
    files are skipped. ``command`` is what a waiting operator sees as the holder.
    """
    if not runners:
        raise DownloadError("no nodes to download to")
    started = time.monotonic()
    names = [r.node.name for r in runners]
    plan = plan_download(
        repo, nodes=names, revision=revision, include=include, exclude=exclude, token=token
    )
    settings = settings or FetchSettings()
    common = {"python": python, "token": token, "on_event": on_event, "timeout": timeout}
    head = runners[:1]
    claim = new_lease(command or f"download {repo}", ttl_s=lease_ttl_s)
    taken = _run_node_action(
        head,
        NodeRequest(
            action="acquire", target=target, plan=plan, lease=claim, wait=wait, settings=settings
        ),
        what="lease",
        on_wait=on_wait,
        **common,
    )[names[0]]
    lease = Lease.model_validate(taken["lease"])

    def lease_call(action: str) -> dict[str, Any]:
        request = NodeRequest(action=action, target=target, lease=lease)  # type: ignore[arg-type]
        return _run_node_action(head, request, what="lease", **{**common, "on_event": None})[
            names[0]
        ]

    try:
        if on_plan is not None:
            on_plan(plan)
        with _LeaseKeeper(lambda: lease_call("renew"), ttl_s=lease_ttl_s) as keeper:
            result = _fetch_and_finalize(
                runners, plan, target=target, settings=settings, warm=warm, common=common
            )
        if keeper.lost:
            raise DownloadError(
                f"the lease on {target} expired during the download and another download took "
                "it over",
                hint="check who downloads into it now; re-run afterwards to verify the directory",
            )
    finally:
        # An unreleased lease only expires: never let the release mask the real error.
        with contextlib.suppress(Exception):
            lease_call("release")
    result.seconds = time.monotonic() - started
    return result


def _fetch_and_finalize(
    runners: Sequence[Runner],
    plan: DownloadPlan,
    *,
    target: str,
    settings: FetchSettings,
    warm: bool | Mapping[str, list[str]],
    common: dict[str, Any],
) -> DownloadResult:
    """Every node fetches its share, the head writes the manifest, then the optional warm pass."""
    names = [r.node.name for r in runners]
    summaries = _run_node_action(
        runners,
        NodeRequest(action="fetch", target=target, plan=plan, settings=settings),
        what="download",
        **common,
    )
    if all(isinstance(r, LocalRunner) for r in runners):
        # The head is this machine: merge here instead of starting one more node process.
        manifest = write_manifest(Path(target), plan)
    else:
        final = _run_node_action(
            runners[:1],
            NodeRequest(action="finalize", target=target, plan=plan),
            what="manifest",
            **common,
        )
        manifest = Manifest.model_validate(final[names[0]]["manifest"])
    result = DownloadResult(plan=plan, manifest=manifest, summaries=summaries)
    if warm:
        lists = dict(warm) if isinstance(warm, Mapping) else warm_lists(plan, names)
        result.warm = _run_node_action(
            runners,
            NodeRequest(action="warm", target=target, settings=settings, warm_files=lists),
            what="warm",
            **common,
        )
    return result
