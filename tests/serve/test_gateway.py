"""The Gateway middleware (auth, limits, error shape, probes) around a small real Starlette app."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
from starlette.applications import Starlette
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route

from serve.api import (
    Gateway,
    ServerState,
    bearer_token,
    key_digest,
    key_matches,
    normalize_error_body,
)

pytestmark = pytest.mark.anyio

KEY = "sk-unit-key"
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def inner_app(gate: asyncio.Event | None = None) -> Starlette:
    """A stand-in for vLLM's app: echo, slow, broken-stream and raising routes."""

    async def chat(request):
        body = await request.json()
        return JSONResponse({"echo": body})

    async def slow(request):
        if gate is not None:
            await gate.wait()
        return JSONResponse({"ok": True})

    async def sleepy(request):
        await asyncio.sleep(5)
        return JSONResponse({"ok": True})

    async def broken_stream(request):
        async def events():
            yield b'data: {"n": 1}\n\n'
            raise RuntimeError("engine died")

        return StreamingResponse(events(), media_type="text/event-stream")

    async def boom(request):
        raise RuntimeError("bug")

    async def plain_error(request):
        return PlainTextResponse("teapot trouble", status_code=418)

    return Starlette(
        routes=[
            Route("/v1/chat/completions", chat, methods=["POST"]),
            Route("/v1/slow", slow, methods=["POST"]),
            Route("/v1/sleepy", sleepy),
            Route("/v1/stream", broken_stream),
            Route("/v1/boom", boom),
            Route("/v1/teapot", plain_error),
            Route("/metrics", lambda r: PlainTextResponse("m 1")),
        ]
    )


def make_gateway(*, loaded: bool = True, gate: asyncio.Event | None = None, **kwargs) -> Gateway:
    state = ServerState(app=inner_app(gate) if loaded else None)
    if loaded:
        state.last_probe_ok = time.monotonic()
    options = {"api_keys": [KEY, "sk-other"], **kwargs}
    return Gateway(state, **options)


def client(gateway: Gateway) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=gateway, raise_app_exceptions=False),
        base_url="http://test",
        headers={"Authorization": f"Bearer {KEY}"},
    )


def assert_openai_error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["x-request-id"]
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def test_bearer_parsing_and_constant_time_match() -> None:
    assert bearer_token([(b"authorization", b"Bearer abc")]) == "abc"
    assert bearer_token([(b"Authorization", b"bearer abc")]) == "abc"
    assert bearer_token([(b"authorization", b"Basic abc")]) is None
    assert bearer_token([]) is None
    keys = [key_digest("one"), key_digest("two")]
    assert key_matches("two", keys)
    assert not key_matches("three", keys)
    assert not key_matches("", keys)
    assert not key_matches(None, keys)


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({}, 401),
        ({"Authorization": "Bearer wrong"}, 401),
        ({"Authorization": "Bearer"}, 401),
        ({"Authorization": f"Basic {KEY}"}, 401),
        ({"Authorization": KEY}, 401),
        ({"Authorization": f"bearer {KEY}"}, 200),
        ({"Authorization": f"BEARER {KEY}"}, 200),
        ({"Authorization": "Bearer sk-other"}, 200),
    ],
)
async def test_auth_matrix(headers: dict, status: int) -> None:
    async with client(make_gateway()) as c:
        c.headers.pop("Authorization")
        response = await c.post("/v1/chat/completions", json=CHAT, headers=headers)
    if status == 401:
        error = assert_openai_error(response, 401)
        assert response.headers["www-authenticate"] == "Bearer"
        assert error["code"] == "invalid_api_key"
        assert KEY not in response.text
    else:
        assert response.status_code == 200


@pytest.mark.parametrize("path", ["/metrics", "/docs", "/openapi.json", "/anything"])
async def test_default_deny_everywhere_but_probes(path: str) -> None:
    async with client(make_gateway()) as c:
        assert_openai_error(await c.get(path, headers={"Authorization": ""}), 401)
        c.headers.pop("Authorization")
        assert (await c.get("/health")).status_code == 200
        assert (await c.get("/ready")).status_code == 200


async def test_no_auth_is_explicit() -> None:
    with pytest.raises(ValueError, match="no_auth"):
        Gateway(ServerState(), api_keys=[])
    async with client(make_gateway(api_keys=[], no_auth=True)) as c:
        c.headers.pop("Authorization")
        assert (await c.get("/metrics")).status_code == 200


async def test_loading_answers_503_with_retry_after() -> None:
    async with client(make_gateway(loaded=False, retry_after_s=3)) as c:
        ready = await c.get("/ready")
        assert_openai_error(ready, 503)
        assert ready.headers["retry-after"] == "3"
        health = (await c.get("/health")).json()
        assert health["status"] == "loading" and health["engine"]["state"] == "loading"
        assert_openai_error(await c.post("/v1/chat/completions", json=CHAT), 503)


async def test_ready_goes_stale_without_a_recent_probe() -> None:
    gateway = make_gateway()
    gateway.state.probe_max_age_s = 1.0
    gateway.state.last_probe_ok = time.monotonic() - 5
    gateway.state.last_probe_error = "TimeoutError: "
    async with client(gateway) as c:
        error = assert_openai_error(await c.get("/ready"), 503)
        assert "TimeoutError" in error["message"]


async def test_dead_engine_fails_health() -> None:
    gateway = make_gateway()
    gateway.state.engine_error = lambda: RuntimeError("core process exited")
    async with client(gateway) as c:
        assert "core process exited" in assert_openai_error(await c.get("/health"), 503)["message"]


async def test_content_type_and_body_size() -> None:
    async with client(make_gateway(max_body_bytes=1024)) as c:
        assert_openai_error(
            await c.post(
                "/v1/chat/completions",
                content=json.dumps(CHAT),
                headers={"content-type": "text/plain"},
            ),
            415,
        )
        big = {**CHAT, "messages": [{"role": "user", "content": "x" * 4000}]}
        assert_openai_error(await c.post("/v1/chat/completions", json=big), 413)

        async def chunks():
            for _ in range(8):
                yield b"x" * 512

        chunked = await c.post(
            "/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"}
        )
        assert_openai_error(chunked, 413)


@pytest.mark.parametrize(
    ("messages", "needle"),
    [
        (None, "required"),
        ([], "non-empty"),
        ([{"role": "wizard", "content": "x"}], "wizard"),
        (["just text"], "messages[0]"),
    ],
)
async def test_chat_messages_are_checked(messages, needle: str) -> None:
    body = {"model": "m"} if messages is None else {"model": "m", "messages": messages}
    async with client(make_gateway()) as c:
        error = assert_openai_error(await c.post("/v1/chat/completions", json=body), 400)
    assert needle in error["message"] and error["param"] == "messages"


async def test_valid_chat_body_reaches_the_app_unchanged() -> None:
    async with client(make_gateway()) as c:
        response = await c.post("/v1/chat/completions", json=CHAT)
    assert response.status_code == 200 and response.json() == {"echo": CHAT}


async def test_past_the_bound_is_a_fast_429() -> None:
    gate = asyncio.Event()
    gateway = make_gateway(gate=gate, max_ongoing_requests=2, retry_after_s=2)
    async with client(gateway) as c:
        held = [asyncio.create_task(c.post("/v1/slow", json={})) for _ in range(2)]
        while gateway.in_flight < 2:
            await asyncio.sleep(0.01)
        started = time.monotonic()
        rejected = await c.post("/v1/slow", json={})
        assert time.monotonic() - started < 0.5
        assert_openai_error(rejected, 429)
        assert rejected.headers["retry-after"] == "2"
        gate.set()
        assert [r.status_code for r in await asyncio.gather(*held)] == [200, 200]
        assert gateway.in_flight == 0


async def test_timeout_is_a_504() -> None:
    async with client(make_gateway(request_timeout_s=0.2)) as c:
        error = assert_openai_error(await c.get("/v1/sleepy"), 504)
    assert "0.2s" in error["message"]


async def test_stream_failure_ends_with_error_event_and_done() -> None:
    async with client(make_gateway()) as c:
        response = await c.get("/v1/stream")
    assert response.status_code == 200
    events = [line for line in response.text.splitlines() if line.startswith("data: ")]
    assert events[0] == 'data: {"n": 1}'
    assert json.loads(events[1][6:])["error"]["code"] == 500
    assert events[-1] == "data: [DONE]"


async def test_every_error_gets_openai_shape() -> None:
    async with client(make_gateway()) as c:
        assert_openai_error(await c.get("/v1/nope"), 404)
        assert_openai_error(await c.delete("/v1/chat/completions"), 405)
        assert_openai_error(await c.get("/v1/boom"), 500)
        teapot = assert_openai_error(await c.get("/v1/teapot"), 418)
    assert teapot["message"] == "teapot trouble"


async def test_request_id_is_kept_or_made() -> None:
    async with client(make_gateway()) as c:
        given = await c.get("/health", headers={"x-request-id": "abc-123"})
        made = await c.get("/health")
    assert given.headers["x-request-id"] == "abc-123"
    assert len(made.headers["x-request-id"]) >= 16


def test_normalize_keeps_vllm_errors_and_wraps_others() -> None:
    vllm_body = json.dumps(
        {"error": {"message": "bad", "type": "BadRequestError", "param": "top_p", "code": 400}}
    ).encode()
    assert json.loads(normalize_error_body(400, vllm_body))["error"]["param"] == "top_p"
    wrapped = json.loads(normalize_error_body(422, b'{"detail": [{"msg": "field required"}]}'))
    assert "field required" in wrapped["error"]["message"]
    assert json.loads(normalize_error_body(401, b'{"error": "Unauthorized"}'))["error"] == {
        "message": "Unauthorized",
        "type": "authentication_error",
        "param": None,
        "code": 401,
    }
