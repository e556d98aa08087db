"""Prefix-aware routing (``--routing prefix``): requests whose prompts share a long prefix go to
the same replica, so its vLLM prefix cache serves the shared part, unless it is overloaded.

Ray Serve's HAProxy mode calls an *ingress request router* deployment before it picks a replica:
its Lua action POSTs the request body to the router's ``/internal/route`` and pins the request
to the ``replica_id`` that comes back (``ray/serve/_private/ingress_request_router.lua.tmpl``).
Here that router is :class:`PrefixRouter`. It cuts the prompt into fixed blocks of characters,
hashes them as a chain (block ``k``'s hash covers blocks ``0..k``, like vLLM's own prefix-cache
blocks) and asks Serve's request-router API for a replica: :class:`PrefixRequestRouter`, set as
the ingress deployment's ``request_router_config``, sees every running replica and knows each
one's running requests from :class:`LoadBook` (Serve's queue-length probe, refreshed in the
background, plus what it routed since).

The policy itself is pure (:func:`prompt_text`, :func:`block_chain`, :func:`choose_replica`);
:class:`PrefixIndex` remembers, per replica, an LRU-bounded set of the block hashes it was sent.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, Field
from ray import serve
from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

logger = logging.getLogger(__name__)

ROUTE_PATH = "/internal/route"
DECISIONS_PATH = "/internal/decisions"
# The client's request id, which Ray's Lua forwards to the router (header names are lowercase).
REQUEST_ID_HEADER = b"x-request-id"
# How long a route waits for Serve to offer a replica (none up: HAProxy's 503 after this).
ROUTE_WAIT_S = 1.0
# How old the replicas' running-request counts may grow before the router asks them again
# (in the background: the request being routed uses the counts it has). Short, because a
# finished request stays in the count until the next answer.
LOAD_REFRESH_S = 0.1
# Decisions kept for GET /internal/decisions (request id, replica, matched blocks, reason).
DECISIONS_KEPT = 2000
# The Lua forwards at most HAProxy's buffer (8 MiB by default); nothing longer is read.
MAX_ROUTE_BODY = 16 * 1024 * 1024
PREFIX = "prefix"
LEAST_LOAD = "least-load"


class PrefixPolicy(BaseModel):
    """When a prefix match beats load: the block size, the shortest useful match, the slack."""

    block_chars: int = Field(
        default=128,
        ge=16,
        description="Characters per hashed block of the prompt (only whole blocks count, as "
        "vLLM caches only whole blocks of tokens).",
    )
    min_match_blocks: int = Field(
        default=2,
        ge=1,
        description="Blocks a replica must already hold for the prompt to be sent there for "
        "its prefix; shorter matches are routed by load alone.",
    )
    min_lead_blocks: int = Field(
        default=1,
        ge=1,
        description="Blocks more of the prompt than any other replica holds that the best "
        "match needs to be chosen for its prefix (a prefix every replica holds, such as a "
        "shared system prompt, is no reason to send more to one of them).",
    )
    load_slack: int = Field(
        default=2,
        ge=0,
        description="How many more running requests than the least-loaded replica the "
        "best-matching replica may have and still be chosen.",
    )
    max_blocks_per_replica: int = Field(
        default=200_000,
        ge=1,
        description="Block hashes remembered per replica (least recently sent dropped first).",
    )


# --- the policy: pure functions ------------------------------------------------------------------


def _content_text(content: Any) -> str:
    """A message's content as text: a string, or its parts in order (text, or the media URL)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, dict):
                value = part.get("text")
                if value is None:
                    media = next((part[k] for k in part if k != "type"), "")
                    value = media.get("url", "") if isinstance(media, dict) else str(media)
                parts.append(str(value))
            else:
                parts.append(str(part))
        return "\n".join(parts)
    return "" if content is None else str(content)


def prompt_text(body: Any) -> str | None:
    """The text a request's prefix is judged by: chat messages rendered in order (role, then
    content), or the completion prompt; None when the body has neither."""
    if not isinstance(body, dict):
        return None
    messages = body.get("messages")
    if isinstance(messages, list) and messages:
        return "".join(
            f"<{m.get('role', '')}>\n{_content_text(m.get('content'))}\n"
            if isinstance(m, dict)
            else f"{m}\n"
            for m in messages
        )
    prompt = body.get("prompt")
    if isinstance(prompt, str) and prompt:
        return prompt
    if isinstance(prompt, list) and prompt:
        first = prompt[0]
        if isinstance(first, str):
            return first
        if isinstance(first, int):  # token ids
            return " ".join(map(str, prompt))
        if isinstance(first, list):
            return " ".join(map(str, first))
    return None


def body_text(raw: bytes) -> str | None:
    """The routing text of a raw request body (JSON); a body cut short or not JSON is judged
    by its own characters, which still share the prefix of the same conversation."""
    if not raw:
        return None
    try:
        return prompt_text(json.loads(raw))
    except (ValueError, UnicodeDecodeError):
        return raw.decode("utf-8", "replace")


def block_chain(text: str, block_chars: int) -> list[str]:
    """Chained hashes of the whole ``block_chars`` blocks of ``text``: hash ``k`` covers
    blocks ``0..k``, so two prompts share hash ``k`` exactly when they share that prefix."""
    chain: list[str] = []
    previous = b""
    for start in range(0, len(text) - block_chars + 1, block_chars):
        block = text[start : start + block_chars].encode("utf-8", "surrogatepass")
        previous = hashlib.blake2b(previous + block, digest_size=8).digest()
        chain.append(previous.hex())
    return chain


def matched_blocks(chain: Sequence[str], known: Iterable[str] | dict[str, Any]) -> int:
    """How many leading blocks of ``chain`` a replica holds (the longest ``k`` with hash
    ``k - 1`` among its hashes; a chained hash implies its whole prefix)."""
    seen = known if isinstance(known, (dict, set, frozenset)) else set(known)
    for k in range(len(chain), 0, -1):
        if chain[k - 1] in seen:
            return k
    return 0


@dataclass(frozen=True)
class Candidate:
    """One replica as the policy sees it."""

    replica_id: str
    outstanding: int  # running requests (None from a probe: the replica is skipped)
    matched: int  # leading blocks of this prompt it was sent before
    known: int = 0  # block hashes it holds (ties go to the emptier replica)


@dataclass(frozen=True)
class Decision:
    """Where a request goes and why."""

    replica_id: str
    matched: int
    reason: str  # PREFIX or LEAST_LOAD


def choose_replica(candidates: Sequence[Candidate], policy: PrefixPolicy) -> Decision:
    """The replica with the longest matching prefix (at least ``min_match_blocks``) when it
    holds at least ``min_lead_blocks`` more of it than any other replica and has at most
    ``load_slack`` more running requests than the least-loaded replica; else the least-loaded
    one (ties: longest match, emptier, id). A prefix every replica holds (a system prompt all
    conversations share) is no reason to send more to one of them: only what the others lack
    counts."""
    if not candidates:
        raise ValueError("no replica to choose from")
    least = min(c.outstanding for c in candidates)
    best = max(c.matched for c in candidates)
    if best >= policy.min_match_blocks:
        near = [
            c
            for c in candidates
            if c.matched == best and c.outstanding <= least + policy.load_slack
        ]
        if near:
            pick = min(near, key=lambda c: (c.outstanding, c.known, c.replica_id))
            others = max((c.matched for c in candidates if c is not pick), default=0)
            if pick.matched - others >= policy.min_lead_blocks:
                return Decision(pick.replica_id, pick.matched, PREFIX)
    pick = min(candidates, key=lambda c: (c.outstanding, -c.matched, c.known, c.replica_id))
    return Decision(pick.replica_id, pick.matched, LEAST_LOAD)


class PrefixIndex:
    """Per replica, the block hashes it was sent, least recently sent dropped past a bound."""

    def __init__(self, max_blocks_per_replica: int) -> None:
        self.capacity = max_blocks_per_replica
        self._blocks: dict[str, OrderedDict[str, None]] = {}

    def matched(self, replica_id: str, chain: Sequence[str]) -> int:
        """Leading blocks of ``chain`` the replica holds."""
        return matched_blocks(chain, self._blocks.get(replica_id, {}))

    def known(self, replica_id: str) -> int:
        """Block hashes the replica holds."""
        return len(self._blocks.get(replica_id, ()))

    def record(self, replica_id: str, chain: Sequence[str]) -> None:
        """The replica was sent ``chain``: remember (or refresh) each of its blocks. The
        longer prefixes count as older, so the bound drops a chain's tail before its head
        (as vLLM's cache frees a sequence's last blocks first)."""
        held = self._blocks.setdefault(replica_id, OrderedDict())
        for block in reversed(chain):
            held[block] = None
            held.move_to_end(block)
        while len(held) > self.capacity:
            held.popitem(last=False)

    def keep_only(self, replica_ids: Iterable[str]) -> None:
        """Forget replicas that are gone (a replacement starts with an empty cache)."""
        keep = set(replica_ids)
        for gone in set(self._blocks) - keep:
            del self._blocks[gone]


class LoadBook:
    """Running requests per replica without asking on every request: the count each replica
    last answered to a probe, plus the requests routed to it since shortly before that probe
    went out (a request routed just before it may still be on its way to the replica, so it
    stays counted until a later probe). An answer older than the one applied is dropped; a
    replica silent for ``silent_s`` is not offered."""

    def __init__(self, *, in_flight_s: float = 0.05, silent_s: float = 2.0) -> None:
        self.in_flight_s = in_flight_s
        self.silent_s = silent_s
        self._probed: dict[str, tuple[int, float]] = {}  # replica -> (running, probe sent at)
        self._answered: dict[str, float] = {}  # replica -> when it last answered
        self._routed: dict[str, deque[float]] = {}  # replica -> when requests were routed

    def estimate(self, replica_id: str, now: float | None = None) -> int | None:
        """Running requests now, as far as the book knows; None before the first answer, or
        when the replica has not answered for ``silent_s`` (at ``now``)."""
        probed = self._probed.get(replica_id)
        if probed is None:
            return None
        if now is not None and now - self._answered.get(replica_id, now) > self.silent_s:
            return None
        return probed[0] + len(self._routed.get(replica_id, ()))

    def oldest(self, replica_ids: Iterable[str]) -> float | None:
        """When the least recently answered probe of these replicas went out (None: one never
        answered)."""
        times = [self._probed.get(rid, (0, None))[1] for rid in replica_ids]
        return None if any(t is None for t in times) else min(times, default=None)

    def probed(self, replica_id: str, running: int, sent_at: float, answered_at: float) -> None:
        """The answer ``running`` of a probe sent at ``sent_at``: it holds the requests routed
        up to ``in_flight_s`` before it; the later ones stay counted."""
        self._answered[replica_id] = answered_at
        current = self._probed.get(replica_id)
        if current is not None and current[1] > sent_at:
            return  # a newer probe's answer is applied already
        self._probed[replica_id] = (running, sent_at)
        routed = self._routed.get(replica_id)
        cut = sent_at - self.in_flight_s
        while routed and routed[0] <= cut:
            routed.popleft()

    def routed(self, replica_id: str, at: float) -> None:
        self._routed.setdefault(replica_id, deque()).append(at)

    def keep_only(self, replica_ids: Iterable[str]) -> None:
        keep = set(replica_ids)
        for book in (self._probed, self._answered, self._routed):
            for gone in set(book) - keep:
                del book[gone]


# --- Serve's request-router API: the replicas and their load -------------------------------------


@dataclass
class RouteQuery:
    """What the router deployment hands the request router: the prompt's block chain, the
    client's request id; the request router fills in its decision."""

    chain: tuple[str, ...]
    request_id: str | None = None
    decision: Decision | None = field(default=None)


def _log_failure(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.warning("probing the replicas' running requests failed: %r", task.exception())


class PrefixRequestRouter(RequestRouter):
    """Serve request router of the ingress deployment (used only by :class:`PrefixRouter`):
    applies :func:`choose_replica` to each replica's running requests as a :class:`LoadBook`
    holds them. The replicas are probed (Serve's queue-length call into each replica) in the
    background after a request is routed whenever the counts are older than
    ``LOAD_REFRESH_S``; a request waits for a probe only when no replica's count is known (the
    router just started). A replica not answered yet, or silent too long, is not offered."""

    def initialize_state(self, **kwargs: Any) -> None:
        """Serve passes ``request_router_kwargs`` (a :class:`PrefixPolicy` as a dict)."""
        self.policy = PrefixPolicy(**kwargs)
        self.index = PrefixIndex(self.policy.max_blocks_per_replica)
        self.loads = LoadBook()
        self.refreshing: asyncio.Task | None = None

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        if hasattr(self, "index"):
            ids = [r.replica_id.to_full_id_str() for r in replicas]
            self.index.keep_only(ids)
            self.loads.keep_only(ids)

    async def _refresh(self, replicas: list[RunningReplica]) -> None:
        """Probe ``replicas`` and put their answers in the book (a replica that does not
        answer keeps its last count until it has been silent for the book's ``silent_s``)."""
        sent_at = time.monotonic()
        answers = await self._probe_queue_lens(replicas, 0)
        now = time.monotonic()
        current = {r.replica_id.to_full_id_str() for r in self.curr_replicas.values()}
        for replica, running in answers:
            rid = replica.replica_id.to_full_id_str()
            if running is not None and rid in current:
                self.loads.probed(rid, running, sent_at, now)

    def _refresh_task(self, replicas: list[RunningReplica]) -> asyncio.Task:
        """The probe under way, or a new one (one at a time)."""
        if self.refreshing is None or self.refreshing.done():
            self.refreshing = asyncio.get_running_loop().create_task(self._refresh(replicas))
            self.refreshing.add_done_callback(_log_failure)
        return self.refreshing

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        if not hasattr(self, "index"):  # Serve passed no request_router_kwargs
            self.initialize_state()
        # Serve ships a request router's module by value (cloudpickle), so RouteQuery here is a
        # copy of the router deployment's class: the query is recognised by its fields.
        query = pending_request.args[0] if pending_request and pending_request.args else None
        chain = tuple(getattr(query, "chain", None) or ())
        by_id = {r.replica_id.to_full_id_str(): r for r in candidate_replicas}
        now = time.monotonic()
        counted = {rid: self.loads.estimate(rid, now) for rid in by_id}
        if all(n is None for n in counted.values()):
            # No replica's count known yet (the router just started, or all went silent):
            # worth one wait for the probe.
            await asyncio.shield(self._refresh_task(candidate_replicas))
            now = time.monotonic()
            counted = {rid: self.loads.estimate(rid, now) for rid in by_id}
        answered = {rid: n for rid, n in counted.items() if n is not None}
        candidates = [
            Candidate(
                replica_id=rid,
                outstanding=n,
                matched=self.index.matched(rid, chain),
                known=self.index.known(rid),
            )
            for rid, n in (answered or dict.fromkeys(by_id, 0)).items()
        ]
        decision = choose_replica(candidates, self.policy)
        self.index.record(decision.replica_id, chain)
        self.loads.routed(decision.replica_id, now)
        oldest = self.loads.oldest(by_id)
        if oldest is None or now - oldest > LOAD_REFRESH_S:
            # In the background: this request does not wait for the replicas' answers.
            self._refresh_task(candidate_replicas)
        if hasattr(query, "decision"):
            query.decision = decision
        return [[by_id[decision.replica_id]]]


# --- the router deployment: /internal/route ------------------------------------------------------


async def _read_body(receive: Any, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        if size < limit:
            chunks.append(chunk[: limit - size])
        size += len(chunk)
        if not message.get("more_body"):
            break
    return b"".join(chunks)


@serve.ingress()
class PrefixRouter:
    """The ingress request router HAProxy's Lua calls: ``POST /internal/route`` with the
    request body, answered ``{"replica_id": ...}``; ``GET /internal/decisions``: the latest
    decisions (request id, replica, matched blocks, reason) and their counts, no prompt text."""

    def __init__(self, server: Any, policy: dict[str, Any]) -> None:
        self.server = server
        self.policy = PrefixPolicy(**policy)
        self.decisions: deque[dict[str, Any]] = deque(maxlen=DECISIONS_KEPT)
        self.counts: Counter[str] = Counter()

    async def __serve_build_asgi_app__(self) -> Any:
        # A plain coroutine function: servers tell ASGI 3 from ASGI 2 by its signature.
        async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
            await self.asgi(scope, receive, send)

        return app

    async def route(self, raw: bytes, request_id: str | None) -> tuple[int, dict[str, Any]]:
        """The replica for one request body: (HTTP status, JSON answer)."""
        text = body_text(raw)
        chain = tuple(block_chain(text, self.policy.block_chars)) if text else ()
        query = RouteQuery(chain=chain, request_id=request_id)
        try:
            # Serve's router waits for a replica as long as there is none: bounded here, so
            # that with every replica loading or gone the client gets HAProxy's 503 at once.
            async with asyncio.timeout(ROUTE_WAIT_S):
                async with self.server.choose_replica(query, _reserve=False) as selection:
                    # Set by PrefixRequestRouter (its own copy of Decision: read by field names).
                    decision = query.decision or Decision(
                        selection._replica.replica_id.to_full_id_str(), 0, LEAST_LOAD
                    )
        except Exception as exc:  # no replica (yet): HAProxy answers 503 for a non-200
            return 503, {"detail": f"no replica to route to ({type(exc).__name__})"}
        self.counts[decision.reason] += 1
        self.decisions.append(
            {
                "request_id": request_id,
                "replica_id": decision.replica_id,
                "matched_blocks": decision.matched,
                "blocks": len(chain),
                "reason": decision.reason,
            }
        )
        return 200, {"replica_id": decision.replica_id}

    async def asgi(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        from serve.api import _send_json

        if scope.get("type") == "lifespan":
            while (message := await receive())["type"] != "lifespan.shutdown":
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope.get("type") != "http":
            return
        path, method = scope.get("path"), scope.get("method")
        if path == ROUTE_PATH and method == "POST":
            headers = dict(scope.get("headers") or [])
            raw_id = headers.get(REQUEST_ID_HEADER)
            status, payload = await self.route(
                await _read_body(receive, MAX_ROUTE_BODY),
                raw_id.decode("latin-1") if raw_id else None,
            )
            await _send_json(send, status, payload)
        elif path == DECISIONS_PATH and method == "GET":
            await _send_json(
                send, 200, {"counts": dict(self.counts), "decisions": list(self.decisions)}
            )
        elif path in ("/health", "/-/healthz") and method in ("GET", "HEAD"):
            await _send_json(send, 200, {"status": "ok"})
        else:
            await _send_json(send, 404, {"detail": "not found"})


def router_application(server_app: Any, *, env_vars: dict[str, str], head_resource: str) -> Any:
    """The router deployment bound to the ingress application: one replica on the head
    (beside HAProxy, so the extra hop stays on one machine), no CPU of its own."""
    deployment = serve.deployment(
        PrefixRouter,
        name="PrefixRouter",
        num_replicas=1,
        max_ongoing_requests=1000,
        ray_actor_options={
            "num_cpus": 0,
            "resources": {head_resource: 0.001},
            "runtime_env": {"env_vars": env_vars},
        },
    )
    return deployment.bind(server_app, PrefixPolicy().model_dump())
