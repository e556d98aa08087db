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
    CHAT_PATH,
    BodyLimits,
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


def inner_app(gate: asyncio.Event | None = None, events: list[str] | None = None) -> Starlette:
    """A stand-in for vLLM's app on the public routes: chat echoes; /v1/completions behaves as
    its `prompt` says (slow, sleepy, a broken or an idle stream, raising, a plain-text error)."""
    seen = events if events is not None else []

    async def chat(request):
        body = await request.json()
        return JSONResponse({"echo": body})

    async def completions(request):
        behavior = (await request.json()).get("prompt")
        if behavior == "slow":
            if gate is not None:
                await gate.wait()
        elif behavior == "sleepy":
            await asyncio.sleep(5)
        elif behavior == "stream":

            async def broken():
                yield b'data: {"n": 1}\n\n'
                raise RuntimeError("engine died")

            return StreamingResponse(broken(), media_type="text/event-stream")
        elif behavior == "idle":

            async def idle():
                try:
                    yield b'data: {"n": 1}\n\n'
                    await asyncio.sleep(60)
                    yield b'data: {"n": 2}\n\n'
                except asyncio.CancelledError:
                    seen.append("cancelled")  # what aborts the engine request in vLLM
                    raise

            return StreamingResponse(idle(), media_type="text/event-stream")
        elif behavior == "boom":
            raise RuntimeError("bug")
        elif behavior == "teapot":
            return PlainTextResponse("teapot trouble", status_code=418)
        return JSONResponse({"ok": True})

    return Starlette(
        routes=[
            Route("/v1/chat/completions", chat, methods=["POST"]),
            Route("/v1/completions", completions, methods=["POST"]),
            Route("/metrics", lambda r: PlainTextResponse("m 1")),
            Route("/scale_elastic_ep", lambda r: JSONResponse({"scaled": True}), methods=["POST"]),
        ]
    )


def completion(behavior: str) -> dict:
    return {"model": "m", "prompt": behavior}


def make_gateway(
    *,
    loaded: bool = True,
    gate: asyncio.Event | None = None,
    events: list[str] | None = None,
    **kwargs,
) -> Gateway:
    state = ServerState(app=inner_app(gate, events) if loaded else None)
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
        held = [
            asyncio.create_task(c.post("/v1/completions", json=completion("slow")))
            for _ in range(2)
        ]
        while gateway.in_flight < 2:
            await asyncio.sleep(0.01)
        started = time.monotonic()
        rejected = await c.post("/v1/completions", json=completion("slow"))
        assert time.monotonic() - started < 0.5
        assert_openai_error(rejected, 429)
        assert rejected.headers["retry-after"] == "2"
        gate.set()
        assert [r.status_code for r in await asyncio.gather(*held)] == [200, 200]
        assert gateway.in_flight == 0


async def test_timeout_is_a_504() -> None:
    async with client(make_gateway(request_timeout_s=0.2)) as c:
        error = assert_openai_error(await c.post("/v1/completions", json=completion("sleepy")), 504)
    assert "0.2s" in error["message"]


async def test_stream_failure_ends_with_error_event_and_done() -> None:
    async with client(make_gateway()) as c:
        response = await c.post("/v1/completions", json=completion("stream"))
    assert response.status_code == 200
    events = [line for line in response.text.splitlines() if line.startswith("data: ")]
    assert events[0] == 'data: {"n": 1}'
    assert json.loads(events[1][6:])["error"]["code"] == 500
    assert events[-1] == "data: [DONE]"


async def test_every_error_gets_openai_shape() -> None:
    async with client(make_gateway()) as c:
        assert_openai_error(await c.get("/v1/nope"), 404)
        assert_openai_error(await c.delete("/v1/chat/completions"), 405)
        assert_openai_error(await c.post("/v1/completions", json=completion("boom")), 500)
        teapot = assert_openai_error(
            await c.post("/v1/completions", json=completion("teapot")), 418
        )
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


# --- routes, probes without a key, body bounds, stream idle -----------------------------------

ADMIN = "sk-admin-key"


async def test_operational_routes_are_404_without_an_admin_key() -> None:
    async with client(make_gateway()) as c:
        error = assert_openai_error(await c.post("/scale_elastic_ep", json={}), 404)
        assert error["type"] == "not_found_error"
        # Not even an admin key helps when the server has none configured.
        denied = await c.post(
            "/scale_elastic_ep", json={}, headers={"Authorization": f"Bearer {ADMIN}"}
        )
        assert_openai_error(denied, 401)
        assert (await c.get("/metrics")).status_code == 200


async def test_admin_key_reaches_operational_routes_and_only_it() -> None:
    gateway = make_gateway(admin_key_digests=[key_digest(ADMIN)])
    async with client(gateway) as c:
        assert_openai_error(await c.post("/scale_elastic_ep", json={}), 404)
        admin = {"Authorization": f"Bearer {ADMIN}"}
        scaled = await c.post("/scale_elastic_ep", json={}, headers=admin)
        assert scaled.status_code == 200 and scaled.json() == {"scaled": True}
        # The admin key is a key for the public routes too; no key is still a 401.
        assert (await c.post("/v1/chat/completions", json=CHAT, headers=admin)).status_code == 200
        assert_openai_error(
            await c.post("/scale_elastic_ep", json={}, headers={"Authorization": ""}), 401
        )


async def test_probes_without_a_key_hide_internal_errors() -> None:
    secret = "OSError: /srv/models/secret-path/config.json: Traceback (most recent call last)"
    gateway = make_gateway()
    gateway.state.engine_error = lambda: RuntimeError(secret)
    gateway.state.last_probe_error = secret
    async with client(gateway) as c:
        c.headers.pop("Authorization")
        health, ready = await c.get("/health"), await c.get("/ready")
        assert health.status_code == 503 and ready.status_code == 503
        for response in (health, ready):
            assert_openai_error(response, 503)
            assert "secret-path" not in response.text and "Traceback" not in response.text
        assert health.json()["status"] == "failed"
        assert health.json()["error"]["message"] == "engine failed"
        assert ready.json()["error"]["message"] == "not ready (failed)"
        keyed = {"Authorization": f"Bearer {KEY}"}
        assert "secret-path" in (await c.get("/health", headers=keyed)).text
        assert "secret-path" in (await c.get("/ready", headers=keyed)).text


async def test_health_without_a_key_keeps_states_and_drops_free_text() -> None:
    gateway = make_gateway()
    gateway.state.set_phase("restarting")
    gateway.state.cause, gateway.state.detail = "stall", "worker 1234 at /tmp/x hung"
    gateway.state.attempt, gateway.state.max_attempts = 1, 5
    gateway.state.restart_history = lambda: [
        {
            "cause": "stall",
            "detail": "at /tmp/x",
            "error": "Boom",
            "attempt": 1,
            "outcome": "failed",
        }
    ]
    async with client(gateway) as c:
        c.headers.pop("Authorization")
        body = (await c.get("/health")).json()
    assert body["status"] == "restarting" and "/tmp/x" not in json.dumps(body)
    assert (body["engine"]["state"], body["engine"]["cause"], body["engine"]["attempt"]) == (
        "restarting",
        "stall",
        1,
    )
    assert body["restarts"] == [{"cause": "stall", "attempt": 1, "outcome": "failed"}]


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/chat/completions", {**CHAT, "n": 9}, "n"),
        ("/v1/chat/completions", {**CHAT, "max_completion_tokens": 5000}, "max_completion_tokens"),
        ("/v1/completions", {**completion("x"), "max_tokens": 4097}, "max_tokens"),
        ("/v1/completions", {**completion("x"), "n": 100}, "n"),
    ],
)
async def test_n_and_max_tokens_are_capped(path: str, body: dict, param: str) -> None:
    gateway = make_gateway(body_limits=BodyLimits(max_n=8, max_tokens=4096))
    async with client(gateway) as c:
        error = assert_openai_error(await c.post(path, json=body), 400)
        assert error["param"] == param and "at most" in error["message"]
        within = {**body, param: 8 if param == "n" else 4096}
        assert (await c.post(path, json=within)).status_code == 200


@pytest.mark.parametrize("depth", [65, 5000, 200_000])
async def test_deeply_nested_json_is_a_400(depth: int) -> None:
    nested = "[" * depth + "]" * depth
    body = f'{{"model": "m", "messages": [{{"role": "user", "content": "hi"}}], "x": {nested}}}'
    async with client(make_gateway()) as c:
        for path in ("/v1/chat/completions", "/v1/completions", "/tokenize"):
            response = await c.post(
                path, content=body, headers={"content-type": "application/json"}
            )
            assert "nested deeper than 64" in assert_openai_error(response, 400)["message"]
        shallow = {**CHAT, "x": [[[[1]]]]}
        assert (await c.post("/v1/chat/completions", json=shallow)).status_code == 200


def image_chat(url: str) -> dict:
    part = {"type": "image_url", "image_url": {"url": url}}
    return {"model": "m", "messages": [{"role": "user", "content": [part]}]}


async def test_media_urls_are_refused_unless_their_domain_is_allowed() -> None:
    inline = image_chat("data:image/png;base64,iVBORw0KGgo=")
    async with client(make_gateway()) as c:
        for url in ("https://example.com/cat.png", "HTTP://169.254.169.254/latest", "http://[::1"):
            error = assert_openai_error(await c.post(CHAT_PATH, json=image_chat(url)), 400)
            assert "--allowed-media-domains" in error["message"] and error["param"] == "messages"
        audio = {"type": "audio_url", "audio_url": "http://example.com/a.wav"}
        plain = {"model": "m", "messages": [{"role": "user", "content": [audio]}]}
        assert_openai_error(await c.post(CHAT_PATH, json=plain), 400)
        assert (await c.post(CHAT_PATH, json=inline)).status_code == 200
    limits = BodyLimits(allowed_media_domains=frozenset({"images.example.org"}))
    async with client(make_gateway(body_limits=limits)) as c:
        ok = await c.post(CHAT_PATH, json=image_chat("https://images.example.org/cat.png"))
        assert ok.status_code == 200
        other = await c.post(CHAT_PATH, json=image_chat("https://evil.example.net/cat.png"))
        assert "not on an allowed domain" in assert_openai_error(other, 400)["message"]


async def test_idle_stream_ends_with_error_event_done_and_abort() -> None:
    events: list[str] = []
    gateway = make_gateway(events=events, stream_idle_timeout_s=0.3)
    async with client(gateway) as c:
        started = time.monotonic()
        response = await c.post("/v1/completions", json=completion("idle"))
        took = time.monotonic() - started
    assert response.status_code == 200 and 0.3 <= took < 3
    lines = [line for line in response.text.splitlines() if line.startswith("data: ")]
    assert lines[0] == 'data: {"n": 1}' and lines[-1] == "data: [DONE]"
    error = json.loads(lines[1][6:])["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == 504 and "no output for 0.3s" in error["message"]
    assert events == ["cancelled"]
    assert gateway.in_flight == 0


async def test_idle_timeout_does_not_end_a_slow_non_streaming_answer() -> None:
    gate = asyncio.Event()
    gateway = make_gateway(gate=gate, stream_idle_timeout_s=0.2)
    async with client(gateway) as c:
        pending = asyncio.create_task(c.post("/v1/completions", json=completion("slow")))
        await asyncio.sleep(0.6)
        gate.set()
        assert (await pending).status_code == 200


async def test_stale_ready_without_a_key_says_only_not_ready() -> None:
    gateway = make_gateway()
    gateway.state.probe_max_age_s = 1.0
    gateway.state.last_probe_ok = time.monotonic() - 5
    gateway.state.last_probe_error = "TimeoutError: at /srv/x"
    async with client(gateway) as c:
        c.headers.pop("Authorization")
        error = assert_openai_error(await c.get("/ready"), 503)
    assert error["message"] == "not ready"
