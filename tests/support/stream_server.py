"""A deterministic OpenAI-shaped SSE server on loopback: tokens at known times, injectable faults."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route


@dataclass
class StreamBehaviour:
    """How the server answers; times in milliseconds from the request's arrival."""

    ttft_ms: float = 50.0  # first token chunk after this
    itl_ms: float = 10.0  # then one chunk every itl_ms
    tokens_per_chunk: int = 1
    role_chunk: bool = True  # chat: a role-only chunk right away (carries no token)
    send_usage: bool = True  # honour stream_options.include_usage
    accept_ignore_eos: bool = True  # False: 400 when ignore_eos is sent
    fail_every: int | None = None  # every n-th request (1-based) gets a 500
    drop_every: int | None = None  # every n-th request loses its connection mid-stream
    busy_first: int = 0  # the first n requests after busy_after get 503 + Retry-After
    busy_after: int = 0
    busy_retry_after: str = "1"
    model: str = "tiny-test"


@dataclass
class StreamServer:
    """A running server: its URL, behaviour (changeable live) and what it received."""

    behaviour: StreamBehaviour
    base_url: str = ""
    received: list[dict[str, Any]] = field(default_factory=list)
    arrivals: list[float] = field(default_factory=list)  # time.perf_counter() at arrival
    # (prompt text, perf_counter times at which each token chunk was handed to the transport)
    emissions: list[tuple[str, list[float]]] = field(default_factory=list)
    _count: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _next(self, body: dict[str, Any]) -> int:
        with self._lock:
            self._count += 1
            self.received.append(body)
            self.arrivals.append(time.perf_counter())
            return self._count


def _prompt_key(body: dict[str, Any]) -> str:
    """The request's prompt, or its last message's content: how tests match requests."""
    if "prompt" in body:
        return str(body["prompt"])
    return str((body.get("messages") or [{}])[-1].get("content", ""))


def _token_text(i: int) -> str:
    return f" t{i}"


def build_app(server: StreamServer) -> Starlette:
    """The Starlette app: /v1/models, /v1/chat/completions and /v1/completions."""

    async def models(_: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [{"id": server.behaviour.model}]})

    async def generate(request: Request) -> Any:
        t0 = time.perf_counter()
        body = await request.json()
        n = server._next(body)
        beh = server.behaviour
        chat = request.url.path.endswith("/chat/completions")
        if "ignore_eos" in body and not beh.accept_ignore_eos:
            return JSONResponse(
                {"error": {"message": "ignore_eos is not a known field", "type": "invalid"}},
                status_code=400,
            )
        if beh.busy_after < n <= beh.busy_after + beh.busy_first:
            return JSONResponse(
                {"error": {"message": "loading", "code": 503}},
                status_code=503,
                headers={"Retry-After": beh.busy_retry_after},
            )
        if beh.fail_every and n % beh.fail_every == 0:
            return JSONResponse({"error": {"message": "injected failure"}}, status_code=500)
        max_tokens = int(body.get("max_tokens", 16))
        usage = beh.send_usage and (body.get("stream_options") or {}).get("include_usage")
        drop = bool(beh.drop_every and n % beh.drop_every == 0)
        times: list[float] = []
        server.emissions.append((_prompt_key(body), times))
        return StreamingResponse(
            _events(
                t0, beh, chat=chat, max_tokens=max_tokens, usage=bool(usage), drop=drop, times=times
            ),
            media_type="text/event-stream",
        )

    return Starlette(
        routes=[
            Route("/v1/models", models),
            Route("/v1/chat/completions", generate, methods=["POST"]),
            Route("/v1/completions", generate, methods=["POST"]),
        ]
    )


def _sse(data: dict[str, Any] | str) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data)
    return f"data: {text}\n\n".encode()


async def _sleep_until(deadline: float) -> None:
    delay = deadline - time.perf_counter()
    if delay > 0:
        await asyncio.sleep(delay)


async def _events(
    t0: float,
    beh: StreamBehaviour,
    *,
    chat: bool,
    max_tokens: int,
    usage: bool,
    drop: bool,
    times: list[float],
):
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(text: str, finish: str | None = None, role: bool = False) -> dict[str, Any]:
        if chat:
            delta: dict[str, Any] = {"content": text}
            if role:
                delta["role"] = "assistant"
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text, "finish_reason": finish}
        return {"id": "x", "object": obj, "model": beh.model, "choices": [choice]}

    if chat and beh.role_chunk:
        yield _sse(chunk("", role=True))
    sent, k = 0, 0
    while sent < max_tokens:
        await _sleep_until(t0 + (beh.ttft_ms + k * beh.itl_ms) / 1000.0)
        n = min(beh.tokens_per_chunk, max_tokens - sent)
        text = "".join(_token_text(sent + j) for j in range(n))
        sent += n
        k += 1
        finish = "length" if sent >= max_tokens else None
        times.append(time.perf_counter())
        yield _sse(chunk(text, finish))
        if drop and sent >= max_tokens // 2:
            raise ConnectionAbortedError("injected connection drop")
    if usage:
        yield _sse(
            {
                "id": "x",
                "object": obj,
                "model": beh.model,
                "choices": [],
                "usage": {"prompt_tokens": 7, "completion_tokens": sent, "total_tokens": 7 + sent},
            }
        )
    yield _sse("[DONE]")


class _Thread(threading.Thread):
    def __init__(self, server: uvicorn.Server, sock: socket.socket) -> None:
        super().__init__(daemon=True)
        self.server, self.sock = server, sock

    def run(self) -> None:
        self.server.run(sockets=[self.sock])


def start_stream_server(behaviour: StreamBehaviour | None = None) -> tuple[StreamServer, callable]:
    """Start a server on 127.0.0.1 (free port) in a thread; returns it and a stop function."""
    server = StreamServer(behaviour=behaviour or StreamBehaviour())
    # proto=IPPROTO_TCP matters: asyncio sets TCP_NODELAY only on sockets that say they are TCP,
    # and without it Nagle holds a first token written soon after the headers for ~40 ms.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        build_app(server), loop="asyncio", http="h11", lifespan="off", log_level="critical"
    )
    uv = uvicorn.Server(config)
    thread = _Thread(uv, sock)
    thread.start()
    deadline = time.monotonic() + 10
    while not uv.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("stream server did not start")
        time.sleep(0.01)
    server.base_url = f"http://127.0.0.1:{port}/v1"

    def stop() -> None:
        uv.should_exit = True
        thread.join(timeout=10)
        sock.close()

    return server, stop


@pytest.fixture
def stream_server() -> Iterator[StreamServer]:
    """A fresh deterministic streaming server per test (change ``.behaviour`` as needed)."""
    server, stop = start_stream_server()
    try:
        yield server
    finally:
        stop()


@pytest.fixture
def stream_server_pair() -> Iterator[tuple[StreamServer, StreamServer]]:
    """Two servers, the second generating at half the speed of the first."""
    fast, stop_fast = start_stream_server(StreamBehaviour(ttft_ms=40, itl_ms=10))
    slow, stop_slow = start_stream_server(StreamBehaviour(ttft_ms=80, itl_ms=20))
    try:
        yield fast, slow
    finally:
        stop_fast()
        stop_slow()
