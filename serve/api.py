"""The HTTP front of the server: auth, limits, OpenAI-shaped errors, /health, /ready, counters."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

from prometheus_client import Counter, Gauge

from serve.models import ModelRoutes, route_path

logger = logging.getLogger(__name__)

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# Routes answered without a key: load balancers and orchestrators probe them.
OPEN_PATHS = frozenset({"/health", "/ready"})
# Routes with a JSON body (415 for another content type).
JSON_BODY_PREFIXES = ("/v1/",)
REQUEST_ID_HEADER = b"x-request-id"
# How an error event starts in an SSE stream (vLLM's and ours).
SSE_ERROR_PREFIX = b'data: {"error"'
# Paths the request counter names; anything else is counted as "other" (bounded labels).
COUNTED_PATHS = frozenset(
    {"/v1/chat/completions", "/v1/completions", "/v1/models", "/metrics", "/health", "/ready"}
)

# Roles OpenAI's chat API knows; vLLM would render any string through the chat template.
CHAT_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
CHAT_PATH = "/v1/chat/completions"

# The only routes a user key reaches (default deny): the OpenAI routes of the served model,
# the probes, metrics and tokenizer helpers. Every other route of vLLM's app (elastic EP
# scaling, /v1/responses with its stored responses, SageMaker's /invocations dispatcher, the
# render and batch routes, dev-mode and LoRA routes, plugin routes, docs) answers 404 unless
# the caller holds an admin key.
PUBLIC_PATHS = frozenset(
    {
        CHAT_PATH,
        "/v1/completions",
        "/v1/embeddings",
        "/v1/models",
        "/tokenize",
        "/detokenize",
        "/metrics",
        "/health",
        "/ready",
    }
)
# Public routes whose JSON body the gateway checks before vLLM sees it.
BODY_CHECKED_PATHS = frozenset(
    {CHAT_PATH, "/v1/completions", "/v1/embeddings", "/tokenize", "/detokenize"}
)
# Deepest JSON nesting accepted: OpenAI requests (tool schemas included) stay far below it,
# and deeper bodies make parsers and validators recurse without bound.
MAX_JSON_DEPTH = 64

REQUESTS = Counter(
    "llamacluster_http_requests",
    "HTTP requests answered by the llamacluster server, by route and status code.",
    ["path", "status"],
)
IN_FLIGHT = Gauge(
    "llamacluster_requests_in_flight", "Requests inside the server (running + queued)."
)
ENGINE_RESTARTS = Counter(
    "llamacluster_engine_restarts",
    "Engine faults that made the replica's supervisor restart the engine, by cause.",
    ["cause"],
)

# OpenAI's error `type` for each status we answer ourselves.
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable_error",
    504: "timeout_error",
}


def error_payload(
    status: int, message: str, *, type_: str | None = None, param: str | None = None, code=None
) -> dict[str, Any]:
    """OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""
    return {
        "error": {
            "message": message,
            "type": type_
            or _ERROR_TYPES.get(
                status, "invalid_request_error" if status < 500 else "server_error"
            ),
            "param": param,
            "code": code if code is not None else status,
        }
    }


def normalize_error_body(status: int, body: bytes) -> bytes:
    """Rewrite any error body (vLLM's, FastAPI's, Starlette's, plain text) into OpenAI's shape."""
    message: str | None = None
    try:
        data = json.loads(body) if body else None
    except (ValueError, UnicodeDecodeError):
        data = None
        message = body.decode("utf-8", "replace").strip() or None
    if isinstance(data, dict) and isinstance(data.get("error"), dict):
        err = data["error"]
        if "message" in err:
            fixed = error_payload(
                status,
                str(err["message"]),
                # vLLM names a 404 (an unknown model or adapter) by its exception class.
                type_=None if err.get("type") == "NotFoundError" else err.get("type") or None,
                param=err.get("param"),
                code=err.get("code"),
            )
            return json.dumps(fixed).encode()
    if isinstance(data, dict):
        detail = data.get("detail", data.get("error", data.get("message")))
        message = detail if isinstance(detail, str) else json.dumps(detail) if detail else None
    elif isinstance(data, str):
        message = data
    return json.dumps(error_payload(status, message or HTTPStatus(status).phrase)).encode()


def is_public_route(path: str) -> bool:
    """Does a user key reach ``path``? Anything not listed is for admin keys only."""
    return path in PUBLIC_PATHS


def json_depth_exceeds(data: Any, limit: int = MAX_JSON_DEPTH) -> bool:
    """Is parsed JSON nested deeper than ``limit`` arrays/objects? (Iterative: no recursion.)"""
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Iterable[Any] = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


@dataclass(frozen=True)
class BodyLimits:
    """What the gateway bounds in a request body before vLLM sees it."""

    max_n: int | None = None
    max_tokens: int | None = None
    # None or empty: media URLs (http/https) are refused; else only these hosts.
    allowed_media_domains: frozenset[str] = frozenset()


# Body fields that bound how many tokens a request generates (completions; chat).
_MAX_TOKEN_FIELDS = ("max_tokens", "max_completion_tokens")


def body_problem(path: str, data: Any, limits: BodyLimits) -> tuple[str, str | None] | None:
    """What is wrong with a parsed request body, as (message, param), or None.

    vLLM checks the OpenAI fields itself; these are the server's own bounds (``n``, output
    tokens, media URLs) and the chat roles vLLM does not check.
    """
    if not isinstance(data, dict):
        return None
    n = data.get("n")
    if limits.max_n is not None and isinstance(n, int) and n > limits.max_n:
        return f"`n` is {n}; this server allows at most {limits.max_n}", "n"
    for name in _MAX_TOKEN_FIELDS:
        value = data.get(name)
        if limits.max_tokens is not None and isinstance(value, int) and value > limits.max_tokens:
            return f"`{name}` is {value}; this server allows at most {limits.max_tokens}", name
    if path == CHAT_PATH and (problem := chat_messages_problem(data)) is not None:
        return problem, "messages"
    if (url := media_url_refused(data.get("messages"), limits.allowed_media_domains)) is not None:
        if limits.allowed_media_domains:
            allowed = ", ".join(sorted(limits.allowed_media_domains))
            return f"media URL {url!r} is not on an allowed domain ({allowed})", "messages"
        return (
            f"media URL {url!r} refused: this server does not fetch media from URLs; send it "
            "inline as a data: URL (or start the server with --allowed-media-domains)",
            "messages",
        )
    return None


def media_url_refused(messages: Any, allowed_domains: frozenset[str]) -> str | None:
    """The first http(s) media URL in chat content parts whose host is not allowed, or None.

    A content part names its media as ``{"type": "image_url", "image_url": {"url": ...}}``
    (audio_url, video_url and other kinds alike, or the URL as a plain string): every string
    under a key ending in ``url`` inside the parts is looked at.
    """
    from urllib.parse import urlsplit

    if not isinstance(messages, list):
        return None
    stack: list[Any] = [m.get("content") for m in messages if isinstance(m, dict)]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, dict):
            for key, value in item.items():
                if isinstance(value, str) and str(key).lower().endswith("url"):
                    try:
                        parts = urlsplit(value.strip())
                        host = parts.hostname or ""
                    except ValueError:  # a malformed URL is refused, not fetched
                        return value[:200]
                    if parts.scheme.lower() in ("http", "https") and host not in allowed_domains:
                        return value[:200]
                elif isinstance(value, (dict, list)):
                    stack.append(value)
    return None


def chat_messages_problem(data: Any) -> str | None:
    """What is wrong with a parsed chat request's `messages` (None when fine or not an object).

    vLLM checks most fields itself; it accepts unknown roles, so they are checked here.
    """
    if not isinstance(data, dict):
        return None
    messages = data.get("messages")
    if messages is None:
        return "`messages` is required: a list of {role, content} objects"
    if not isinstance(messages, list) or not messages:
        return "`messages` must be a non-empty list of {role, content} objects"
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            return f"messages[{i}] must be an object with `role` and `content`"
        role = message.get("role")
        if role not in CHAT_ROLES:
            return f"messages[{i}].role {role!r} is not one of {', '.join(sorted(CHAT_ROLES))}"
    return None


def bearer_token(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    """The token of an `Authorization: Bearer <token>` header (scheme case-insensitive)."""
    for name, value in headers:
        if name.lower() == b"authorization":
            scheme, _, token = value.decode("latin-1").strip().partition(" ")
            if scheme.lower() == "bearer":
                return token.strip()
            return None
    return None


def key_digest(key: str) -> bytes:
    """SHA-256 of an API key: what the server keeps and compares, never the key itself.

    The replica's constructor arguments are stored by Ray, so only digests travel there; equal
    lengths also keep the comparison constant-time whatever the token's length.
    """
    return hashlib.sha256(key.encode()).digest()


def key_matches(token: str | None, digests: list[bytes]) -> bool:
    """Constant-time check of a token against every key digest (no early exit on a match)."""
    if not token:
        return False
    given = key_digest(token)
    matched = False
    for digest in digests:
        matched |= hmac.compare_digest(given, digest)
    return matched


@dataclass
class ServerState:
    """What the gateway needs to know about the engine behind it (set by serve.app and
    serve.watchdog).

    ``phase``: ``loading`` (first load), ``serving`` (an engine is up), ``restarting`` (the
    watchdog tore a faulty engine down and builds a new one; no engine meanwhile), ``failed``
    (restarts exhausted: Ray Serve replaces the replica).
    """

    app: ASGIApp | None = None
    loading_error: str | None = None
    engine_error: Callable[[], BaseException | None] = lambda: None
    last_probe_ok: float | None = None
    last_probe_error: str | None = None
    probe_max_age_s: float = 60.0
    phase: str = "loading"
    phase_since: float = field(default_factory=time.time)  # wall clock
    phase_since_mono: float = field(default_factory=time.monotonic)
    cause: str | None = None  # of the last fault
    detail: str | None = None
    attempt: int = 0  # restart attempts since the engine was last stable
    max_attempts: int = 0
    next_attempt_wall: float | None = None
    last_restart_error: str | None = None
    restart_history: Callable[[], list[dict[str, Any]]] = lambda: []

    def set_phase(self, phase: str, *, now: float | None = None, wall: float | None = None) -> None:
        """Enter ``phase`` (remembering since when)."""
        self.phase = phase
        self.phase_since_mono = time.monotonic() if now is None else now
        self.phase_since = time.time() if wall is None else wall
        if phase == "serving":
            self.next_attempt_wall = None

    def unavailable(self) -> str | None:
        """Why no request can be served right now (no engine, or a dead one), else None."""
        if self.phase == "restarting":
            return self._restarting_reason()
        if self.phase == "failed":
            return f"the engine failed and is not coming back in this replica: {self.detail}"
        if self.app is None:
            return self.loading_error or "the model is still loading"
        if (err := self.engine_error()) is not None:
            return f"engine failed: {err}"
        return None

    def _restarting_reason(self) -> str:
        since = _iso(self.phase_since)
        text = (
            f"engine restarting (attempt {self.attempt} of {self.max_attempts}, "
            f"cause {self.cause}: {self.detail}, since {since})"
        )
        if self.last_restart_error:
            text += f"; last attempt failed: {self.last_restart_error}"
        return text

    def ready(self) -> tuple[bool, str]:
        """Ready = the engine answered a one-token generation recently."""
        if (reason := self.unavailable()) is not None:
            return False, reason
        if self.last_probe_ok is None:
            return False, "waiting for the first test generation"
        age = time.monotonic() - self.last_probe_ok
        if age > self.probe_max_age_s:
            reason = self.last_probe_error or "no answer"
            return False, f"last successful test generation {age:.0f}s ago ({reason})"
        return True, "ready"

    def healthy(self) -> tuple[bool, str]:
        """Healthy = the process runs and an engine is up or loading for the first time."""
        if self.loading_error is not None:
            return False, f"engine failed to start: {self.loading_error}"
        if self.phase in ("restarting", "failed"):
            return False, self.unavailable() or self.phase
        if self.app is not None and (err := self.engine_error()) is not None:
            return False, f"engine failed: {err}"
        return True, "loading" if self.app is None else "ok"

    def status_word(self) -> str:
        """One word for /health's ``status``: loading, ok, restarting, failed."""
        if self.loading_error is not None or self.phase == "failed":
            return "failed"
        if self.phase == "restarting":
            return "restarting"
        if self.app is not None and self.engine_error() is not None:
            return "failed"
        return "loading" if self.app is None else "ok"

    def engine_json(self) -> dict[str, Any]:
        """The engine's state for /health (the controller's `status` reads it)."""
        next_attempt = self.next_attempt_wall if self.phase == "restarting" else None
        return {
            "state": "failed" if self.loading_error is not None else self.phase,
            "since": _iso(self.phase_since),
            "cause": self.cause,
            "detail": self.detail,
            "attempt": self.attempt,
            "max_attempts": self.max_attempts,
            "next_attempt_at": _iso(next_attempt),
            "last_restart_error": self.last_restart_error,
            "loading_error": self.loading_error,
        }

    def health_body(self, ok: bool, reason: str, *, details: bool = True) -> dict[str, Any]:
        """/health's JSON: ``status``, ``engine`` and the restart history; an error in
        OpenAI's shape when not healthy.

        Without ``details`` (a caller without a key) every free-text field (exception
        messages, paths) is left out: states, causes, counts and times remain.
        """
        status = self.status_word()
        if not details:
            reason = f"engine {status}"
        body: dict[str, Any] = {} if ok else error_payload(503, reason)
        body["status"] = status
        engine = self.engine_json()
        restarts = self.restart_history()
        if not details:
            engine = {k: v for k, v in engine.items() if k not in _HEALTH_DETAIL_FIELDS}
            restarts = [
                {k: v for k, v in r.items() if k not in _HEALTH_DETAIL_FIELDS} for r in restarts
            ]
        body["engine"] = engine
        body["restarts"] = restarts
        return body


# /health fields with free text (exception messages, paths): shown to key holders only.
_HEALTH_DETAIL_FIELDS = frozenset({"detail", "error", "last_restart_error", "loading_error"})


def _iso(wall: float | None) -> str | None:
    if wall is None:
        return None
    return dt.datetime.fromtimestamp(wall, dt.timezone.utc).isoformat(timespec="seconds")


_UNPARSED = object()
_TOO_DEEP = object()


def _json_or_none(body: bytes) -> Any:
    """The parsed JSON body; None when it is not JSON, _TOO_DEEP when it nests too deep for
    Python's parser."""
    try:
        return json.loads(body)
    except RecursionError:
        return _TOO_DEEP
    except (ValueError, UnicodeDecodeError):
        return None


def _never() -> str | None:
    return None


class Gateway:
    """ASGI middleware around vLLM's OpenAI app: every rule of the public endpoint in one place.

    Order per request: request id → open probes → auth (default deny) → route allowlist
    (404; admin keys reach every route) → loading (503) → content type (415) / body size (413)
    → load bound (429) → body checks (400) → the app, with a request timeout and a stream idle
    timeout and with every error answer rewritten into OpenAI's shape.
    """

    def __init__(
        self,
        state: ServerState,
        *,
        api_keys: Iterable[str] = (),
        api_key_digests: Iterable[bytes] = (),
        no_auth: bool = False,
        max_ongoing_requests: int = 256,
        retry_after_s: int = 1,
        request_timeout_s: float | None = None,
        max_body_bytes: int = 8 * 1024 * 1024,
        add_request_id: bool = True,
        admin_key_digests: Iterable[bytes] = (),
        stream_idle_timeout_s: float | None = None,
        body_limits: BodyLimits = BodyLimits(),
    ) -> None:
        self._keys = [key_digest(k) for k in api_keys] + list(api_key_digests)
        # Keys that also reach the routes outside PUBLIC_PATHS; none: those routes are 404.
        self._admin_keys = list(admin_key_digests)
        self._idle_timeout = stream_idle_timeout_s
        self._limits = body_limits
        if not self._keys and not no_auth:
            raise ValueError("Gateway needs API keys or an explicit no_auth=True")
        self.state = state
        self._no_auth = no_auth
        self._max_ongoing = max_ongoing_requests
        self._retry_after = str(retry_after_s).encode()
        self._timeout = request_timeout_s
        self._max_body = max_body_bytes
        # Ray Serve's own middleware already adds X-Request-Id (with the same id) in a replica.
        self._add_request_id = add_request_id
        self.in_flight = 0
        # One future per request inside the app: end_in_flight() resolves them all.
        self._aborts: set[asyncio.Future[str]] = set()
        # The endpoint's other models (serve/models.py), in its first app's gateway only.
        self.models: ModelRoutes | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(scope, receive, send)
            return
        if scope["type"] != "http":
            # Websockets (vLLM's realtime routes) are not offered by this server.
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
            return
        request_id = _header(scope, REQUEST_ID_HEADER) or uuid.uuid4().hex
        path = route_path(scope)
        label = path if path in COUNTED_PATHS else "other"
        send = _count_and_tag(send, request_id if self._add_request_id else None, label)

        token = bearer_token(scope["headers"])
        is_admin = key_matches(token, self._admin_keys)
        has_key = is_admin or key_matches(token, self._keys)
        if path in OPEN_PATHS and scope.get("method") in ("GET", "HEAD"):
            # Without a key the probes say only how things stand; the reasons (exception
            # text, paths) are for key holders.
            if path == "/ready":
                ok, reason = self.state.ready()
                if not has_key:
                    word = self.state.status_word()
                    reason = "ready" if ok else "not ready" + ("" if word == "ok" else f" ({word})")
                payload = {"status": reason} if ok else error_payload(503, reason)
            else:
                ok, reason = self.state.healthy()
                payload = self.state.health_body(ok, reason, details=has_key)
            await _send_json(
                send,
                200 if ok else 503,
                payload,
                retry_after=None if ok else self._retry_after,
            )
            return

        if not self._no_auth and not has_key:
            await _send_json(
                send,
                401,
                error_payload(
                    401,
                    "missing or invalid API key: send `Authorization: Bearer <key>`",
                    code="invalid_api_key",
                ),
                extra=[(b"www-authenticate", b"Bearer")],
            )
            return

        if not is_public_route(path) and not is_admin:
            await _send_json(
                send,
                404,
                error_payload(
                    404, f"no route {path[:200]}: this server offers the OpenAI API under /v1"
                ),
            )
            return

        app = self.state.app
        # A request that may name another model of the endpoint is read first: that model's
        # app may serve while this one's engine loads.
        may_forward = (
            self.models is not None and scope.get("method") == "POST" and path in BODY_CHECKED_PATHS
        )
        if not may_forward and (reason := self._unavailable()) is not None:
            await _send_json(send, 503, error_payload(503, reason), retry_after=self._retry_after)
            return

        if scope.get("method") in ("POST", "PUT", "PATCH") and path.startswith(JSON_BODY_PREFIXES):
            ctype = (_header(scope, b"content-type") or "").split(";")[0].strip().lower()
            if ctype != "application/json":
                await _send_json(
                    send,
                    415,
                    error_payload(
                        415,
                        f"unsupported content type {ctype or '(none)'!r}: send application/json",
                    ),
                )
                return
        length = _header(scope, b"content-length")
        if length is not None and length.isdigit() and int(length) > self._max_body:
            await _send_json(send, 413, self._too_large())
            return

        if self.in_flight >= self._max_ongoing:
            await _send_json(
                send,
                429,
                error_payload(
                    429,
                    f"server is at its limit of {self._max_ongoing} running and queued requests;"
                    " retry shortly",
                    code="rate_limit_exceeded",
                ),
                retry_after=self._retry_after,
            )
            return

        if self.models is not None and path == "/v1/models" and app is not None:
            from serve.models import listing_app

            app = listing_app(self.models, app)
        self.in_flight += 1
        IN_FLIGHT.inc()
        try:
            await self._call_app(app, scope, receive, send, path)
        finally:
            self.in_flight -= 1
            IN_FLIGHT.dec()

    def set_key_digests(self, digests: Iterable[bytes]) -> bool:
        """Accept exactly the keys with these digests from the next request on; returns whether
        the set changed. An empty set is refused (it would lock every client out).

        One assignment of a new list: a request checks its key against one whole list, the old
        one or the new one, never a mix; requests already inside the app run on.
        """
        new = list(dict.fromkeys(digests))
        if not new:
            raise ValueError("refusing an empty set of API keys")
        changed = set(new) != set(self._keys)
        self._keys = new
        return changed

    async def follow_key_digests(
        self, read: Callable[[], list[bytes] | None], *, interval_s: float = 1.0
    ) -> None:
        """Apply the key digests ``read()`` returns, every ``interval_s``, until cancelled.

        ``read`` runs in a thread (it may ask the network); when it fails, or finds nothing,
        the last good set stays in force, and a failure is logged once per run of failures.
        """
        failing = False
        while True:
            try:
                digests = await asyncio.to_thread(read)
                if digests and self.set_key_digests(digests):
                    logger.info("API keys reloaded: %d key(s) accepted", len(self._keys))
                failing = False
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not failing:
                    logger.warning("cannot reload the API keys (keeping the last ones): %s", exc)
                failing = True
            await asyncio.sleep(interval_s)

    def end_in_flight(self, message: str) -> int:
        """End every request inside the app now: a 503 for those that have not answered yet,
        an SSE error event and ``[DONE]`` for streams (the engine behind them is going away).
        Returns how many were ended."""
        ended = 0
        for abort in list(self._aborts):
            if not abort.done():
                abort.set_result(message)
                ended += 1
        return ended

    def _unavailable(self) -> str | None:
        """Why this app's engine cannot take a request now (None: it can)."""
        reason = self.state.unavailable()
        if self.state.app is None or reason is not None:
            return reason or "the model is still loading"
        return None

    def _too_large(self) -> dict[str, Any]:
        return error_payload(413, f"request body is larger than {self._max_body} bytes")

    async def _read_body(self, receive: Receive) -> bytes | None:
        """The whole request body, or None when it grows past the limit."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _ClientGone
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self._max_body:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _call_app(
        self, app: ASGIApp | None, scope: Scope, receive: Receive, send: Send, path: str
    ) -> None:
        unavailable = self.state.unavailable
        received = 0
        forwarding = False

        if scope.get("method") == "POST" and path in BODY_CHECKED_PATHS:
            try:
                body = await self._read_body(receive)
            except _ClientGone:
                return
            if body is None:
                await _send_json(send, 413, self._too_large())
                return
            data = _json_or_none(body)
            if (problem := self._body_problem(path, body, data)) is not None:
                message, param = problem
                await _send_json(send, 400, error_payload(400, message, param=param))
                return
            other = None
            if self.models is not None and isinstance(data, dict):
                other = self.models.app_for(data.get("model"))
            if other is not None:
                # Another model of the endpoint (a body too large for HAProxy to route).
                app = self.models.forward_app(other, body)
                unavailable = _never
                forwarding = True
            elif (reason := self._unavailable()) is not None:
                await _send_json(
                    send, 503, error_payload(503, reason), retry_after=self._retry_after
                )
                return
            receive = _replay(body, receive)
        assert app is not None
        tracker = _ResponseTracker(send, unavailable, self._retry_after)

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self._max_body:
                    raise _BodyTooLarge
            return message

        abort: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        task = asyncio.ensure_future(app(scope, limited_receive, tracker.send))
        if not forwarding:
            # (A forwarded request does not depend on this app's engine: a restart of it
            # leaves that request alone.)
            self._aborts.add(abort)
        try:
            if (timed_out := await self._wait(task, abort, tracker)) is not None:
                await _cancel(task)  # aborts the engine request
                if abort.done():
                    await tracker.fail(503, abort.result(), retry_after=self._retry_after)
                else:
                    await tracker.fail(504, timed_out)
                return
            task.result()
        except _BodyTooLarge:
            if not tracker.started:
                await _send_json(send, 413, self._too_large())
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if (reason := self.state.unavailable()) is not None:
                await tracker.fail(503, reason, retry_after=self._retry_after)
            else:
                logger.exception("request failed inside the server")
                await tracker.fail(500, f"internal server error ({type(exc).__name__})")
        finally:
            self._aborts.discard(abort)
            if not task.done():
                task.cancel()

    def _body_problem(
        self, path: str, body: bytes, data: Any = _UNPARSED
    ) -> tuple[str, str | None] | None:
        """(message, param) when a JSON body breaks the server's bounds, else None."""
        if data is _UNPARSED:
            data = _json_or_none(body)
        if data is _TOO_DEEP:
            return f"JSON nested deeper than {MAX_JSON_DEPTH} levels", None
        if data is None:
            return None  # vLLM answers malformed JSON with its own 400
        if json_depth_exceeds(data):
            return f"JSON nested deeper than {MAX_JSON_DEPTH} levels", None
        return body_problem(path, data, self._limits)

    async def _wait(
        self, task: asyncio.Future, abort: asyncio.Future, tracker: _ResponseTracker
    ) -> str | None:
        """Wait for the app (or an abort); the reason when a time limit ended it instead:
        the request timeout, or a stream with no output for the idle timeout."""
        loop = asyncio.get_running_loop()
        deadline = None if self._timeout is None else loop.time() + self._timeout
        while True:
            now = loop.time()
            waits = [] if deadline is None else [deadline - now]
            if self._idle_timeout is not None:
                # Before a stream starts this only re-checks; after, it is the idle deadline.
                last = tracker.last_sent if tracker.streaming else now
                waits.append(last + self._idle_timeout - now)
            timeout = max(0.0, min(waits)) if waits else None
            await asyncio.wait((task, abort), timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            if task.done() or abort.done():
                return None if task.done() else "aborted"
            now = loop.time()
            if deadline is not None and now >= deadline:
                return f"request took longer than the server's limit of {self._timeout:g}s"
            if (
                self._idle_timeout is not None
                and tracker.streaming
                and not tracker.finished
                and now - tracker.last_sent >= self._idle_timeout
            ):
                return (
                    f"no output for {self._idle_timeout:g}s (the server's stream idle "
                    "limit): the request was aborted"
                )

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return


def _replay(body: bytes, receive: Receive) -> Receive:
    """A `receive` that first yields the already-read body, then the client's later messages
    (so a disconnect still reaches the app and aborts the engine request)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _cancel(task: asyncio.Future, grace_s: float = 2.0) -> None:
    """Cancel a request's task and give it a moment to unwind (abort its engine request)."""
    task.cancel()
    await asyncio.wait((task,), timeout=grace_s)
    if task.done() and not task.cancelled():
        task.exception()  # retrieved: no "exception was never retrieved" noise


class _BodyTooLarge(Exception):
    pass


class _ClientGone(Exception):
    pass


class _ResponseTracker:
    """Wraps `send`: rewrites error answers into OpenAI's shape, ends broken streams cleanly."""

    def __init__(
        self,
        send: Send,
        unavailable: Callable[[], str | None] = lambda: None,
        retry_after: bytes | None = None,
    ) -> None:
        self._send = send
        # A 5xx the app answers while the engine is gone becomes a 503 with Retry-After.
        self._unavailable = unavailable
        self._retry_after = retry_after
        self.started = False
        self.finished = False
        self.status = 0
        self.streaming = False
        # When the last body chunk went out (event loop clock): the stream idle timeout.
        self.last_sent = asyncio.get_running_loop().time()
        self._held_start: Message | None = None
        self._held_body: list[bytes] = []

    async def send(self, message: Message) -> None:
        kind = message["type"]
        self.last_sent = asyncio.get_running_loop().time()
        if kind == "http.response.start":
            self.started = True
            self.status = int(message["status"])
            headers = message.get("headers", [])
            ctype = next((v for k, v in headers if k.lower() == b"content-type"), b"")
            self.streaming = ctype.startswith(b"text/event-stream")
            if self.status >= 400 and not self.streaming:
                self._held_start = message
                return
        elif kind == "http.response.body" and self._held_start is not None:
            self._held_body.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            body = normalize_error_body(self.status, b"".join(self._held_body))
            start = self._held_start
            self._held_start = None
            dropped = [b"content-length", b"content-type"]
            extra: list[tuple[bytes, bytes]] = []
            if self.status >= 500 and (reason := self._unavailable()) is not None:
                start = {**start, "status": 503}
                body = json.dumps(error_payload(503, reason)).encode()
                if self._retry_after is not None:
                    dropped.append(b"retry-after")
                    extra.append((b"retry-after", self._retry_after))
            headers = [(k, v) for k, v in start.get("headers", []) if k.lower() not in dropped]
            headers += [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *extra,
            ]
            await self._send({**start, "headers": headers})
            await self._send({"type": "http.response.body", "body": body})
            self.finished = True
            return
        if kind == "http.response.body":
            if (
                self.streaming
                and message.get("body", b"").startswith(SSE_ERROR_PREFIX)
                and (reason := self._unavailable()) is not None
            ):
                # vLLM's own error event for a request its dead engine dropped: the same 503
                # event as when the watchdog ends the stream, whichever noticed first.
                event = json.dumps(error_payload(503, reason))
                message = {**message, "body": f"data: {event}\n\n".encode()}
            if not message.get("more_body", False):
                self.finished = True
        await self._send(message)

    async def fail(self, status: int, message: str, *, retry_after: bytes | None = None) -> None:
        """Answer an error: a JSON error before the response began, an SSE error event after."""
        with contextlib.suppress(Exception):
            if not self.started or self._held_start is not None:
                # Nothing sent yet (an error answer being held counts as nothing).
                await _send_json(
                    self._send, status, error_payload(status, message), retry_after=retry_after
                )
                self.finished = True
            elif self.streaming and not self.finished:
                event = json.dumps(error_payload(status, message))
                chunk = f"data: {event}\n\ndata: [DONE]\n\n".encode()
                await self._send({"type": "http.response.body", "body": chunk})
                self.finished = True
            elif not self.finished:
                await self._send({"type": "http.response.body", "body": b""})
                self.finished = True


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def _count_and_tag(send: Send, request_id: str | None, label: str) -> Send:
    """Count every answer by status code; add X-Request-Id unless Serve does it."""
    rid = None if request_id is None else request_id.encode("latin-1", "replace")[:128]

    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.start":
            if rid is not None:
                headers = [
                    (k, v) for k, v in message.get("headers", []) if k.lower() != REQUEST_ID_HEADER
                ]
                headers.append((REQUEST_ID_HEADER, rid))
                message = {**message, "headers": headers}
            REQUESTS.labels(path=label, status=str(message["status"])).inc()
        await send(message)

    return wrapped


async def _send_json(
    send: Send,
    status: int,
    payload: dict[str, Any],
    *,
    retry_after: bytes | None = None,
    extra: list[tuple[bytes, bytes]] | None = None,
) -> None:
    body = json.dumps(payload, allow_nan=False).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if retry_after is not None:
        headers.append((b"retry-after", retry_after))
    headers += extra or []
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


# --- the HTTP server's own limits ---------------------------------------------------------------
# Ray Serve's direct-ingress server is uvicorn, started by Serve with only a keep-alive timeout:
# uvicorn has no header-read timeout, and its `limit_concurrency` would count slow sockets and
# refuse everyone else. The replica makes Serve's server use this protocol instead
# (install_http_limits): a connection that has not sent a whole request head within
# ``header_timeout_s`` (on connect, and after each answer on a kept-alive connection) is closed,
# and a connection past ``max_connections`` gets a 503 and is closed at once.

HTTP_PROTOCOL_SPEC = "serve.api:LimitedHTTPProtocol"


def _auto_http_protocol() -> type:
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    return AutoHTTPProtocol


class LimitedHTTPProtocol(_auto_http_protocol()):  # type: ignore[misc]
    """uvicorn's HTTP protocol with a header-read timeout and a connection cap."""

    header_timeout_s: float = 30.0
    max_connections: int = 2048

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_timer: asyncio.TimerHandle | None = None
        if len(self.connections) > self.max_connections:
            body = json.dumps(
                error_payload(503, f"server is at its limit of {self.max_connections} connections")
            ).encode()
            transport.write(
                b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
                + f"content-length: {len(body)}\r\nretry-after: 1\r\n".encode()
                + b"connection: close\r\n\r\n"
                + body
            )
            transport.close()
            return
        self._arm_head_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_head_timer()  # the next request's head must come in time too

    def connection_lost(self, exc: Exception | None) -> None:
        if getattr(self, "_head_timer", None) is not None:
            self._head_timer.cancel()
        super().connection_lost(exc)

    def _arm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_timed_out)

    def _head_timed_out(self) -> None:
        self._head_timer = None
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            return  # a request is running: the gateway's own timeouts bound it
        self.transport.close()


def install_http_limits(*, header_timeout_s: float, max_connections: int) -> None:
    """Make every uvicorn server this process starts afterwards (Ray Serve's direct ingress
    among them) use LimitedHTTPProtocol with these limits."""
    from uvicorn.config import HTTP_PROTOCOLS

    LimitedHTTPProtocol.header_timeout_s = header_timeout_s
    LimitedHTTPProtocol.max_connections = max_connections
    HTTP_PROTOCOLS["auto"] = HTTP_PROTOCOL_SPEC
