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
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
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


_CHECK: Any = None


def _check_task() -> Any:
    """The tiny task, made a Ray remote function once per process (each definition is a GCS
    export)."""
    global _CHECK
    if _CHECK is None:
        import ray

        _CHECK = ray.remote(num_cpus=0, max_retries=0)(_bundle_node_id)
    return _CHECK


def check_bundle(pg: Any, index: int) -> Any:
    """Start the tiny task in bundle ``index`` of ``pg``; its ref resolves to the node id once
    the bundle is on a node whose raylet answers."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    strategy = PlacementGroupSchedulingStrategy(
        placement_group=pg, placement_group_bundle_index=index
    )
    return _check_task().options(scheduling_strategy=strategy).remote()


def nodes_answer(node_ids: list[str], timeout_s: float) -> bool:
    """Whether the tiny task ran on each of ``node_ids`` within ``timeout_s``: Ray's ``Alive``
    flag can lag behind a raylet that died or has not finished starting."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    refs = [
        _check_task()
        .options(scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node, soft=False))
        .remote()
        for node in node_ids
    ]
    ready: list[Any] = []
    try:
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        if len(ready) < len(refs):
            return False
        ray.get(refs, timeout=0)
        return True
    except Exception as exc:  # its node died or refused it
        logger.info("a node of the full layout does not answer yet: %s", exc)
        return False
    finally:
        cancel_checks([ref for ref in refs if ref not in ready])


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

    # A GCS call for the replica's own group (Ray caches it only for groups made here).
    count = await asyncio.to_thread(lambda: pg.bundle_count)
    remembered: dict[int, str] = {}
    try:
        # GCS calls block: off the replica's event loop, which also answers Serve's health checks.
        table = await asyncio.to_thread(placement_group_table, pg)
        placed = table.get("bundles_to_node_id") or {}
        remembered = {int(k): v for k, v in placed.items() if v}
    except Exception:
        logger.debug("placement group table unreadable", exc_info=True)

    refs: dict[int, Any] = {}
    deadline = time.monotonic() + timeout_s
    reason = ""
    try:
        await _start_checks(pg, refs, range(count))
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
                    del refs[index]
                    await _start_checks(pg, refs, [index])
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
        await asyncio.to_thread(cancel_checks, list(refs.values()))


async def _start_checks(pg: Any, refs: dict[int, Any], indexes: Iterable[int]) -> None:
    """Start the check of each bundle in ``indexes`` into ``refs``, off the event loop. If the
    caller is cancelled meanwhile, the checks the thread still starts are cancelled when it
    ends (the caller's own cleanup sees only those started before)."""

    def start() -> None:
        for index in indexes:
            refs[index] = check_bundle(pg, index)

    started = asyncio.ensure_future(asyncio.to_thread(start))
    try:
        await asyncio.shield(started)
    except asyncio.CancelledError:
        seen = dict(refs)

        def cancel_late(_: asyncio.Future) -> None:
            late = [ref for index, ref in refs.items() if seen.get(index) is not ref]
            threading.Thread(target=cancel_checks, args=(late,), daemon=True).start()

        started.add_done_callback(cancel_late)
        raise


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
    layout is live again (a tiny task pinned to each runs there) with room for it. Ray removes
    the group with the replica that created it.
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
        node (None), else why not after ``timeout_s`` (and no group is left waiting). A Ray
        error on the way is a reason too (the caller may then place the smaller layout)."""
        try:
            return await self._wait_full(timeout_s, on_wait)
        except asyncio.CancelledError:
            await self.release()  # a group of unknown state must not stay held
            raise
        except Exception as exc:  # the GCS may be busy right after a node loss
            logger.warning("could not check or place the full layout", exc_info=True)
            await self.release()
            return f"could not check or place the engine's placement group: {exc}"

    async def _wait_full(self, timeout_s: float, on_wait: Callable[[str], None]) -> str | None:
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
        try:
            nodes = await asyncio.to_thread(_group_addresses, pg)
        except Exception:  # only for the layout's description
            logger.debug("could not read where the smaller layout is placed", exc_info=True)
            nodes = []
        layout = f"tp={tp} × pp={pp} (on {', '.join(sorted(set(nodes))) or '?'})"
        return layout, lambda: self.open_session(tp, pp, pg)

    async def all_back(self) -> bool:
        """`DegradedLayouts.all_back`: every node of the full layout is live and runs a task
        pinned to it (Ray's ``Alive`` can lag), and the free device slots with the smaller
        group's own hold the full layout."""
        return await asyncio.to_thread(self._all_back)

    def _all_back(self) -> bool:
        import ray

        alive = [n for n in ray.nodes() if n.get("Alive")]
        # Where the full layout was is unknown only if reading it failed: then every live node
        # with the device must answer, and the slot count alone tells whether the lost one is
        # back.
        wanted = self.full_nodes or {
            n.get("NodeManagerAddress")
            for n in alive
            if (n.get("Resources") or {}).get(self.device_key, 0.0) > 0
        }
        if not wanted or not wanted <= {n.get("NodeManagerAddress") for n in alive}:
            return False
        free = ray._private.state.available_resources_per_node()
        slots = sum(free.get(n["NodeID"], {}).get(self.device_key, 0.0) for n in alive)
        held = 0 if self.pg_layout is None else self.pg_layout[0] * self.pg_layout[1]
        if slots + held < self.full[0] * self.full[1]:
            return False
        ids = [n["NodeID"] for n in alive if n.get("NodeManagerAddress") in wanted]
        return nodes_answer(ids, self.round_s)

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
        from ray.util import placement_group

        tp, pp = layout
        bundles = [{self.device_key: 1.0} for _ in range(tp * pp)]
        create = asyncio.ensure_future(asyncio.to_thread(placement_group, bundles, strategy="PACK"))
        try:
            pg = await asyncio.shield(create)
        except asyncio.CancelledError:
            create.add_done_callback(_remove_created)  # the group is made all the same
            raise
        self.pg, self.pg_layout = pg, layout
        try:
            left = await self._wait_placed(pg, layout, timeout_s, on_wait)
        except BaseException:
            await self.release()  # a group of unknown state must not stay held
            raise
        if left is not None:
            await self.release()
            return left
        if layout == self.full:
            try:
                self.full_nodes = frozenset(await asyncio.to_thread(_group_addresses, pg))
            except Exception:  # keep the last known nodes: they only name what to wait for
                logger.warning("could not read where the full layout is placed", exc_info=True)
        logger.info("the engine's placement group for tp=%d × pp=%d is placed", tp, pp)
        return None

    async def _wait_placed(
        self, pg: Any, layout: tuple[int, int], timeout_s: float, on_wait: Callable[[str], None]
    ) -> str | None:
        """Until Ray placed ``pg``: None, or why not (after ``timeout_s``, or its placement
        failed)."""
        import ray

        tp, pp = layout
        ready = await asyncio.to_thread(pg.ready)
        deadline = time.monotonic() + timeout_s
        reason = ""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return reason or f"tp={tp} × pp={pp} was not placed in {timeout_s:g}s"
            done, _ = await asyncio.to_thread(ray.wait, [ready], timeout=min(self.round_s, left))
            if done:
                try:
                    await asyncio.to_thread(ray.get, ready, timeout=0)
                except Exception as exc:  # the group was removed or its placement failed
                    return f"the placement group for tp={tp} × pp={pp} failed: {exc}"
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


def _remove_created(create: asyncio.Future) -> None:
    """Remove the group a creation cancelled halfway made after all (off the event loop)."""
    if create.cancelled() or create.exception() is not None:
        return
    from ray.util import remove_placement_group

    def remove() -> None:
        try:
            remove_placement_group(create.result())
        except Exception:
            logger.warning("could not remove the engine's placement group", exc_info=True)

    threading.Thread(target=remove, name="remove-placement-group", daemon=True).start()


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
