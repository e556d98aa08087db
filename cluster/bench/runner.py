"""Drives the load: probes each endpoint, runs warm-up and measured phases, interleaves endpoints."""

from __future__ import annotations

import asyncio
import contextlib
import math
import platform
import random
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Protocol

import aiohttp

from cluster import __version__
from cluster.bench.client import CONNECT, RequestRecord, send_request
from cluster.bench.config import BenchConfig, Endpoint, LoadPoint, tls_context
from cluster.bench.metrics import PointMetrics, aggregate, ratios
from cluster.bench.tokenizer import LocalTokenizer, find_tokenizer
from cluster.bench.workload import BenchRequest, Workload, load_workload, session_turns
from cluster.errors import ConfigError

MULTI_TOKEN_CHUNK_WARN = 1.05  # mean tokens per chunk above this gets a warning
# A closed-loop user whose connection was refused (nothing listening: a server restarting)
# waits before trying again, this long at first, doubling up to the cap, as the OpenAI SDKs do;
# re-sending at once would spin on the cores the restarting server needs.
CONNECT_BACKOFF_FIRST_S = 0.1
CONNECT_BACKOFF_MAX_S = 1.0


class PointObserver(Protocol):
    """Hook around every measured phase; its columns join the table, JSON and CSV.

    Used for figures the client cannot see itself, e.g. network bytes per node: read counters in
    ``phase_started``/``phase_finished`` (called once per endpoint, point and round), return the
    figures for the whole point in ``columns`` (e.g. kB sent per output token).
    """

    def phase_started(self, endpoint: Endpoint, point: LoadPoint, round_index: int) -> None:
        """A measured phase is about to start."""

    def phase_finished(self, endpoint: Endpoint, point: LoadPoint, round_index: int) -> None:
        """A measured phase has ended (all its requests finished)."""

    def columns(
        self, endpoint: Endpoint, point: LoadPoint, metrics: PointMetrics
    ) -> dict[str, float]:
        """Extra figures for this endpoint and point, named as they should appear in outputs."""
        ...


@dataclass
class EndpointInfo:
    """What the probe learned about one endpoint."""

    name: str
    base_url: str
    model: str
    ignore_eos: str  # accepted | rejected | off | unverified (probe failed: sent anyway)
    usage: str  # server | absent | unknown
    stream_options: bool = True
    probe_error: str | None = None


@dataclass
class BenchResult:
    """Everything a run produced: configuration, endpoint facts, figures, ratios, warnings."""

    config: dict[str, Any]
    endpoints: list[EndpointInfo]
    points: list[PointMetrics]
    ratios: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    records: list[RequestRecord] = field(default_factory=list)
    environment: dict[str, Any] = field(default_factory=dict)
    started_at: str = ""
    wall_s: float = 0.0

    @property
    def all_failed(self) -> bool:
        """True when no measured request succeeded (the CLI then exits non-zero)."""
        return sum(p.completed for p in self.points) == 0

    def point(self, endpoint: str, label: str) -> PointMetrics:
        """The figures of one endpoint at one sweep point (KeyError if absent)."""
        for p in self.points:
            if p.endpoint == endpoint and p.point == label:
                return p
        raise KeyError((endpoint, label))

    def summary(self) -> str:
        """A few plain lines: per point and endpoint, tokens/s, TTFT and TPOT medians, errors."""
        lines = []
        for p in self.points:
            err = f", {p.failed} failed" if p.failed else ""
            lines.append(
                f"{p.endpoint} {p.point}: {p.output_throughput:.1f} output tok/s, "
                f"{p.request_throughput:.2f} req/s, TTFT p50 {p.ttft_ms.p50:.1f} ms, "
                f"TPOT p50 {p.tpot_ms.p50:.2f} ms ({p.completed}/{p.requests} ok{err})"
            )
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready result (no API keys anywhere)."""
        return {
            "started_at": self.started_at,
            "wall_s": self.wall_s,
            "environment": self.environment,
            "config": self.config,
            "endpoints": [vars(e) for e in self.endpoints],
            "points": [p.to_dict() for p in self.points],
            "ratios": self.ratios,
            "warnings": self.warnings,
            "notes": self.notes,
        }


def arrival_offsets(
    rate: float,
    *,
    burstiness: float,
    rng: random.Random,
    count: int | None,
    horizon_s: float | None,
) -> list[float]:
    """Send times (s from phase start) of an open-loop phase: gamma inter-arrivals, mean 1/rate.

    burstiness 1 gives a Poisson process; lower values are burstier, higher ones steadier. An
    infinite rate sends everything at once.
    """
    if count is None and horizon_s is None:
        raise ValueError("need a count or a horizon")
    if math.isinf(rate):
        return [0.0] * (count if count is not None else 1)
    offsets: list[float] = []
    t = 0.0
    scale = 1.0 / (rate * burstiness)
    while True:
        t += rng.gammavariate(burstiness, scale)
        if horizon_s is not None and t > horizon_s:
            break
        offsets.append(t)
        if count is not None and len(offsets) >= count:
            break
    return offsets


@dataclass
class _Plan:
    """Resolved run settings per endpoint, after the probe."""

    endpoint: Endpoint
    info: EndpointInfo


ProgressHook = Callable[[str, int | None, float | None], Callable[[], None]]


async def run_benchmark_async(
    config: BenchConfig,
    *,
    observers: Sequence[PointObserver] = (),
    progress: ProgressHook | None = None,
    keep_records: bool = True,
    tokenizer: LocalTokenizer | None = None,
) -> BenchResult:
    """Run the whole benchmark (every point, endpoint and round) and return its figures.

    ``progress(label, total_requests, total_seconds)`` may return a callable invoked once per
    finished request; request failures are counted, never raised.
    """
    wall0 = time.perf_counter()
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    wl_cfg, load = config.workload, config.load
    if tokenizer is None:
        tokenizer = find_tokenizer(
            wl_cfg.tokenizer or config.endpoints[0].model, explicit=wl_cfg.tokenizer
        )
    workload = load_workload(wl_cfg, tokenizer=tokenizer)
    max_conc = max(load.concurrency)
    if load.request_rate and load.num_requests:
        max_conc = max(max_conc, load.num_requests)
    # Each request's own limit is load.timeout_s (send_request); the session bounds connecting.
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=min(30.0, load.timeout_s))
    result = BenchResult(config=config.public_dict(), endpoints=[], points=[], started_at=started)
    result.notes.extend(workload.notes)
    result.environment = {
        "llamacluster": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "aiohttp": aiohttp.__version__,
        "tokenizer": str(tokenizer.path) if tokenizer else None,
    }
    connector = aiohttp.TCPConnector(
        limit=max_conc + 8, ttl_dns_cache=300, ssl=tls_context(config.endpoints)
    )
    async with aiohttp.ClientSession(
        connector=connector, timeout=timeout, trust_env=False, raise_for_status=False
    ) as client:
        plans = []
        for ep in config.endpoints:
            info = await _probe(client, ep, config=config, workload=workload)
            plans.append(_Plan(ep, info))
            result.endpoints.append(info)
        for p_index, point in enumerate(load.points()):
            per_ep: dict[str, list[RequestRecord]] = {pl.endpoint.name: [] for pl in plans}
            per_ep_dur: dict[str, float] = dict.fromkeys(per_ep, 0.0)
            for r in range(load.rounds):
                for pl in plans:
                    if r == 0:
                        await _warmup(client, pl, point, p_index, config=config, workload=workload)
                    for obs in observers:
                        obs.phase_started(pl.endpoint, point, r)
                    recs, dur = await _phase(
                        client,
                        pl,
                        point,
                        config=config,
                        workload=workload,
                        base_index=p_index * 10_000_000 + r * 1_000_000,
                        rng_seed=(wl_cfg.seed, p_index, r),
                        label=f"{pl.endpoint.name} {point.label}"
                        + (f" round {r + 1}/{load.rounds}" if load.rounds > 1 else ""),
                        progress=progress,
                        round_index=r,
                    )
                    for obs in observers:
                        obs.phase_finished(pl.endpoint, point, r)
                    per_ep[pl.endpoint.name].extend(recs)
                    per_ep_dur[pl.endpoint.name] += dur
            base_metrics: PointMetrics | None = None
            for pl in plans:
                name = pl.endpoint.name
                m = aggregate(
                    per_ep[name],
                    endpoint=name,
                    point=point.label,
                    x=point.x_value,
                    mode=point.mode,
                    duration_s=per_ep_dur[name],
                    slo=config.slo,
                    cost_per_hour=config.cost_per_hour,
                )
                for obs in observers:
                    m.extra.update(obs.columns(pl.endpoint, point, m))
                result.points.append(m)
                if keep_records:
                    result.records.extend(per_ep[name])
                if base_metrics is None:
                    base_metrics = m
                else:
                    result.ratios.append(
                        {
                            "point": point.label,
                            "endpoint": name,
                            "baseline": base_metrics.endpoint,
                            "ratios": ratios(m, base_metrics),
                        }
                    )
    result.warnings.extend(_warnings(result, config))
    result.wall_s = time.perf_counter() - wall0
    return result


def run_benchmark(
    config: BenchConfig,
    *,
    observers: Sequence[PointObserver] = (),
    progress: ProgressHook | None = None,
    keep_records: bool = True,
) -> BenchResult:
    """Synchronous entry point: run the benchmark on a fresh event loop (uvloop when present)."""
    coro = run_benchmark_async(
        config, observers=observers, progress=progress, keep_records=keep_records
    )
    try:
        import uvloop  # lower client overhead: the client shares the CPU with what it measures
    except ImportError:
        return asyncio.run(coro)
    if sys.version_info >= (3, 11):
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(coro)
    return asyncio.run(coro)  # pragma: no cover - 3.10


async def resolve_model(client: aiohttp.ClientSession, endpoint: Endpoint) -> str:
    """The endpoint's model name: as configured, else the first of its /v1/models."""
    if endpoint.model:
        return endpoint.model
    headers = {}
    if endpoint.api_key is not None:
        headers["Authorization"] = f"Bearer {endpoint.api_key.get_secret_value()}"
    try:
        async with client.get(
            endpoint.base_url + "/models", headers=headers, timeout=aiohttp.ClientTimeout(total=60)
        ) as resp:
            resp.raise_for_status()
            return str((await resp.json(content_type=None))["data"][0]["id"])
    except (
        aiohttp.ClientError,
        asyncio.TimeoutError,
        ValueError,
        KeyError,
        IndexError,
        TypeError,
    ) as exc:
        raise ConfigError(
            f"cannot learn the model name from {endpoint.base_url}/models ({type(exc).__name__}: "
            f"{str(exc)[:120]})",
            hint="pass --model NAME, or check --base-url and the API key",
        ) from None


async def _probe(
    client: aiohttp.ClientSession, endpoint: Endpoint, *, config: BenchConfig, workload: Workload
) -> EndpointInfo:
    """Learn the model, whether ignore_eos and stream usage are accepted, with tiny requests."""
    model = await resolve_model(client, endpoint)
    want_eos = config.workload.ignore_eos
    info = EndpointInfo(
        name=endpoint.name,
        base_url=endpoint.base_url,
        model=model,
        ignore_eos="unverified" if want_eos else "off",
        usage="unknown",
    )
    probe_req = BenchRequest(max_tokens=4, prompt="Hello")
    attempts = [(want_eos, True)]
    if want_eos:
        attempts.append((False, True))
    attempts.append((False, False))
    for ignore_eos, usage in attempts:
        rec = RequestRecord(index=-1, endpoint=endpoint.name, point="probe", round=0)
        rec, _ = await send_request(
            client,
            endpoint,
            probe_req,
            rec,
            api=config.workload.api,
            model=model,
            ignore_eos=ignore_eos,
            include_usage=usage,
            temperature=config.workload.temperature,
            extra_body=config.workload.extra_body,
            timeout_s=config.load.timeout_s,
        )
        if rec.ok:
            if want_eos:
                info.ignore_eos = "accepted" if ignore_eos else "rejected"
            info.stream_options = usage
            info.usage = "server" if rec.token_source == "usage" else "absent"
            return info
        info.probe_error = f"{rec.error_kind}: {rec.error_detail}"
        if not (rec.error_kind or "").startswith("http_4"):
            break  # not a refusal of the request's shape: nothing to learn by retrying
    return info


async def _warmup(
    client: aiohttp.ClientSession,
    plan: _Plan,
    point: LoadPoint,
    p_index: int,
    *,
    config: BenchConfig,
    workload: Workload,
) -> None:
    count = config.load.warmup_requests
    conc = point.concurrency or min(config.load.concurrency)
    if count is None:
        count = conc
    if count <= 0:
        return
    reqs = workload.warmup(count, offset=p_index * 100_000)
    queue = list(enumerate(reqs))

    async def worker() -> None:
        while queue:
            i, req = queue.pop(0)
            rec = RequestRecord(index=-1 - i, endpoint=plan.endpoint.name, point="warmup", round=0)
            await _send(client, plan, req, rec, config=config)

    await asyncio.gather(*(worker() for _ in range(min(conc, count))))


async def _send(
    client: aiohttp.ClientSession,
    plan: _Plan,
    req: BenchRequest,
    rec: RequestRecord,
    *,
    config: BenchConfig,
) -> tuple[RequestRecord, str]:
    return await send_request(
        client,
        plan.endpoint,
        req,
        rec,
        api=config.workload.api,
        model=plan.info.model,
        ignore_eos=plan.info.ignore_eos in ("accepted", "unverified"),
        include_usage=plan.info.stream_options,
        temperature=config.workload.temperature,
        extra_body=config.workload.extra_body,
        timeout_s=config.load.timeout_s,
    )


async def _phase(
    client: aiohttp.ClientSession,
    plan: _Plan,
    point: LoadPoint,
    *,
    config: BenchConfig,
    workload: Workload,
    base_index: int,
    rng_seed: tuple[int, int, int],
    label: str,
    progress: ProgressHook | None,
    round_index: int,
) -> tuple[list[RequestRecord], float]:
    """One measured phase; returns its records and its wall time (first send to last answer)."""
    load = config.load
    count = None
    if load.num_requests is not None:
        count = _round_share(load.num_requests, load.rounds, round_index)
    horizon = load.duration_s / load.rounds if load.duration_s is not None else None
    if count is not None and not workload.sessions:
        workload.requests(base_index, count)  # build prompts before the clock starts
    tick = progress(label, count, horizon) if progress else None
    records: list[RequestRecord] = []
    texts: dict[int, str] = {}
    # A closed-loop user the server answered 429/503 + Retry-After waits that long before its
    # next request, as the OpenAI SDKs do (re-sending at once would load the server further).
    waits: dict[int, float] = {}
    refused: set[int] = set()

    async def one(i: int, scheduled: float | None = None, req: BenchRequest | None = None) -> str:
        req = req if req is not None else workload.request(base_index + i)
        rec = RequestRecord(
            index=base_index + i,
            endpoint=plan.endpoint.name,
            point=point.label,
            round=round_index,
            scheduled_at=scheduled,
        )
        rec, text = await _send(client, plan, req, rec, config=config)
        if rec.retry_after_s:
            waits[i] = rec.retry_after_s
        elif rec.error_kind == CONNECT and point.mode == "closed":
            refused.add(i)
        _fill_prompt_tokens(rec, req)
        if rec.ok and rec.token_source is None:
            texts[len(records)] = text
        records.append(rec)
        if tick:
            tick()
        return text

    start = time.perf_counter()
    if workload.sessions:
        await _sessions(workload, point, count, horizon, start, base_index, one)
    elif point.mode == "closed":
        next_i = 0
        deadline = start + horizon if horizon is not None else None

        async def worker() -> None:
            nonlocal next_i
            backoff = CONNECT_BACKOFF_FIRST_S
            while True:
                if count is not None and next_i >= count:
                    return
                if deadline is not None and time.perf_counter() >= deadline:
                    return
                i, next_i = next_i, next_i + 1
                await one(i)
                wait = waits.pop(i, None)
                if i in refused:
                    refused.discard(i)
                    wait, backoff = backoff, min(backoff * 2, CONNECT_BACKOFF_MAX_S)
                else:
                    backoff = CONNECT_BACKOFF_FIRST_S
                if wait is not None:
                    left = None if deadline is None else deadline - time.perf_counter()
                    await asyncio.sleep(wait if left is None else max(0.0, min(wait, left)))

        assert point.concurrency is not None
        await asyncio.gather(*(worker() for _ in range(point.concurrency)))
    else:
        assert point.request_rate is not None
        rng = random.Random(hash(rng_seed))
        offsets = arrival_offsets(
            point.request_rate, burstiness=load.burstiness, rng=rng, count=count, horizon_s=horizon
        )
        cap = asyncio.Semaphore(point.concurrency) if point.concurrency else None

        async def scheduled_one(i: int, off: float) -> None:
            async with cap if cap else contextlib.nullcontext():
                await one(i, off)

        tasks = []
        for i, off in enumerate(offsets):
            delay = start + off - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(scheduled_one(i, off)))
        await asyncio.gather(*tasks)
    wall = max((r.finished_at for r in records), default=time.perf_counter()) - start
    for pos, text in texts.items():
        _recount(records[pos], text, workload.tokenizer)
    for rec in records:
        if rec.scheduled_at is not None:
            rec.scheduled_at += start
    return records, max(wall, 0.0)


async def _sessions(
    workload: Workload,
    point: LoadPoint,
    count: int | None,
    horizon: float | None,
    start: float,
    base_index: int,
    one: Callable[..., Any],
) -> None:
    """chat-sessions: ``point.concurrency`` turns in flight, of ``--open-sessions``
    conversations open at once (default: the concurrency). A conversation whose answer arrived
    goes to the back of the line of those waiting for their next turn; the front one goes
    next; a finished one makes room for a new one (conversation ids start at
    ``base_index``). With as many open as in flight each conversation runs turn after turn."""
    turns = workload.config.turns
    plan = session_turns(count, turns) if count is not None else None
    deadline = start + horizon if horizon is not None else None
    assert point.concurrency is not None
    limit = max(workload.config.open_sessions or point.concurrency, point.concurrency)
    waiting: deque[_Conversation] = deque()
    opened = open_now = sent = 0

    def next_turn() -> _Conversation | None:
        nonlocal opened, open_now
        while open_now < limit and (plan is None or opened < len(plan)):
            size = plan[opened] if plan is not None else turns
            waiting.append(_Conversation(base_index + opened, size))
            opened += 1
            open_now += 1
        return waiting.popleft() if waiting else None

    async def worker() -> None:
        nonlocal open_now, sent
        while (deadline is None or time.perf_counter() < deadline) and (
            talk := next_turn()
        ) is not None:
            req = workload.session_request(talk.conversation, len(talk.history), talk.history)
            i, sent = sent, sent + 1
            answer = await one(i, None, req)
            assert req.messages is not None
            talk.history.append((req.messages[-1]["content"], answer))
            if len(talk.history) < talk.turns:
                waiting.append(talk)
            else:
                open_now -= 1

    await asyncio.gather(*(worker() for _ in range(point.concurrency)))


@dataclass
class _Conversation:
    """One open conversation of chat-sessions: its id, its length, the turns so far."""

    conversation: int
    turns: int
    history: list[tuple[str, str]] = field(default_factory=list)


def _round_share(total: int, rounds: int, r: int) -> int:
    """Requests of round r when ``total`` are split over ``rounds`` as evenly as possible."""
    return total // rounds + (1 if r < total % rounds else 0)


def _fill_prompt_tokens(rec: RequestRecord, req: BenchRequest) -> None:
    if rec.prompt_tokens is None and req.input_tokens is not None:
        rec.prompt_tokens = req.input_tokens
        rec.prompt_source = "tokenizer" if req.input_exact else "approx"


def _recount(rec: RequestRecord, text: str, tokenizer: LocalTokenizer | None) -> None:
    """Output tokens of a request whose server sent no usage: tokenizer, else chunk count."""
    if tokenizer is not None:
        rec.output_tokens = tokenizer.count(text)
        rec.token_source = "tokenizer"
    else:
        rec.output_tokens = rec.token_chunks
        rec.token_source = "chunks"


def _warnings(result: BenchResult, config: BenchConfig) -> list[str]:
    out: list[str] = []
    for info in result.endpoints:
        if info.ignore_eos == "rejected":
            out.append(
                f"{info.name}: the server refused ignore_eos; answers may stop before max_tokens"
            )
        if info.usage == "absent":
            out.append(
                f"{info.name}: the server sent no token usage; output tokens were recounted "
                "locally (see token_sources)"
            )
        if not info.stream_options:
            out.append(f"{info.name}: the server refused stream_options; sent without it")
        if info.probe_error and info.usage == "unknown":
            out.append(f"{info.name}: probe request failed ({info.probe_error})")
    for p in result.points:
        if p.tokens_per_chunk > MULTI_TOKEN_CHUNK_WARN:
            out.append(
                f"{p.endpoint} {p.point}: chunks carry {p.tokens_per_chunk:.2f} tokens on "
                "average; ITL is per chunk, TPOT per token"
            )
        sources = {k for k in p.token_sources if k != "usage"}
        if sources:
            out.append(
                f"{p.endpoint} {p.point}: output tokens of {sum(p.token_sources[k] for k in sources)}"
                f" requests counted by {'/'.join(sorted(sources))}, not server usage"
                + (
                    " (chunks: approximate, low when chunks carry several tokens)"
                    if "chunks" in sources
                    else ""
                )
            )
        if p.failed:
            kinds = ", ".join(f"{k}×{v}" for k, v in p.errors.items())
            out.append(f"{p.endpoint} {p.point}: {p.failed}/{p.requests} requests failed ({kinds})")
        info = next(e for e in result.endpoints if e.name == p.endpoint)
        if info.ignore_eos == "accepted" and p.completed and p.full_length_fraction < 0.999:
            out.append(
                f"{p.endpoint} {p.point}: ignore_eos accepted but "
                f"{(1 - p.full_length_fraction) * 100:.0f}% of answers ended before max_tokens"
            )
    return out
