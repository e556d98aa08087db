"""The replica's placement group: wait until every bundle sits on a live node; pick live ones.

An engine restart puts new Ray workers into the same placement group bundles. Right after a node
is lost, Ray may still count the lost node's bundles as placed: the head notices a dead raylet
only after its health checks fail, and only then places those bundles again (on the node once it
is back). Workers created in that window die with their node, and the restart attempt is wasted.
So, before an attempt, one tiny task runs in each bundle: it can only run once that bundle is on
a node whose raylet answers.

The same check tells which bundles are live for degraded serving (``--on-node-loss replan``):
`ReplicaLayouts` starts the smaller layout on live bundles and tells when every one is back.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

# How long one round of bundle checks may take before the reason is refreshed.
CHECK_ROUND_S = 5.0


def _bundle_node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


def check_bundle(pg: Any, index: int) -> Any:
    """Start the tiny task in bundle ``index`` of ``pg``; its ref resolves to the node id once
    the bundle is on a node whose raylet answers."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    strategy = PlacementGroupSchedulingStrategy(
        placement_group=pg, placement_group_bundle_index=index
    )
    check = ray.remote(num_cpus=0, max_retries=0)(_bundle_node_id)
    return check.options(scheduling_strategy=strategy).remote()


def cancel_checks(refs: Any) -> None:
    """Cancel bundle checks that have not run (their bundle's node is away)."""
    import ray

    for ref in refs:
        try:
            ray.cancel(ref)
        except Exception:
            logger.debug("could not cancel a bundle check", exc_info=True)


def current_placement_group() -> Any:
    """The placement group this process runs in (a Serve replica's), or None."""
    import ray

    if not ray.is_initialized():
        return None
    from ray.util import get_current_placement_group

    return get_current_placement_group()


def waiting_reason(pending: list[int], table: dict[str, Any], nodes: list[dict[str, Any]]) -> str:
    """Why bundles ``pending`` are not usable yet, naming their nodes (pure: Ray's placement
    group table and ``ray.nodes()`` in, one line out)."""
    by_id = {n.get("NodeID"): n for n in nodes}
    placed = table.get("bundles_to_node_id") or {}
    bundles = table.get("bundles") or {}
    parts = []
    for index in pending:
        node = by_id.get(placed.get(index) or placed.get(str(index)))
        what = f"bundle {index} {bundles.get(index) or bundles.get(str(index)) or ''}".rstrip()
        if node is None:
            parts.append(f"{what}: not placed on any node yet")
        elif not node.get("Alive"):
            parts.append(f"{what}: its node {node.get('NodeManagerAddress')} is gone")
        else:
            parts.append(f"{what}: node {node.get('NodeManagerAddress')} does not answer")
    return (
        f"waiting for the placement group ({table.get('state', '?')}) to have every bundle on a "
        f"live node: {'; '.join(parts)}"
    )


def _describe(pg: Any, pending: list[int], remembered: dict[int, str]) -> str:
    import ray
    from ray.util import placement_group_table

    try:
        table = dict(placement_group_table(pg))
        nodes = ray.nodes()
    except Exception as exc:  # the GCS may be busy right after a node loss
        return f"waiting for bundles {pending} of the placement group (Ray state unreadable: {exc})"
    placed = dict(table.get("bundles_to_node_id") or {})
    # A bundle being placed again has no node in the table any more: name the one it was on.
    for index in pending:
        if not (placed.get(index) or placed.get(str(index))) and index in remembered:
            placed[index] = remembered[index]
    table["bundles_to_node_id"] = placed
    return waiting_reason(pending, table, nodes)


async def wait_for_live_bundles(
    pg: Any,
    *,
    timeout_s: float,
    on_wait: Callable[[str], None],
    round_s: float = CHECK_ROUND_S,
) -> str | None:
    """Until a tiny task has run in every bundle of ``pg`` (each on a live node).

    ``on_wait`` gets the reason (which bundles, which nodes) whenever a round of checks ends
    without all of them. Returns None when every bundle answered, else the last reason after
    ``timeout_s``.
    """
    import ray
    from ray.util import placement_group_table

    count = pg.bundle_count
    remembered: dict[int, str] = {}
    try:
        # GCS calls block: off the replica's event loop, which also answers Serve's health checks.
        table = await asyncio.to_thread(placement_group_table, pg)
        placed = table.get("bundles_to_node_id") or {}
        remembered = {int(k): v for k, v in placed.items() if v}
    except Exception:
        logger.debug("placement group table unreadable", exc_info=True)

    refs = {index: check_bundle(pg, index) for index in range(count)}
    deadline = time.monotonic() + timeout_s
    reason = ""
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return reason or "the placement group's bundles were not all checked in time"
            ready, _ = await asyncio.to_thread(
                ray.wait, list(refs.values()), num_returns=len(refs), timeout=min(round_s, left)
            )
            failed = False
            for index, ref in list(refs.items()):
                if ref not in ready:
                    continue
                try:
                    ray.get(ref, timeout=0)
                except Exception as exc:  # its node died under it: check that bundle again
                    logger.info("bundle %d check failed (%s); checking again", index, exc)
                    refs[index] = check_bundle(pg, index)
                    failed = True
                    continue
                del refs[index]
            if not refs:
                return None
            reason = await asyncio.to_thread(_describe, pg, sorted(refs), remembered)
            on_wait(reason)
            if failed:
                await asyncio.sleep(1.0)  # a check that fails at once must not spin
    finally:
        cancel_checks(refs.values())


def pick_bundles(live: dict[int, str], tp: int, pp: int) -> list[int] | None:
    """``tp × pp`` bundle indices from ``live`` (device bundle index → node id) in vLLM's rank
    order: each pipeline stage's ``tp`` bundles on one node (tensor parallelism stays inside a
    node), nodes with the most live bundles first. None when the live bundles cannot hold it."""
    by_node: dict[str, list[int]] = {}
    for index in sorted(live):
        by_node.setdefault(live[index], []).append(index)
    order = sorted(by_node.values(), key=lambda ids: (-len(ids), ids[0]))
    stages = [ids[i : i + tp] for ids in order for i in range(0, len(ids) - tp + 1, tp)]
    if len(stages) < pp:
        return None
    return [index for stage in stages[:pp] for index in stage]


async def live_device_bundles(pg: Any, device_key: str, *, timeout_s: float) -> dict[int, str]:
    """The bundles of ``pg`` holding ``device_key`` whose check task ran within ``timeout_s``
    (each on a live node): bundle index → node id."""
    import ray

    indices = [i for i, b in enumerate(pg.bundle_specs) if b.get(device_key, 0)]
    refs = {index: check_bundle(pg, index) for index in indices}
    ready, pending = await asyncio.to_thread(
        ray.wait, list(refs.values()), num_returns=len(refs), timeout=timeout_s
    )
    live = {}
    for index, ref in refs.items():
        if ref in ready:
            try:
                live[index] = ray.get(ref, timeout=0)
            except Exception:
                logger.info("bundle %d check failed", index, exc_info=True)
    cancel_checks(pending)
    return live


@dataclass
class ReplicaLayouts:
    """Degraded serving for a replica (serve.watchdog.DegradedLayouts): the smaller layout
    ``tp × pp`` that `up`'s planner found to fit with a node lost, on the live bundles of the
    replica's own placement group (the lost node's bundles stay reserved and come back with it).
    """

    tp: int
    pp: int
    device_key: str
    open_session: Callable[[int, int, list[int]], Awaitable[Any]]
    check_s: float = CHECK_ROUND_S

    async def plan(self) -> tuple[str, Callable[[], Awaitable[Any]]] | None:
        pg = current_placement_group()
        if pg is None:
            return None
        live = await live_device_bundles(pg, self.device_key, timeout_s=self.check_s)
        bundles = pick_bundles(live, self.tp, self.pp)
        if bundles is None:
            logger.warning(
                "tp=%d x pp=%d does not fit the live bundles %s", self.tp, self.pp, sorted(live)
            )
            return None
        layout = f"tp={self.tp} × pp={self.pp} (bundles {','.join(map(str, bundles))})"
        return layout, lambda: self.open_session(self.tp, self.pp, bundles)

    async def all_back(self) -> bool:
        pg = current_placement_group()
        if pg is None:
            return False
        wanted = sum(1 for b in pg.bundle_specs if b.get(self.device_key, 0))
        live = await live_device_bundles(pg, self.device_key, timeout_s=self.check_s)
        return len(live) == wanted


async def wait_for_own_placement(timeout_s: float, on_wait: Callable[[str], None]) -> str | None:
    """`wait_for_live_bundles` for the placement group this process runs in (the replica's);
    nothing to wait for outside one."""
    pg = current_placement_group()
    if pg is None:
        return None
    return await wait_for_live_bundles(pg, timeout_s=timeout_s, on_wait=on_wait)
