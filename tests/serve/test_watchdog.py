"""The engine watchdog without an engine: stall detection, backoff, restarts, and what clients see
(503 + Retry-After, SSE error events, /health JSON) through the real Gateway."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time

import httpx
import pytest
from starlette.applications import Starlette
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from serve.api import Gateway, ServerState
from serve.watchdog import (
    ENGINE_DEAD,
    NODE_RETURNED,
    PROBE_FAILING,
    STALL,
    RestartPolicy,
    StallDetector,
    Supervisor,
    _wait_for,
    history_from_json,
    restart_delay,
)

pytestmark = pytest.mark.anyio

KEY = "sk-unit-key"
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
FAST = RestartPolicy(
    stall_timeout_s=0.3,
    first_output_grace_s=0.5,
    max_attempts=3,
    backoff_s=0.05,
    backoff_max_s=0.1,
    probe_interval_s=0.02,
    probe_idle_interval_s=0.08,
    probe_timeout_s=0.2,
    poll_s=0.01,
)
# Longest any single await in these tests may take (nothing waits unbounded).
BOUND_S = 10.0


# --- pure logic ------------------------------------------------------------------------------


def test_backoff_is_exponential_and_capped() -> None:
    delays = [restart_delay(n, 5.0, 60.0) for n in range(1, 8)]
    assert delays == [0.0, 5.0, 10.0, 20.0, 40.0, 60.0, 60.0]


def test_the_probe_interval_doubles_while_idle_and_drops_back_on_output() -> None:
    policy = RestartPolicy(probe_interval_s=10.0, probe_idle_interval_s=60.0)
    waits, wait = [], 10.0
    for _ in range(5):
        wait = policy.next_probe_interval_s(wait, output_seen=False)
        waits.append(wait)
    assert waits == [20.0, 40.0, 60.0, 60.0, 60.0]
    assert policy.next_probe_interval_s(60.0, output_seen=True) == 10.0
    # An idle interval below the base one never shortens it.
    short = RestartPolicy(probe_interval_s=10.0, probe_idle_interval_s=5.0)
    assert short.next_probe_interval_s(10.0, output_seen=False) == 10.0
    assert short.longest_probe_interval_s == 10.0
    # The supervisor's own staleness limit allows for the longest wait.
    assert policy.stale_probe_limit_s > 60.0 + policy.probe_timeout_s


def test_stall_needs_requests_in_flight_and_silence() -> None:
    detector = StallDetector(10.0)
    assert detector.check(100.0, 0, None) is None  # idle: never a stall
    assert detector.check(200.0, 0, 50.0) is None
    # Busy from t=300 after a long idle time: the quiet time counts from 300, not from 50.
    assert detector.check(300.0, 2, 50.0) is None
    assert detector.check(309.0, 2, 50.0) is None
    stall = detector.check(310.5, 2, 50.0)
    assert stall is not None and "10.5s" in stall and "2 request(s)" in stall
    # Output keeps it alive; silence after the output trips it again.
    assert detector.check(311.0, 2, 310.8) is None
    assert detector.check(320.9, 1, 310.8) is not None
    # Back to idle resets; busy again starts a fresh quiet period.
    assert detector.check(400.0, 0, 310.8) is None
    assert detector.check(401.0, 1, 310.8) is None
    assert detector.check(410.0, 1, 310.8) is None
    assert StallDetector(0).check(1e9, 5, None) is None  # 0 = off


def test_a_fresh_engine_gets_a_grace_for_its_first_output() -> None:
    detector = StallDetector(4.0, first_output_s=30.0)
    assert detector.check(0.0, 1, None) is None
    assert detector.check(29.0, 1, None) is None  # first step warming up
    stall = detector.check(30.5, 1, None)
    assert stall is not None and "first output" in stall
    assert detector.check(31.0, 1, 30.9) is None
    assert detector.check(35.0, 1, 30.9) is not None  # after the first output: 4 s


def test_history_round_trips_and_marks_interrupted_attempts() -> None:
    items = [
        {"cause": STALL, "detail": "d", "time": "2026-01-02T03:04:05+00:00", "attempt": 1},
        {"cause": ENGINE_DEAD, "time": "2026-01-02T03:05:00+00:00", "attempt": 2,
         "outcome": "recovered", "down_s": 41.5},
        {"nonsense": True},
    ]  # fmt: skip
    records = history_from_json(items)
    assert [(r.cause, r.attempt, r.outcome) for r in records] == [
        (STALL, 1, "interrupted"),
        (ENGINE_DEAD, 2, "recovered"),
    ]
    assert records[1].as_json()["time"] == "2026-01-02T03:05:00+00:00"
    assert history_from_json("garbage") == []


async def test_a_cancellation_as_the_awaited_work_finishes_is_never_swallowed() -> None:
    # asyncio.wait_for before Python 3.12 returns the result instead of raising when its task
    # is cancelled in the loop step where the awaited work finished: a probe loop cancelled at
    # that moment ran on forever, and the supervisor waiting for it never restarted the engine.
    async def quick() -> int:
        return 1

    async def probe_loop() -> None:
        for _ in range(50):  # bounded, so a swallowed cancellation fails the test, not hangs it
            await _wait_for(quick(), 1.0)
            await asyncio.sleep(0.001)

    loop_task = asyncio.create_task(probe_loop())
    await asyncio.sleep(0)  # probe_loop is waiting for quick()
    await asyncio.sleep(0)  # quick() has finished; probe_loop has not been woken yet
    loop_task.cancel()
    await asyncio.wait((loop_task,), timeout=BOUND_S)
    assert loop_task.cancelled(), "the cancellation was swallowed: the loop ran on"
    with pytest.raises(asyncio.TimeoutError):
        await _wait_for(asyncio.sleep(3600), 0.01)


# --- the supervisor with stand-in engines -----------------------------------------------------


class FakeSession:
    """An engine stand-in: tests set what it reports."""

    def __init__(self, name: str, app=None) -> None:
        self.name = name
        self.app = app or Starlette(routes=[Route("/v1/x", lambda r: JSONResponse({"n": name}))])
        self.dead_reason: str | None = None
        self.requests = 0
        self.output_at: float | None = None
        self.probe_error: Exception | None = None
        self.probe_hangs = False
        self.probes = 0
        self.closed = False

    def dead(self) -> str | None:
        return self.dead_reason

    def in_flight(self) -> int:
        return self.requests

    def last_output(self) -> float | None:
        return self.output_at

    async def probe(self) -> None:
        self.probes += 1
        if self.probe_hangs:
            await asyncio.sleep(3600)
        if self.probe_error is not None:
            raise self.probe_error

    async def close(self) -> None:
        self.closed = True


class Starts:
    """start(): hands out the queued sessions (or raises the queued errors), in order."""

    def __init__(self, *items) -> None:
        self.items = list(items)
        self.calls = 0
        self.gate: asyncio.Event | None = None

    async def __call__(self):
        self.calls += 1
        if self.gate is not None:
            await asyncio.wait_for(self.gate.wait(), BOUND_S)
        item = self.items.pop(0)
        if isinstance(item, Exception):
            raise item
        return item


def supervisor(starts: Starts, policy: RestartPolicy = FAST, **kwargs) -> Supervisor:
    ended: list[str] = []
    sup = Supervisor(
        state=ServerState(),
        policy=policy,
        start=starts,
        end_in_flight=lambda message: ended.append(message) or 0,
        **kwargs,
    )
    sup.ended = ended  # type: ignore[attr-defined]
    return sup


async def within(aw, timeout: float = BOUND_S):
    """Await with a bound: a hang fails the test instead of stalling it."""
    return await asyncio.wait_for(aw, timeout)


async def wait_for(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


async def test_dead_engine_is_restarted_and_the_restart_recorded() -> None:
    first, second = FakeSession("a"), FakeSession("b")
    stored: list[list[dict]] = []
    sup = supervisor(Starts(first, second), on_history=stored.append)
    task = sup.launch()
    await wait_for(lambda: sup.state.last_probe_ok is not None)
    assert sup.state.ready()[0] and sup.health_problem() is None

    first.dead_reason = "EngineDeadError: core exited"
    await wait_for(lambda: sup.session is second and sup.state.last_probe_ok is not None)
    assert first.closed and not second.closed
    assert sup.ended and ENGINE_DEAD in sup.ended[0]
    [record] = sup.history
    assert (record.cause, record.attempt, record.outcome) == (ENGINE_DEAD, 1, "recovered")
    assert record.down_s is not None and record.down_s >= 0
    assert stored[-1][0]["outcome"] == "recovered"
    assert sup.state.phase == "serving" and sup.state.ready()[0]
    task.cancel()


async def test_stall_restarts_but_a_busy_engine_with_output_does_not() -> None:
    first, second = FakeSession("a"), FakeSession("b")
    sup = supervisor(Starts(first, second))
    task = sup.launch()
    await wait_for(lambda: sup.state.last_probe_ok is not None)
    first.requests = 3
    for _ in range(40):  # 0.4 s busy, output every 10 ms: no stall
        first.output_at = time.monotonic()
        await asyncio.sleep(0.01)
    assert sup.session is first
    await wait_for(lambda: sup.session is second)  # output stops: stall after 0.3 s
    assert sup.history[0].cause == STALL and "3 request(s)" in sup.history[0].detail
    task.cancel()


async def test_output_of_real_requests_stands_in_for_the_probe_and_idle_spaces_it_out() -> None:
    session = FakeSession("a")
    probed_at: list[float] = []
    probe = session.probe

    async def timed_probe() -> None:
        probed_at.append(time.monotonic())
        await probe()

    session.probe = timed_probe  # type: ignore[method-assign]
    sup = supervisor(Starts(session))
    task = sup.launch()
    await wait_for(lambda: len(probed_at) >= 5)  # idle: 0.02 s, then doubling to 0.08 s
    gaps = [b - a for a, b in itertools.pairwise(probed_at)]
    assert all(gap >= 0.04 for gap in gaps[:1]) and all(gap >= 0.08 for gap in gaps[2:4]), gaps
    # Requests produce output: the engine is proven without probes, and /ready stays fresh.
    count = session.probes
    for _ in range(30):  # 0.3 s with output every 10 ms
        session.output_at = time.monotonic()
        await asyncio.sleep(0.01)
    assert session.probes <= count + 1, (count, session.probes)  # one may have been under way
    assert time.monotonic() - (sup.state.last_probe_ok or 0.0) < 0.25
    assert sup.state.ready()[0]
    task.cancel()


async def test_probe_errors_in_a_row_are_a_fault_but_slow_probes_are_not() -> None:
    first, second = FakeSession("a"), FakeSession("b")
    policy = RestartPolicy(**{**FAST.__dict__, "stall_timeout_s": 0})  # stall watchdog off
    sup = supervisor(Starts(first, second), policy)
    task = sup.launch()
    await wait_for(lambda: sup.state.last_probe_ok is not None)
    first.probe_hangs = True  # times out every 0.2 s: not ready, but no restart
    await asyncio.sleep(0.8)
    assert sup.session is first and "timed out" in (sup.state.last_probe_error or "")
    first.probe_hangs = False
    first.probe_error = RuntimeError("EngineGenerateError")
    await wait_for(lambda: sup.session is second)
    assert sup.history[0].cause == PROBE_FAILING and "3 probes" in sup.history[0].detail
    task.cancel()


async def test_failed_attempts_back_off_then_give_up_for_serve_to_replace() -> None:
    first = FakeSession("a")
    starts = Starts(first, RuntimeError("no GPU"), RuntimeError("no GPU"), RuntimeError("no GPU"))
    sup = supervisor(starts)
    task = sup.launch()
    await wait_for(lambda: sup.state.last_probe_ok is not None)
    started = time.monotonic()
    first.dead_reason = "worker died"
    await asyncio.wait_for(task, 5)  # run() returns when it gives up
    # Attempts 2 and 3 waited 0.05 and 0.1 s (capped).
    assert time.monotonic() - started >= 0.15
    assert starts.calls == 4
    assert [r.outcome for r in sup.history] == ["failed", "failed", "failed", "gave_up"]
    assert sup.history[0].error == "RuntimeError: no GPU"
    assert sup.state.phase == "failed"
    problem = sup.health_problem()
    assert problem is not None and "exhausted" in problem
    assert not sup.state.healthy()[0] and sup.state.status_word() == "failed"


async def test_attempts_continue_across_faults_until_the_engine_is_stable() -> None:
    sessions = [FakeSession(str(i)) for i in range(3)]
    sup = supervisor(Starts(*sessions))
    task = sup.launch()
    await wait_for(lambda: sup.state.last_probe_ok is not None)
    sessions[0].dead_reason = "x"
    await wait_for(lambda: sup.session is sessions[1] and sup.state.last_probe_ok is not None)
    sessions[1].dead_reason = "x"  # dies again soon after: the next restart is attempt 2
    await wait_for(lambda: sup.session is sessions[2])
    assert [r.attempt for r in sup.history] == [1, 2]
    task.cancel()


async def test_a_restart_waits_for_its_placement_without_spending_an_attempt() -> None:
    first, second = FakeSession("a"), FakeSession("b")
    starts = Starts(first, second)
    node_back = asyncio.Event()
    waits: list[float] = []

    async def wait_for_placement(timeout_s: float, on_wait) -> str | None:
        waits.append(timeout_s)
        while not node_back.is_set():
            on_wait("waiting for the placement group: bundle 1: its node 10.0.0.2 is gone")
            await asyncio.sleep(0.01)
        return None

    sup = supervisor(starts, wait_for_placement=wait_for_placement)
    task = sup.launch()
    await wait_for(lambda: sup.state.last_probe_ok is not None)
    first.dead_reason = "ActorDiedError: its node has died"
    await wait_for(lambda: "10.0.0.2 is gone" in (sup.state.detail or ""))
    await asyncio.sleep(0.3)  # longer than every backoff of FAST: nothing may be attempted
    assert starts.calls == 1 and sup.history == []
    reason = sup.state.unavailable() or ""
    assert "attempt 1 of 3" in reason and "its node 10.0.0.2 is gone" in reason, reason
    assert sup.state.status_word() == "restarting"
    node_back.set()
    await wait_for(lambda: sup.session is second and sup.state.last_probe_ok is not None)
    assert waits == [FAST.placement_wait_s]
    assert [(r.attempt, r.outcome) for r in sup.history] == [(1, "recovered")]
    assert sup.history[0].detail == "ActorDiedError: its node has died"
    task.cancel()


async def test_a_placement_group_that_stays_broken_hands_the_replica_to_serve() -> None:
    first = FakeSession("a")
    starts = Starts(first)

    async def wait_for_placement(timeout_s: float, on_wait) -> str | None:
        on_wait("bundle 1: not placed on any node yet")
        return "bundle 1: not placed on any node yet"

    sup = supervisor(starts, wait_for_placement=wait_for_placement)
    task = sup.launch()
    await wait_for(lambda: sup.state.last_probe_ok is not None)
    first.dead_reason = "x"
    await within(task)  # run() returns: no attempt is made on a group that is not whole
    assert starts.calls == 1
    assert [(r.outcome, r.attempt) for r in sup.history] == [("gave_up", 1)]
    assert "placement group" in (sup.history[0].error or "")
    assert sup.state.phase == "failed" and "did not get every bundle" in (sup.state.detail or "")
    problem = sup.health_problem()
    assert problem is not None and "did not get every bundle" in problem


async def test_a_placement_check_that_breaks_does_not_block_restarts() -> None:
    first, second = FakeSession("a"), FakeSession("b")

    async def wait_for_placement(timeout_s: float, on_wait) -> str | None:
        raise RuntimeError("GCS unreachable")

    sup = supervisor(Starts(first, second), wait_for_placement=wait_for_placement)
    task = sup.launch()
    await wait_for(lambda: sup.state.last_probe_ok is not None)
    first.dead_reason = "x"
    await wait_for(lambda: sup.session is second)
    assert sup.state.detail == "x"
    task.cancel()


class FakeLayouts:
    """Degraded serving stand-in: a smaller layout while ``node_up`` is False."""

    def __init__(self, small: FakeSession | None) -> None:
        self.small = small
        self.node_up = False
        self.plans = 0

    async def plan(self):
        self.plans += 1
        if self.small is None:
            return None
        small = self.small

        async def start():
            return small

        return "tp=1 × pp=1 (on 10.0.0.1)", start

    async def all_back(self) -> bool:
        return self.node_up


REPLAN = RestartPolicy(**{**FAST.__dict__, "replan_after_s": 0.05, "restore_check_s": 0.02})


async def test_a_lost_node_means_the_smaller_layout_until_it_is_back_then_the_full_one() -> None:
    full, small, full_again = FakeSession("full"), FakeSession("small"), FakeSession("full2")
    layouts = FakeLayouts(small)
    waited: list[float] = []

    async def wait_for_placement(timeout_s: float, on_wait) -> str | None:
        waited.append(timeout_s)
        if layouts.node_up:
            return None
        on_wait("waiting for the placement group: bundle 2: its node 10.0.0.2 is gone")
        await asyncio.sleep(timeout_s)
        return "bundle 2: its node 10.0.0.2 is gone"

    sup = supervisor(
        Starts(full, full_again), REPLAN, wait_for_placement=wait_for_placement, degraded=layouts
    )
    task = sup.launch()
    await wait_for(lambda: sup.state.last_probe_ok is not None)
    full.dead_reason = "ActorDiedError: its node has died"
    await wait_for(lambda: sup.session is small and sup.state.last_probe_ok is not None)
    assert waited == [REPLAN.replan_after_s]  # waited for the node only that long
    assert sup.layout == "tp=1 × pp=1 (on 10.0.0.1)"
    assert "serving with the smaller layout tp=1 × pp=1" in (sup.state.detail or "")
    assert sup.state.ready()[0] and sup.state.status_word() == "ok"
    await asyncio.sleep(0.1)  # the node is still away: the small engine keeps serving
    assert sup.session is small
    layouts.node_up = True
    await wait_for(lambda: sup.session is full_again and sup.state.last_probe_ok is not None)
    assert small.closed and sup.layout is None
    assert [(r.cause, r.attempt, r.outcome, r.layout) for r in sup.history] == [
        (ENGINE_DEAD, 1, "recovered", "tp=1 × pp=1 (on 10.0.0.1)"),
        (NODE_RETURNED, 1, "recovered", None),
    ]
    task.cancel()


async def test_a_node_that_only_looks_back_slows_the_moves_back_down() -> None:
    # all_back says yes, but the full layout never gets placed (the node flaps): each failed
    # move back lands on the smaller layout again and doubles the wait before the next check.
    full = FakeSession("full")
    layouts = FakeLayouts(FakeSession("small"))
    smalls = [FakeSession(f"small{n}") for n in range(8)]
    checks: list[float] = []

    async def plan():
        layouts.plans += 1
        session = smalls[layouts.plans - 1]

        async def start():
            return session

        return "tp=1 × pp=1 (on 10.0.0.1)", start

    async def all_back() -> bool:
        checks.append(time.monotonic())
        return True

    async def never_placed(timeout_s: float, on_wait) -> str | None:
        await asyncio.sleep(timeout_s)
        return "bundle 1: its node 10.0.0.2 does not answer"

    layouts.plan, layouts.all_back = plan, all_back
    policy = RestartPolicy(**{**REPLAN.__dict__, "restore_check_s": 0.05, "backoff_max_s": 0.2})
    sup = supervisor(Starts(full), policy, wait_for_placement=never_placed, degraded=layouts)
    task = sup.launch()
    await wait_for(lambda: sup.state.last_probe_ok is not None)
    full.dead_reason = "ActorDiedError: its node has died"
    await wait_for(lambda: layouts.plans >= 5)
    task.cancel()
    assert sup.failed_moves >= 3
    assert sup.restore_interval_s() == 0.2  # capped at the backoff's cap
    moves = [r for r in sup.history if r.cause == NODE_RETURNED]
    assert len(moves) >= 3 and all(r.layout is not None for r in moves)
    assert sup.state.phase != "failed"  # a move back is not a failed attempt
    # Between two checks: the failed wait for the full layout (0.05 s), then the doubled wait.
    gaps = [b - a for a, b in itertools.pairwise(checks)]
    assert gaps[0] >= 0.05 + 0.1 and gaps[1] >= 0.05 + 0.2, gaps


async def test_a_move_back_counts_as_failed_until_the_full_engine_is_stable(caplog) -> None:
    # The node comes back long enough for the full engine to start, then goes again: that move
    # back failed too (the next check waits longer); a full engine that stays up resets it.
    full, full2, full3 = FakeSession("full"), FakeSession("full2"), FakeSession("full3")
    layouts = FakeLayouts(None)
    smalls = [FakeSession("small0"), FakeSession("small1")]

    async def plan():
        session = smalls[layouts.plans]
        layouts.plans += 1

        async def start():
            return session

        return "tp=1 × pp=1 (on 10.0.0.1)", start

    async def wait_for_placement(timeout_s: float, on_wait) -> str | None:
        if layouts.node_up:
            return None
        await asyncio.sleep(timeout_s)
        return "bundle 1: its node 10.0.0.2 is gone"

    layouts.plan = plan
    policy = RestartPolicy(**{**REPLAN.__dict__, "stable_after_s": 0.3})
    sup = supervisor(
        Starts(full, full2, full3), policy, wait_for_placement=wait_for_placement, degraded=layouts
    )
    task = sup.launch()
    await wait_for(lambda: sup.state.last_probe_ok is not None)
    full.dead_reason = "ActorDiedError: its node has died"
    await wait_for(lambda: sup.session is smalls[0] and sup.state.last_probe_ok is not None)
    layouts.node_up = True
    await wait_for(lambda: sup.session is full2 and sup.state.last_probe_ok is not None)
    assert sup.failed_moves == 0 and sup.layout is None
    layouts.node_up = False
    full2.dead_reason = "ActorDiedError: its node has died again"  # before it was stable
    await wait_for(lambda: sup.session is smalls[1] and sup.state.last_probe_ok is not None)
    assert sup.failed_moves == 1
    assert sup.restore_interval_s() == 2 * policy.restore_check_s
    # A smaller engine that holds resets the restart count once and keeps the failed moves.
    with caplog.at_level(logging.INFO, logger="serve.watchdog"):
        await asyncio.sleep(3 * policy.stable_after_s)
    resets = [r for r in caplog.records if "restart count reset" in r.getMessage()]
    assert len(resets) == 1 and sup.attempt == 0 and sup.failed_moves == 1
    layouts.node_up = True
    await wait_for(lambda: sup.session is full3 and sup.state.last_probe_ok is not None)
    assert sup.failed_moves == 1  # not yet: the full engine has to stay up
    await wait_for(lambda: sup.failed_moves == 0)  # stable for stable_after_s
    assert sup.session is full3 and sup.layout is None
    task.cancel()


async def test_without_a_fitting_smaller_layout_the_restart_waits_for_the_node() -> None:
    full, full_again = FakeSession("full"), FakeSession("full2")
    layouts = FakeLayouts(None)  # the model does not fit the nodes left
    waited: list[float] = []

    async def wait_for_placement(timeout_s: float, on_wait) -> str | None:
        waited.append(timeout_s)
        await asyncio.sleep(0.05)  # the node comes back while waiting
        return None if len(waited) > 1 else "bundle 2: its node 10.0.0.2 is gone"

    sup = supervisor(
        Starts(full, full_again), REPLAN, wait_for_placement=wait_for_placement, degraded=layouts
    )
    task = sup.launch()
    await wait_for(lambda: sup.state.last_probe_ok is not None)
    full.dead_reason = "x"
    await wait_for(lambda: sup.session is full_again and sup.state.last_probe_ok is not None)
    assert layouts.plans == 1 and sup.layout is None
    assert waited == [REPLAN.replan_after_s, REPLAN.placement_wait_s - REPLAN.replan_after_s]
    assert [(r.attempt, r.outcome, r.layout) for r in sup.history] == [(1, "recovered", None)]
    task.cancel()


async def test_first_load_failure_is_final_and_not_a_health_check_failure() -> None:
    sup = supervisor(Starts(RuntimeError("bad model")))
    await asyncio.wait_for(sup.launch(), 5)
    assert sup.state.loading_error == "RuntimeError: bad model"
    assert sup.health_problem() is None  # a new replica would fail the same way
    assert not sup.state.healthy()[0]


async def test_health_check_fails_on_a_stale_probe_only_without_engine_output() -> None:
    now = [1000.0]
    session = FakeSession("a")
    sup = supervisor(Starts(), clock=lambda: now[0])
    sup.session = session
    sup.state.app = session.app
    sup.state.set_phase("serving", now=now[0])
    sup.state.last_probe_ok = now[0]
    limit = FAST.stale_probe_limit_s
    now[0] += limit - 1
    assert sup.health_problem() is None
    now[0] += 2
    session.output_at = now[0] - 1  # busy engine, slow probe: overload, not a hang
    assert sup.health_problem() is None
    session.output_at = None
    problem = sup.health_problem()
    assert problem is not None and "no successful test generation" in problem


# --- what clients see, through the real Gateway -----------------------------------------------


def stalling_app(
    first_token_sent: asyncio.Event, hang_entered: asyncio.Event | None = None
) -> Starlette:
    """vLLM stand-in whose streams and plain requests hang after the first token."""

    async def stream(request):
        async def events():
            yield b'data: {"choices": [{"delta": {"content": "a"}}]}\n\n'
            first_token_sent.set()
            await asyncio.sleep(3600)
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    async def hang(request):
        if hang_entered is not None:
            hang_entered.set()
        await asyncio.sleep(3600)

    async def ok(request):
        return JSONResponse({"ok": True})

    return Starlette(
        routes=[
            Route("/v1/completions", stream, methods=["POST"]),
            Route("/v1/embeddings", hang, methods=["POST"]),
            Route("/v1/chat/completions", ok, methods=["POST"]),
        ]
    )


def client(gateway: Gateway) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=gateway, raise_app_exceptions=False),
        base_url="http://test",
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=10,
    )


def assert_openai_error(payload: dict, status: int) -> dict:
    assert set(payload["error"]) == {"message", "type", "param", "code"}, payload
    assert payload["error"]["code"] == status
    assert payload["error"]["type"] == "service_unavailable_error"
    return payload["error"]


async def test_a_stall_ends_streams_and_requests_then_503_until_restarted() -> None:
    token, entered = asyncio.Event(), asyncio.Event()
    first = FakeSession("a", app=stalling_app(token, entered))
    second = FakeSession("b", app=stalling_app(asyncio.Event()))
    starts = Starts(first, second)
    state = ServerState()
    gateway = Gateway(state, api_keys=[KEY], retry_after_s=7)
    sup = Supervisor(state=state, policy=FAST, start=starts, end_in_flight=gateway.end_in_flight)
    sup.launch()
    requests: list[asyncio.Task] = []
    try:
        await wait_for(lambda: state.last_probe_ok is not None)
        async with client(gateway) as c:
            stream = asyncio.create_task(c.post("/v1/completions", json={}))
            plain = asyncio.create_task(c.post("/v1/embeddings", json={}))
            requests += (stream, plain)
            # Both requests are inside the engine before it counts them: the stall clock
            # starts then, however slowly this machine brought them there.
            await within(asyncio.gather(token.wait(), entered.wait()))
            assert gateway.in_flight == 2
            starts.gate = asyncio.Event()  # hold the restart, to look at the 503 contract
            began = time.monotonic()
            first.requests = 2  # what the engine tracks: the two requests above
            streamed, answered = await within(asyncio.gather(stream, plain))
            # Both ended at about the stall timeout (0.5 s before a first output), not at
            # their own pace.
            assert time.monotonic() - began < 2.0
            assert gateway.in_flight == 0

            assert streamed.status_code == 200
            events = [line[6:] for line in streamed.text.splitlines() if line.startswith("data: ")]
            assert events[-1] == "[DONE]"
            error = assert_openai_error(json.loads(events[-2]), 503)
            assert "restarting" in error["message"] and STALL in error["message"]

            assert answered.status_code == 503
            assert answered.headers["retry-after"] == "7"
            assert_openai_error(answered.json(), 503)

            # While there is no engine: 503 + Retry-After, /ready false, /health says why.
            await wait_for(lambda: starts.calls == 2)
            refused = await within(c.post("/v1/chat/completions", json=CHAT))
            assert refused.status_code == 503 and refused.headers["retry-after"] == "7"
            assert "attempt 1 of 3" in assert_openai_error(refused.json(), 503)["message"]
            ready = await within(c.get("/ready", headers={"Authorization": ""}))
            assert ready.status_code == 503
            health = await within(c.get("/health", headers={"Authorization": ""}))
            assert health.status_code == 503 and health.headers["retry-after"] == "7"
            body = health.json()
            assert body["status"] == "restarting"
            assert_openai_error(body, 503)
            engine = body["engine"]
            assert (engine["state"], engine["cause"], engine["attempt"]) == ("restarting", STALL, 1)
            assert engine["since"].endswith("+00:00") and "detail" not in engine
            # The free-text detail is for key holders only.
            keyed = (await within(c.get("/health"))).json()["engine"]
            assert "in flight" in keyed["detail"]
            assert [(r["cause"], r["attempt"], r["outcome"]) for r in body["restarts"]] == [
                (STALL, 1, "restarting")
            ]

            starts.gate.set()  # the new engine comes up
            await wait_for(lambda: state.ready()[0])
            assert (await within(c.post("/v1/chat/completions", json=CHAT))).status_code == 200
            health = (await within(c.get("/health"))).json()
            assert health["status"] == "ok" and health["engine"]["state"] == "serving"
            assert health["restarts"][0]["outcome"] == "recovered"
        assert first.closed
    finally:
        # Leave nothing running for the event loop's teardown, even when an assertion failed.
        for request in requests:
            request.cancel()
        await within(asyncio.gather(*requests, return_exceptions=True))
        await within(sup.aclose())


async def test_a_5xx_while_the_engine_is_gone_becomes_a_503() -> None:
    dead: dict[str, BaseException | None] = {"error": None}

    async def dies(request):  # the engine dies while this request runs
        dead["error"] = RuntimeError("core exited")
        return JSONResponse({"error": {"message": "EngineDeadError"}}, status_code=500)

    state = ServerState(app=Starlette(routes=[Route("/v1/models", dies)]))
    state.engine_error = lambda: dead["error"]
    gateway = Gateway(state, api_keys=[KEY], retry_after_s=4)
    async with client(gateway) as c:
        during = await c.get("/v1/models")
        after = await c.get("/v1/models")  # seen before the app runs
    for answer in (during, after):
        assert answer.status_code == 503 and answer.headers["retry-after"] == "4"
        assert "core exited" in assert_openai_error(answer.json(), 503)["message"]


async def test_vllms_own_error_event_becomes_the_503_event_when_the_engine_died() -> None:
    dead: dict[str, BaseException | None] = {"error": None}

    async def stream(request):
        async def events():
            yield b'data: {"n": 1}\n\n'
            dead["error"] = RuntimeError("core exited")
            yield b'data: {"error": {"message": "EngineCore encountered an issue", "code": 500}}\n\n'
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    state = ServerState(app=Starlette(routes=[Route("/v1/models", stream)]))
    state.engine_error = lambda: dead["error"]
    async with client(Gateway(state, api_keys=[KEY])) as c:
        response = await c.get("/v1/models")
    events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
    assert events[0] == '{"n": 1}' and events[-1] == "[DONE]"
    assert "core exited" in assert_openai_error(json.loads(events[1]), 503)["message"]
