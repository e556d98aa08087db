"""The HTTP front of the server: auth, limits, OpenAI-shaped errors, /health, /ready, counters."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from prometheus_client import Counter, Gauge

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
# Paths the request counter names; anything else is counted as "other" (bounded labels).
COUNTED_PATHS = frozenset(
    {"/v1/chat/completions", "/v1/completions", "/v1/models", "/metrics", "/health", "/ready"}
)

# Roles OpenAI's chat API knows; vLLM would render any string through the chat template.
CHAT_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
CHAT_PATH = "/v1/chat/completions"

REQUESTS = Counter(
    "llamacluster_http_requests",
    "HTTP requests answered by the llamacluster server, by route and status code.",
    ["path", "status"],
)
IN_FLIGHT = Gauge(
    "llamacluster_requests_in_flight", "Requests inside the server (running + queued)."
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
                type_=err.get("type") or None,
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


def chat_messages_problem(body: bytes) -> str | None:
    """What is wrong with a chat request's `messages` (None when fine or not JSON at all).

    vLLM checks most fields itself; it accepts unknown roles, so they are checked here.
    """
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None  # vLLM answers malformed JSON with its own 400
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
    """What the gateway needs to know about the engine behind it (set by serve.app)."""

    app: ASGIApp | None = None
    loading_error: str | None = None
    engine_error: Callable[[], BaseException | None] = lambda: None
    last_probe_ok: float | None = None
    last_probe_error: str | None = None
    probe_max_age_s: float = 60.0

    def ready(self) -> tuple[bool, str]:
        """Ready = the engine answered a one-token generation recently."""
        if self.app is None:
            return False, self.loading_error or "model is loading"
        if (err := self.engine_error()) is not None:
            return False, f"engine failed: {err}"
        if self.last_probe_ok is None:
            return False, "waiting for the first test generation"
        age = time.monotonic() - self.last_probe_ok
        if age > self.probe_max_age_s:
            reason = self.last_probe_error or "no answer"
            return False, f"last successful test generation {age:.0f}s ago ({reason})"
        return True, "ready"

    def healthy(self) -> tuple[bool, str]:
        """Healthy = the process runs and the engine has not died (loading counts as alive)."""
        if self.loading_error is not None:
            return False, f"engine failed to start: {self.loading_error}"
        if self.app is not None and (err := self.engine_error()) is not None:
            return False, f"engine failed: {err}"
        return True, "loading" if self.app is None else "ok"


class Gateway:
    """ASGI middleware around vLLM's OpenAI app: every rule of the public endpoint in one place.

    Order per request: request id → open probes → auth (default deny) → loading (503) →
    content type (415) / body size (413) → load bound (429) → the app, with a timeout and with
    every error answer rewritten into OpenAI's shape.
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
    ) -> None:
        self._keys = [key_digest(k) for k in api_keys] + list(api_key_digests)
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
        path = scope.get("path", "")
        label = path if path in COUNTED_PATHS else "other"
        send = _count_and_tag(send, request_id if self._add_request_id else None, label)

        if path in OPEN_PATHS and scope.get("method") in ("GET", "HEAD"):
            ok, reason = self.state.ready() if path == "/ready" else self.state.healthy()
            status = 200 if ok else 503
            await _send_json(
                send,
                status,
                {"status": reason} if ok else error_payload(status, reason),
                retry_after=None if ok else self._retry_after,
            )
            return

        if not self._no_auth and not key_matches(bearer_token(scope["headers"]), self._keys):
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

        app = self.state.app
        if app is None:
            reason = self.state.loading_error or "the model is still loading"
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

        self.in_flight += 1
        IN_FLIGHT.inc()
        try:
            await self._call_app(app, scope, receive, send)
        finally:
            self.in_flight -= 1
            IN_FLIGHT.dec()

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

    async def _call_app(self, app: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None:
        tracker = _ResponseTracker(send)
        received = 0

        if scope.get("method") == "POST" and scope.get("path") == CHAT_PATH:
            try:
                body = await self._read_body(receive)
            except _ClientGone:
                return
            if body is None:
                await _send_json(send, 413, self._too_large())
                return
            if (problem := chat_messages_problem(body)) is not None:
                await _send_json(send, 400, error_payload(400, problem, param="messages"))
                return
            receive = _replay(body, receive)

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self._max_body:
                    raise _BodyTooLarge
            return message

        try:
            if self._timeout is None:
                await app(scope, limited_receive, tracker.send)
            else:
                await asyncio.wait_for(app(scope, limited_receive, tracker.send), self._timeout)
        except _BodyTooLarge:
            if not tracker.started:
                await _send_json(send, 413, self._too_large())
        except asyncio.TimeoutError:
            message = f"request took longer than the server's limit of {self._timeout:g}s"
            await tracker.fail(504, message)
        except Exception as exc:
            logger.exception("request failed inside the server")
            await tracker.fail(500, f"internal server error ({type(exc).__name__})")

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


class _BodyTooLarge(Exception):
    pass


class _ClientGone(Exception):
    pass


class _ResponseTracker:
    """Wraps `send`: rewrites error answers into OpenAI's shape, ends broken streams cleanly."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self.started = False
        self.finished = False
        self.status = 0
        self.streaming = False
        self._held_start: Message | None = None
        self._held_body: list[bytes] = []

    async def send(self, message: Message) -> None:
        kind = message["type"]
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
            headers = [
                (k, v)
                for k, v in start.get("headers", [])
                if k.lower() not in (b"content-length", b"content-type")
            ]
            headers += [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ]
            await self._send({**start, "headers": headers})
            await self._send({"type": "http.response.body", "body": body})
            self.finished = True
            return
        if kind == "http.response.body" and not message.get("more_body", False):
            self.finished = True
        await self._send(message)

    async def fail(self, status: int, message: str) -> None:
        """Answer an error: a JSON error before the response began, an SSE error event after."""
        with contextlib.suppress(Exception):
            if not self.started:
                await _send_json(self._send, status, error_payload(status, message))
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
