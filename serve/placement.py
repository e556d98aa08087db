"""The replica's placement group: wait until every bundle sits on a live node; pick live ones.

An engine restart puts new Ray workers into the same placement group bundles. Right after a node
is lost, Ray may still count the lost node's bundles as placed: the head notices a dead raylet
only after its health checks fail, and only then places those bundles again (on the node once it
is back). Workers created in that window die with their node, and the restart attempt is wasted.
So, before an attempt, one tiny task runs in each bundle: it can only run once that bundle is on
a node whose raylet answers.

With degraded serving (``--on-node-loss replan``) the engine's devices are not in the replica's
group: `EnginePlacement` creates the engine's own group, removes one that lost a node (Ray 2.60
retries such a group without pause, docs/RELIABILITY.md), places the smaller layout on the nodes
left when the full one does not fit in time, and tells when the lost node is back.
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
# Degraded serving: how long the first load waits for the engine's own group (the deploy
# checked that the slots are free), and the smaller layout's group on the nodes left.
FIRST_PLACEMENT_S = 300.0
SMALL_PLACEMENT_S = 30.0


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


def _describe(
    pg: Any, pending: list[int], remembered: dict[int, str]
) -> tuple[str, dict[str, Any]]:
    """Why ``pending`` bundles are not usable yet, and the group's table ({} if unreadable)."""
    import ray
    from ray.util import placement_group_table

    try:
        table = dict(placement_group_table(pg))
        nodes = ray.nodes()
    except Exception as exc:  # the GCS may be busy right after a node loss
        why = f"waiting for bundles {pending} of the placement group (Ray state unreadable: {exc})"
        return why, {}
    placed = dict(table.get("bundles_to_node_id") or {})
    # A bundle being placed again has no node in the table any more: name the one it was on.
    for index in pending:
        if not (placed.get(index) or placed.get(str(index))) and index in remembered:
            placed[index] = remembered[index]
    table["bundles_to_node_id"] = placed
    return waiting_reason(pending, table, nodes), table


async def wait_for_live_bundles(
    pg: Any,
    *,
    timeout_s: float,
    on_wait: Callable[[str], None],
    round_s: float = CHECK_ROUND_S,
    abandon: Callable[[dict[str, Any]], bool] | None = None,
) -> str | None:
    """Until a tiny task has run in every bundle of ``pg`` (each on a live node).

    ``on_wait`` gets the reason (which bundles, which nodes) whenever a round of checks ends
    without all of them. Returns None when every bundle answered, else the last reason after
    ``timeout_s``, or at once when ``abandon`` says so of the group's table (read each round).
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
            reason, table = await asyncio.to_thread(_describe, pg, sorted(refs), remembered)
            on_wait(reason)
            if abandon is not None and table and abandon(table):
                return reason
            if failed:
                await asyncio.sleep(1.0)  # a check that fails at once must not spin
    finally:
        cancel_checks(refs.values())


def pending_reason(
    layout: tuple[int, int],
    device_key: str,
    nodes: list[dict[str, Any]],
    free: dict[str, dict[str, float]],
    expected: frozenset[str] = frozenset(),
) -> str:
    """Why a group of ``tp × pp`` device bundles is not placed yet (pure: ``ray.nodes()`` and
    the free resources per node id in, one line out), naming the nodes of the full layout
    (``expected``, addresses) that are gone."""
    tp, pp = layout
    alive = [n for n in nodes if n.get("Alive")]
    offers = [
        f"{n.get('NodeManagerAddress')}: {free.get(n.get('NodeID'), {}).get(device_key, 0.0):g}"
        for n in alive
        if (n.get("Resources") or {}).get(device_key, 0.0) > 0
    ]
    text = (
        f"waiting for {tp * pp} free {device_key} slots for tp={tp} × pp={pp} "
        f"(free per live node: {', '.join(offers) or 'no live node has any'})"
    )
    gone = sorted(expected - {n.get("NodeManagerAddress") for n in alive})
    if gone:
        text += f"; node {', '.join(gone)} of the full layout is gone"
    return text


def _rescheduling(table: dict[str, Any]) -> bool:
    """A group Ray is placing again because a node of it died (Ray 2.60 retries it without
    pause: remove it instead)."""
    return table.get("state") == "RESCHEDULING"


@dataclass
class EnginePlacement:
    """The engine's own placement group, for degraded serving (``--on-node-loss replan``).

    In this mode the replica's Serve placement group holds the replica only, and the replica
    creates the group of its ``tp × pp`` device bundles itself (strategy PACK, as Serve's). A
    group with a bundle on a node Ray declared dead is removed at once rather than left for Ray
    to place again (Ray 2.60 retries that with no pause, a busy GCS); a fresh group waits as
    pending, which Ray retries with backoff. When the full layout is not placed in time the
    smaller one is placed on the nodes left; `all_back` tells when every node of the full
    layout is live again with room for it. Ray removes the group with the replica that
    created it.
    """

    full: tuple[int, int]
    small: tuple[int, int]
    device_key: str
    # (tp, pp, placement group) -> a started engine session on that group
    open_session: Callable[[int, int, Any], Awaitable[Any]]
    round_s: float = CHECK_ROUND_S
    first_wait_s: float = FIRST_PLACEMENT_S
    small_wait_s: float = SMALL_PLACEMENT_S
    pg: Any = None
    pg_layout: tuple[int, int] | None = None
    # Addresses of the nodes the full layout was last placed on.
    full_nodes: frozenset[str] = frozenset()

    async def start(self) -> Any:
        """Start the full layout (first load; a restart once `wait_full` placed it)."""
        if self.pg is None or self.pg_layout != self.full:
            left = await self.wait_full(self.first_wait_s, lambda why: logger.info("%s", why))
            if left is not None:
                raise RuntimeError(
                    f"the engine's placement group was not placed in {self.first_wait_s:g}s: {left}"
                )
        return await self.open_session(*self.full, self.pg)

    async def wait_full(self, timeout_s: float, on_wait: Callable[[str], None]) -> str | None:
        """`PlacementWait` for the full layout: the group in place with every bundle on a live
        node (None), else why not after ``timeout_s`` (and no group is left waiting)."""
        deadline = time.monotonic() + timeout_s
        left = None
        if self.pg is not None and self.pg_layout == self.full:
            left = await wait_for_live_bundles(
                self.pg,
                timeout_s=timeout_s,
                on_wait=on_wait,
                round_s=self.round_s,
                abandon=_rescheduling,
            )
            if left is None:
                return None
            logger.warning("removing the engine's placement group: %s", left)
        await self.release()
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return left or f"no time left to place tp={self.full[0]} × pp={self.full[1]}"
        return await self._place(self.full, remaining, on_wait)

    async def plan(self) -> tuple[str, Callable[[], Awaitable[Any]]] | None:
        """`DegradedLayouts.plan`: the smaller layout placed on the live nodes, or None when it
        was not placed within ``small_wait_s``."""
        await self.release()
        left = await self._place(self.small, self.small_wait_s, lambda why: logger.info("%s", why))
        if left is not None:
            logger.warning("the smaller layout does not fit the live nodes: %s", left)
            return None
        pg, (tp, pp) = self.pg, self.small
        nodes = await asyncio.to_thread(_group_addresses, pg)
        layout = f"tp={tp} × pp={pp} (on {', '.join(sorted(set(nodes))) or '?'})"
        return layout, lambda: self.open_session(tp, pp, pg)

    async def all_back(self) -> bool:
        """`DegradedLayouts.all_back`: every node of the full layout is live, and the free
        device slots with the smaller group's own hold the full layout."""
        return await asyncio.to_thread(self._all_back)

    def _all_back(self) -> bool:
        import ray

        if not self.full_nodes:
            return False
        alive = [n for n in ray.nodes() if n.get("Alive")]
        if not self.full_nodes <= {n.get("NodeManagerAddress") for n in alive}:
            return False
        free = ray._private.state.available_resources_per_node()
        slots = sum(free.get(n["NodeID"], {}).get(self.device_key, 0.0) for n in alive)
        held = 0 if self.pg_layout is None else self.pg_layout[0] * self.pg_layout[1]
        return slots + held >= self.full[0] * self.full[1]

    async def release(self) -> None:
        """Remove the group (its engine must be closed first: Ray kills what runs in it)."""
        pg, self.pg, self.pg_layout = self.pg, None, None
        if pg is None:
            return
        from ray.util import remove_placement_group

        try:
            await asyncio.to_thread(remove_placement_group, pg)
        except Exception:
            logger.warning("could not remove the engine's placement group", exc_info=True)

    async def _place(
        self, layout: tuple[int, int], timeout_s: float, on_wait: Callable[[str], None]
    ) -> str | None:
        """Create a group of ``tp × pp`` device bundles and wait until Ray placed it: None, or
        why not after ``timeout_s`` (the group is then removed)."""
        import ray
        from ray.util import placement_group

        tp, pp = layout
        bundles = [{self.device_key: 1.0} for _ in range(tp * pp)]
        pg = await asyncio.to_thread(placement_group, bundles, strategy="PACK")
        self.pg, self.pg_layout = pg, layout
        ready = await asyncio.to_thread(pg.ready)
        deadline = time.monotonic() + timeout_s
        reason = ""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                await self.release()
                return reason or f"tp={tp} × pp={pp} was not placed in {timeout_s:g}s"
            done, _ = await asyncio.to_thread(ray.wait, [ready], timeout=min(self.round_s, left))
            if done:
                if layout == self.full:
                    self.full_nodes = frozenset(await asyncio.to_thread(_group_addresses, pg))
                logger.info("the engine's placement group for tp=%d × pp=%d is placed", tp, pp)
                return None
            reason = await asyncio.to_thread(self._pending_reason, layout)
            on_wait(reason)

    def _pending_reason(self, layout: tuple[int, int]) -> str:
        import ray

        try:
            nodes = ray.nodes()
            free = ray._private.state.available_resources_per_node()
        except Exception as exc:  # the GCS may be busy right after a node loss
            return f"waiting for the engine's placement group (Ray state unreadable: {exc})"
        return pending_reason(layout, self.device_key, nodes, free, self.full_nodes)


def _group_addresses(pg: Any) -> list[str]:
    """The node address of each placed bundle of ``pg``."""
    import ray
    from ray.util import placement_group_table

    placed = (placement_group_table(pg).get("bundles_to_node_id") or {}).values()
    by_id = {n.get("NodeID"): n.get("NodeManagerAddress") for n in ray.nodes()}
    return [by_id[node] for node in placed if node in by_id]


async def wait_for_own_placement(timeout_s: float, on_wait: Callable[[str], None]) -> str | None:
    """`wait_for_live_bundles` for the placement group this process runs in (the replica's);
    nothing to wait for outside one."""
    pg = current_placement_group()
    if pg is None:
        return None
    return await wait_for_live_bundles(pg, timeout_s=timeout_s, on_wait=on_wait)
