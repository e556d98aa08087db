"""Engine supervision inside the replica: fault detection, in-process restarts, restart history.

No vLLM here: the supervisor drives an `EngineSession` (serve/app.py builds the real one from
vLLM; the unit tests use fakes), so the detection and restart logic is testable without an
engine. What it does, and why in-process, is in docs/RELIABILITY.md.

Faults, each recorded with its cause:
- ``engine_dead``: the engine reports itself dead (vLLM's EngineDeadError: the engine core
  process exited, or a Ray worker actor of the tp × pp group died);
- ``stall``: requests in flight (client requests or the readiness probe) and no engine output
  for ``stall_timeout_s`` seconds (every engine step sends one, a prefill chunk included);
- ``probe_failing``: the one-token readiness probe raised an error several times in a row
  (a probe that only times out while the engine keeps producing output is overload, not a fault).

On a fault the supervisor ends every request in flight (503 / an SSE error event), tears the
whole engine down (engine core, all of its Ray workers) and builds a fresh one in the same
replica and placement group, with capped exponential backoff between attempts. Before each
attempt it waits, without counting an attempt, until every bundle of the placement group is on a
live node (a lost node coming back). When the attempts run out it gives up; `health_problem()`
then makes Ray Serve's health check fail, and Serve replaces the replica (a new process and a
new placement group).

With degraded serving on (``--on-node-loss replan``), a node that is not back within
``replan_after_s`` makes the restart start a smaller layout on the live nodes; once every node
of the full layout is live again, a planned restart (``node_returned``) moves back to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, TypeVar

from serve.api import ENGINE_RESTARTS, ASGIApp, ServerState

logger = logging.getLogger(__name__)

T = TypeVar("T")

ENGINE_DEAD = "engine_dead"
STALL = "stall"
PROBE_FAILING = "probe_failing"
# Not a fault: the lost node is back, so a degraded engine moves back to the full layout.
NODE_RETURNED = "node_returned"

# Consecutive probe errors that count as a fault.
PROBE_ERRORS_TO_RESTART = 3
# A probe slower than this counts as failed for /ready (not as a fault: see module doc).
PROBE_TIMEOUT_S = 60.0
# Least stall limit before a fresh engine's first output (first-step warm-up).
FIRST_OUTPUT_GRACE_S = 30.0
# After this long ready without a fault, the next fault starts again at attempt 1.
STABLE_AFTER_S = 600.0
# How long tearing an engine down may take before the supervisor goes on without it.
CLOSE_TIMEOUT_S = 60.0
# Restart history entries kept (oldest dropped first).
HISTORY_LIMIT = 50
# How long a cancelled probe (or a timed-out probe / teardown) gets to unwind before the
# supervisor goes on without waiting for it.
UNWIND_TIMEOUT_S = 5.0
# How long a restart waits for its placement group's bundles to be on live nodes (a lost node
# coming back); past it the replica hands over to Ray Serve, whose new replica brings a new
# placement group (Ray can leave a group stuck rescheduling on a returned node: see
# docs/RELIABILITY.md).
PLACEMENT_WAIT_S = 120.0
# With degraded serving on: how long a restart waits for a lost node before it serves with the
# smaller layout (a node whose Ray crashed is usually back well within this), and how often a
# degraded engine checks whether the node is back.
REPLAN_AFTER_S = 30.0
RESTORE_CHECK_S = 10.0


def restart_delay(attempt: int, base_s: float, cap_s: float) -> float:
    """Seconds to wait before restart attempt ``attempt`` (1-based): none before the first,
    then base, 2 × base, 4 × base, ..., never more than the cap."""
    if attempt <= 1:
        return 0.0
    return min(cap_s, base_s * 2.0 ** (attempt - 2))


class StallDetector:
    """Requests in flight and no engine output for ``timeout_s`` seconds is a stall.

    Fed by polling: ``check(now, in_flight, last_output)``. The quiet time counts from the last
    output, or from when the engine was first seen busy if that is later (an engine idle for an
    hour is not stalled the moment a request arrives). Before a fresh engine's first output the
    limit is at least ``first_output_s``: the first step after a load can warm up (lazy kernel
    compilation, first collectives). ``timeout_s`` 0 turns it off.
    """

    def __init__(self, timeout_s: float, first_output_s: float = FIRST_OUTPUT_GRACE_S) -> None:
        self.timeout_s = timeout_s
        self.first_output_s = max(timeout_s, first_output_s)
        self._busy_since: float | None = None

    def check(self, now: float, in_flight: int, last_output: float | None) -> str | None:
        """A description of the stall, or None when the engine is idle or making progress."""
        if self.timeout_s <= 0 or in_flight <= 0:
            self._busy_since = None
            return None
        if self._busy_since is None:
            self._busy_since = now
        quiet_from = self._busy_since if last_output is None else max(self._busy_since, last_output)
        quiet = now - quiet_from
        limit = self.first_output_s if last_output is None else self.timeout_s
        if quiet < limit:
            return None
        return (
            f"no engine output for {quiet:.1f}s with {in_flight} request(s) in flight "
            f"(stall timeout {limit:g}s{'' if last_output is not None else ', first output'})"
        )


@dataclass(frozen=True)
class RestartPolicy:
    """When a fault counts, and how restarts are paced."""

    stall_timeout_s: float = 60.0
    first_output_grace_s: float = FIRST_OUTPUT_GRACE_S
    max_attempts: int = 5
    backoff_s: float = 5.0
    backoff_max_s: float = 300.0
    probe_interval_s: float = 10.0
    # While no request produces output the interval doubles after each probe up to this (never
    # below probe_interval_s): every probe is an engine step, and after each step vLLM's CPU
    # worker busy-waits for a second (benchmarks/bench_idle_probe.py).
    probe_idle_interval_s: float = 60.0
    probe_timeout_s: float = PROBE_TIMEOUT_S
    probe_errors: int = PROBE_ERRORS_TO_RESTART
    poll_s: float = 0.5
    stable_after_s: float = STABLE_AFTER_S
    placement_wait_s: float = PLACEMENT_WAIT_S
    replan_after_s: float = REPLAN_AFTER_S
    restore_check_s: float = RESTORE_CHECK_S

    @property
    def longest_probe_interval_s(self) -> float:
        """The most time between two probes (the idle one, never below the base one)."""
        return max(self.probe_interval_s, self.probe_idle_interval_s)

    def next_probe_interval_s(self, current: float, *, output_seen: bool) -> float:
        """The wait before the next probe: the base interval after output from real requests
        (or a failed probe), else twice ``current``, up to the idle interval."""
        if output_seen:
            return self.probe_interval_s
        return min(max(2.0 * current, self.probe_interval_s), self.longest_probe_interval_s)

    @property
    def stale_probe_limit_s(self) -> float:
        """A probe older than this, on an engine that produces nothing, means the supervisor
        itself failed to act (check_health then hands the replica to Ray Serve)."""
        return (
            self.longest_probe_interval_s
            + self.probe_timeout_s
            + max(self.stall_timeout_s, self.first_output_grace_s, 0.0)
            + 10 * self.poll_s
            + 30.0
        )


# wait_for_placement(timeout_s, on_wait): until the engine's placement is usable again; None
# when it is, else why not (after timeout_s). on_wait gets each reason while it waits.
PlacementWait = Callable[[float, Callable[[str], None]], Awaitable[str | None]]


class DegradedLayouts(Protocol):
    """Serving on fewer nodes while one is lost (``--on-node-loss replan``)."""

    async def plan(self) -> tuple[str, Callable[[], Awaitable[EngineSession]]] | None:
        """The smaller layout placed on the live nodes (its description, how to start it), or
        None when there is none (the model does not fit, or the live nodes cannot hold it)."""

    async def all_back(self) -> bool:
        """Are the nodes of the full layout live again, with room for it?"""


class EngineSession(Protocol):
    """One running engine and vLLM's OpenAI app bound to it."""

    app: ASGIApp

    def dead(self) -> str | None:
        """The engine's fatal error, or None while it lives."""

    def in_flight(self) -> int:
        """Requests the engine tracks (running + waiting), the probe included."""

    def last_output(self) -> float | None:
        """time.monotonic() of the last output the engine sent, None before the first."""

    async def probe(self) -> None:
        """One tiny generation end to end."""

    async def close(self) -> None:
        """Tear the engine down: engine core and every worker of the tp × pp group."""


@dataclass
class RestartRecord:
    """One restart attempt, as /health and the controller show it."""

    cause: str
    detail: str
    time: float  # wall clock when the attempt started
    attempt: int
    # restarting | recovered | failed | gave_up (Serve replaces the replica) | interrupted
    outcome: str = "restarting"
    error: str | None = None
    down_s: float | None = None  # from the fault to the first good probe (recovered)
    layout: str | None = None  # the smaller layout this attempt started, None: the full one

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["time"] = iso_time(self.time)
        return data


def iso_time(wall: float | None) -> str | None:
    """UTC ISO 8601 with seconds, or None."""
    if wall is None:
        return None
    return dt.datetime.fromtimestamp(wall, dt.timezone.utc).isoformat(timespec="seconds")


@dataclass
class _Fault:
    cause: str
    detail: str
    wall: float
    mono: float


@dataclass
class Supervisor:
    """Runs the engine: first load, then watch → (fault) → restart → watch, until it gives up."""

    state: ServerState
    policy: RestartPolicy
    start: Callable[[], Awaitable[EngineSession]]
    end_in_flight: Callable[[str], int]
    history: list[RestartRecord] = field(default_factory=list)
    on_history: Callable[[list[dict[str, Any]]], None] | None = None
    wait_for_placement: PlacementWait | None = None
    degraded: DegradedLayouts | None = None
    layout: str | None = None  # the smaller layout being served, None: the full one
    clock: Callable[[], float] = time.monotonic
    wall: Callable[[], float] = time.time
    session: EngineSession | None = None
    attempt: int = 0  # restart attempts since the engine was last stable
    _probe_errors: int = 0
    _probe_fault: str | None = None
    _ready_since: float | None = None
    _pending: RestartRecord | None = None
    _pending_fault: _Fault | None = None
    _restore_fault: str | None = None
    # Moves back to the full layout in a row that failed: ended on the smaller layout again,
    # or the full engine they started had a fault before it was stable (the node looked back,
    # then was not). Each doubles the wait before the next check; a stable engine resets it.
    failed_moves: int = 0
    _unproven_move: bool = False  # the full engine comes from a move back, not yet stable
    _task: asyncio.Task | None = None

    def __post_init__(self) -> None:
        self.state.max_attempts = self.policy.max_attempts
        self.state.restart_history = lambda: [r.as_json() for r in self.history]

    # -- lifecycle ----------------------------------------------------------------------------

    def launch(self) -> asyncio.Task:
        """Start `run()` as a task (kept, so `health_problem` can see it end)."""
        self._task = asyncio.create_task(self.run())
        return self._task

    async def run(self) -> None:
        """First load (a failure there is final: a broken config does not get better), then
        supervise until the restarts run out."""
        try:
            session = await self.start()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            logger.exception("the engine failed to start")
            self.state.loading_error = f"{type(exc).__name__}: {exc}"
            return
        while session is not None:
            self._serve(session)
            fault = await self._watch(session)
            session = await self._restart(session, fault)

    async def aclose(self) -> None:
        """Stop supervising and tear the engine down (replica shutdown)."""
        if self._task is not None:
            self._task.cancel()
            await _settle(self._task, CLOSE_TIMEOUT_S, "the engine supervisor")
        if self.session is not None:
            session, self.session = self.session, None
            await self._close(session)

    def health_problem(self) -> str | None:
        """Why Ray Serve should replace this replica, or None.

        - the restarts ran out (phase failed);
        - the supervisor task ended unexpectedly;
        - the probe is stale past what the watchdog needs to act, on an engine that is not
          producing output either (so the watchdog failed to notice).
        A first load that failed is not a reason: a new replica would fail the same way.
        """
        if self.state.phase == "failed":
            return f"engine restarts exhausted: {self.state.detail}"
        task = self._task
        if task is not None and task.done() and self.state.loading_error is None:
            if task.cancelled():
                return "engine supervisor was cancelled"
            exc = task.exception()
            if exc is not None:
                return f"engine supervisor crashed: {type(exc).__name__}: {exc}"
        session = self.session
        if self.state.phase != "serving" or session is None or self.state.app is None:
            return None
        now = self.clock()
        reference = self.state.last_probe_ok or self._ready_since or self.state.phase_since_mono
        limit = self.policy.stale_probe_limit_s
        if reference is None or now - reference <= limit:
            return None
        last_output = session.last_output()
        if last_output is not None and now - last_output <= limit:
            return None  # slow probe on a busy engine: overload, not a hang
        return f"no successful test generation for {now - reference:.0f}s and no engine output"

    # -- serving ------------------------------------------------------------------------------

    def _serve(self, session: EngineSession) -> None:
        self.session = session
        self._probe_errors = 0
        self._probe_fault = None
        self._ready_since = None
        self.state.engine_error = lambda: _err(session.dead())
        self.state.last_probe_ok = None
        self.state.last_probe_error = None
        self.state.app = session.app
        self.state.set_phase("serving", now=self.clock(), wall=self.wall())

    async def _watch(self, session: EngineSession) -> _Fault:
        """Poll the engine until a fault; the probe runs alongside."""
        detector = StallDetector(self.policy.stall_timeout_s, self.policy.first_output_grace_s)
        stop = asyncio.Event()
        probe = asyncio.create_task(self._probe_loop(session, stop))
        self._restore_fault = None
        restore = (
            asyncio.create_task(self._restore_loop(stop))
            if self.layout is not None and self.degraded is not None
            else None
        )
        try:
            while True:
                await asyncio.sleep(self.policy.poll_s)
                now = self.clock()
                if (dead := session.dead()) is not None:
                    return self._fault(ENGINE_DEAD, dead)
                stall = detector.check(now, session.in_flight(), session.last_output())
                if stall is not None:
                    return self._fault(STALL, stall)
                if self._probe_fault is not None:
                    return self._fault(PROBE_FAILING, self._probe_fault)
                if self._restore_fault is not None:
                    return self._fault(NODE_RETURNED, self._restore_fault)
                # A full engine that holds also ends a run of failed moves back; a smaller
                # one keeps it (the lost node is still away).
                moved_back = self.layout is None and (self.failed_moves or self._unproven_move)
                if (
                    (self.attempt or moved_back)
                    and self._ready_since is not None
                    and now - self._ready_since >= self.policy.stable_after_s
                ):
                    logger.info(
                        "engine stable for %.0fs: restart count reset", now - self._ready_since
                    )
                    self.attempt = 0
                    self.state.attempt = 0
                    self.failed_moves = 0 if moved_back else self.failed_moves
                    self._unproven_move = False if moved_back else self._unproven_move
        finally:
            # Bounded, and the flag as well as the cancel: a probe that swallows its
            # cancellation must neither hold the restart (and the requests in flight) up nor
            # record anything about this engine afterwards.
            stop.set()
            probe.cancel()
            await _settle(probe, UNWIND_TIMEOUT_S, "the readiness probe")
            if restore is not None:
                restore.cancel()
                await _settle(restore, UNWIND_TIMEOUT_S, "the check for the lost node")

    def _fault(self, cause: str, detail: str) -> _Fault:
        logger.error("engine fault (%s): %s", cause, detail)
        return _Fault(cause, detail, self.wall(), self.clock())

    async def _probe_loop(self, session: EngineSession, stop: asyncio.Event) -> None:
        """Keep /ready honest and count errors, until ``stop`` is set (the engine is being
        replaced): a one-token generation, unless real requests produced output since the last
        check (that proves the engine as well); spaced out while the engine is idle."""
        policy = self.policy
        interval = policy.probe_interval_s
        checked_at: float | None = None  # clock() when the last check ended
        while not stop.is_set():
            output = session.last_output()
            if checked_at is not None and output is not None and output > checked_at:
                self._probe_ok()
                checked_at = self.clock()
                interval = policy.next_probe_interval_s(interval, output_seen=True)
                await asyncio.sleep(interval)
                continue
            ok = False
            try:
                await _wait_for(session.probe(), policy.probe_timeout_s)
            except asyncio.CancelledError:
                raise
            except asyncio.TimeoutError:
                if stop.is_set():
                    return
                self.state.last_probe_error = f"timed out after {policy.probe_timeout_s:g}s"
                logger.warning("readiness probe %s", self.state.last_probe_error)
            except Exception as exc:
                if stop.is_set():
                    return
                self.state.last_probe_error = f"{type(exc).__name__}: {exc}"
                self._probe_errors += 1
                logger.warning(
                    "readiness probe failed (%d in a row): %s",
                    self._probe_errors,
                    self.state.last_probe_error,
                )
                if self._probe_errors >= policy.probe_errors:
                    self._probe_fault = (
                        f"{self._probe_errors} probes in a row failed, last: "
                        f"{self.state.last_probe_error}"
                    )
            else:
                if stop.is_set():
                    return
                self._probe_ok()
                ok = True
            # The probe's own output came before this: only later output is a real request's.
            checked_at = self.clock()
            # A failed probe is retried at the base interval.
            interval = policy.next_probe_interval_s(interval, output_seen=not ok)
            await asyncio.sleep(interval)

    async def _restore_loop(self, stop: asyncio.Event) -> None:
        """While serving with a smaller layout: every `restore_interval_s`, is the lost node
        back? Then ask for the move back to the full layout (``_watch`` acts on it)."""
        assert self.degraded is not None
        while not stop.is_set():
            await asyncio.sleep(self.restore_interval_s())
            try:
                back = await self.degraded.all_back()
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.warning("could not check whether the lost node is back", exc_info=True)
                continue
            if back and not stop.is_set():
                self._restore_fault = (
                    f"every node of the full layout is back: moving from {self.layout} to it"
                )
                return

    def restore_interval_s(self) -> float:
        """How long a degraded engine waits between checks for the lost node: doubled by each
        move back that failed, capped at the restart backoff's cap."""
        policy = self.policy
        interval = policy.restore_check_s * 2.0 ** min(self.failed_moves, 32)
        return min(interval, max(policy.backoff_max_s, policy.restore_check_s))

    def _failed_move(self) -> None:
        self.failed_moves += 1
        logger.warning(
            "the move back to the full layout failed (%d in a row): next check for the lost "
            "node in %.0fs",
            self.failed_moves,
            self.restore_interval_s(),
        )

    def _probe_ok(self) -> None:
        now = self.clock()
        self.state.last_probe_ok = now
        self.state.last_probe_error = None
        self._probe_errors = 0
        if self._ready_since is None:
            self._ready_since = now
        if self._pending is not None and self._pending_fault is not None:
            self._pending.outcome = "recovered"
            self._pending.down_s = round(now - self._pending_fault.mono, 1)
            logger.info(
                "engine recovered (%s) after %.1fs, attempt %d",
                self._pending.cause,
                self._pending.down_s,
                self._pending.attempt,
            )
            self._pending = None
            self._pending_fault = None
            self._save_history()

    # -- restarting ---------------------------------------------------------------------------

    async def _restart(self, session: EngineSession, fault: _Fault) -> EngineSession | None:
        """End what is in flight, tear the engine down, build a new one (with backoff);
        None when the attempts ran out."""
        if self._pending is not None:  # the previous restart never reached a good probe
            self._pending.outcome = "failed"
            self._pending.error = f"{fault.cause}: {fault.detail}"
            self._pending = None
        self._pending_fault = fault
        if fault.cause == NODE_RETURNED:
            self.attempt = 0  # a planned move back, not a failure
        elif self._unproven_move:  # the full engine of a move back failed before it was stable
            self._unproven_move = False
            self._failed_move()
        ENGINE_RESTARTS.labels(cause=fault.cause).inc()
        self.state.app = None
        self.state.engine_error = lambda: None
        self.state.cause, self.state.detail = fault.cause, fault.detail
        self.state.last_restart_error = None
        self.state.set_phase("restarting", now=fault.mono, wall=fault.wall)
        self.state.attempt = self.attempt + 1
        ended = self.end_in_flight(
            f"the engine is restarting ({fault.cause}: {fault.detail}); retry the request"
        )
        logger.warning("ended %d request(s) in flight; tearing the engine down", ended)
        self.session = None
        await self._close(session)
        while True:
            self.attempt += 1
            self.state.attempt = self.attempt
            if self.attempt > self.policy.max_attempts:
                self.attempt = self.policy.max_attempts
                self._give_up(
                    fault,
                    f"gave up after {self.policy.max_attempts} restart attempt(s)",
                    "restarts exhausted",
                )
                return None
            delay = restart_delay(self.attempt, self.policy.backoff_s, self.policy.backoff_max_s)
            self.state.next_attempt_wall = self.wall() + delay
            if delay:
                logger.warning("restart attempt %d in %.0fs", self.attempt, delay)
                await asyncio.sleep(delay)
            planned = await self._placement_and_layout(fault)
            if planned is None:
                self._give_up(
                    fault,
                    "the placement group did not get every bundle on a live node within "
                    f"{self.policy.placement_wait_s:g}s",
                    "placement group not whole: a new one comes with the new replica",
                )
                return None
            start, layout = planned
            record = RestartRecord(fault.cause, fault.detail, self.wall(), self.attempt)
            record.layout = layout
            self._record(record)
            logger.warning(
                "restarting the engine, attempt %d of %d (%s)",
                self.attempt,
                self.policy.max_attempts,
                fault.cause,
            )
            try:
                new = await start()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.exception("restart attempt %d failed", self.attempt)
                record.outcome = "failed"
                record.error = f"{type(exc).__name__}: {exc}"
                self.state.last_restart_error = record.error
                self._save_history()
                continue
            self._pending = record
            self.state.next_attempt_wall = None
            self.layout = layout
            if fault.cause == NODE_RETURNED:
                if layout is None:
                    self._unproven_move = True
                else:
                    self._failed_move()
            if layout is not None:
                self.state.detail = (
                    f"{fault.detail}; serving with the smaller layout {layout} until the lost "
                    "node is back"
                )
            return new

    def _give_up(self, fault: _Fault, why: str, error: str) -> None:
        """Phase failed: ``check_health`` fails, and Ray Serve replaces the replica (a new
        process and a new placement group)."""
        self.state.attempt = self.attempt
        self.state.detail = f"{why}; last fault {fault.cause}: {fault.detail}"
        self.state.set_phase("failed", now=self.clock(), wall=self.wall())
        self._record(
            RestartRecord(
                fault.cause,
                fault.detail,
                self.wall(),
                self.attempt,
                outcome="gave_up",
                error=f"{error}: Ray Serve replaces the replica",
            )
        )
        logger.error("%s; Ray Serve will replace the replica", self.state.detail)
        self._pending_fault = None

    async def _placement_and_layout(
        self, fault: _Fault
    ) -> tuple[Callable[[], Awaitable[EngineSession]], str | None] | None:
        """Wait for the placement group; how to start the engine and the smaller layout it
        uses (None: the full one), or None when the placement group did not get whole within
        ``placement_wait_s`` (a new replica brings a new one). With degraded serving, a node
        that is not back within ``replan_after_s`` makes the engine start with the smaller
        layout, if one fits."""
        policy = self.policy
        if self.degraded is None:
            if not await self._await_placement(fault, policy.placement_wait_s):
                return None
            return self.start, None
        if await self._await_placement(fault, policy.replan_after_s):
            return self.start, None
        try:
            planned = await self.degraded.plan()
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("could not plan a smaller layout; waiting for the lost node")
            planned = None
        if planned is not None:
            layout, start = planned
            logger.warning("a node is lost: serving with the smaller layout %s", layout)
            return start, layout
        logger.warning("no smaller layout fits the live nodes: waiting for the lost node")
        if not await self._await_placement(
            fault, max(0.0, policy.placement_wait_s - policy.replan_after_s)
        ):
            return None
        return self.start, None

    async def _await_placement(self, fault: _Fault, timeout_s: float) -> bool:
        """Before an attempt: wait (not counted as an attempt) until the placement group's
        bundles sit on live nodes, saying which node it waits for in the restart's detail.
        False when they did not within ``timeout_s``."""
        if self.wait_for_placement is None:
            return True
        seen: list[str] = []

        def waiting(reason: str) -> None:
            self.state.detail = f"{fault.detail}; {reason}"
            if not seen or seen[-1] != reason:
                logger.warning("restart attempt %d is %s", self.attempt, reason)
                seen.append(reason)

        try:
            left = await self.wait_for_placement(timeout_s, waiting)
        except asyncio.CancelledError:
            raise
        except Exception:  # the check itself broke: the attempt shows whether the group is whole
            logger.exception("could not check the placement group; restarting anyway")
            left = None
        self.state.detail = fault.detail
        if left is not None:
            logger.warning("placement still not usable after %.0fs: %s", timeout_s, left)
            return False
        if seen:
            logger.info("every bundle of the placement group is on a live node again")
        return True

    async def _close(self, session: EngineSession) -> None:
        try:
            await _wait_for(session.close(), CLOSE_TIMEOUT_S)
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("tearing the engine down failed; going on without it")

    def _record(self, record: RestartRecord) -> None:
        self.history.append(record)
        del self.history[:-HISTORY_LIMIT]
        self._save_history()

    def _save_history(self) -> None:
        if self.on_history is None:
            return
        try:
            self.on_history([r.as_json() for r in self.history])
        except Exception:
            logger.exception("could not store the restart history")


def history_from_json(items: Any) -> list[RestartRecord]:
    """Restart records back from their JSON form (a stored history); bad entries are skipped."""
    records = []
    for item in items if isinstance(items, list) else []:
        with contextlib.suppress(Exception):
            wall = dt.datetime.fromisoformat(item["time"]).timestamp()
            records.append(
                RestartRecord(
                    cause=str(item["cause"]),
                    detail=str(item.get("detail", "")),
                    time=wall,
                    attempt=int(item["attempt"]),
                    outcome=(
                        "interrupted"
                        if item.get("outcome", "restarting") == "restarting"
                        else str(item["outcome"])
                    ),
                    error=item.get("error"),
                    down_s=item.get("down_s"),
                    layout=item.get("layout"),
                )
            )
    return records[-HISTORY_LIMIT:]


def _err(reason: str | None) -> BaseException | None:
    return None if reason is None else RuntimeError(reason)


async def _wait_for(aw: Awaitable[T], timeout_s: float) -> T:
    """``asyncio.wait_for`` that never swallows a cancellation.

    Before Python 3.12, ``asyncio.wait_for`` returns the result instead of raising when the
    task awaiting it is cancelled in the same loop step as the awaited work finishes: the
    cancellation is lost and the task runs on (a probe loop that never stops). Here a
    cancellation always propagates (and cancels the work); on timeout the work is cancelled,
    given a bounded moment to unwind, and ``asyncio.TimeoutError`` raised.
    """
    task = asyncio.ensure_future(aw)
    try:
        done, _ = await asyncio.wait((task,), timeout=timeout_s)
    except BaseException:
        task.cancel()
        task.add_done_callback(_retrieve)
        raise
    if not done:
        task.cancel()
        await _settle(task, UNWIND_TIMEOUT_S, "work past its timeout")
        raise asyncio.TimeoutError
    return task.result()


async def _settle(task: asyncio.Future, timeout_s: float, what: str) -> None:
    """Wait (at most ``timeout_s``) for a cancelled task to end. Never raises for the task's
    own outcome; the caller's cancellation still propagates."""
    task.add_done_callback(_retrieve)
    if task.done():
        return
    await asyncio.wait((task,), timeout=timeout_s)
    if not task.done():
        logger.error(
            "%s did not stop %gs after being cancelled; going on without it", what, timeout_s
        )


def _retrieve(task: asyncio.Future) -> None:
    """Mark a finished task's outcome as seen (no "exception was never retrieved" noise)."""
    if not task.cancelled():
        task.exception()
