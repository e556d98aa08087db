"""Live key reload: the Gateway follows the published keys over real HTTP (uvicorn, Starlette)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from cluster import keys as k
from serve.api import Gateway, ServerState, key_digest

pytestmark = pytest.mark.anyio

POLL_S = 0.2


def inner_app(gate: asyncio.Event) -> Starlette:
    """A stand-in for vLLM's app: /v1/models, and a stream that holds after its first event
    until ``gate`` opens."""

    async def models(request):
        return JSONResponse({"object": "list", "data": []})

    async def stream(request):
        async def events():
            yield b'data: {"n": 0}\n\n'
            await gate.wait()
            for n in range(1, 4):
                yield f'data: {{"n": {n}}}\n\n'.encode()
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return Starlette(
        routes=[Route("/v1/models", models), Route("/v1/completions", stream, methods=["POST"])]
    )


@contextlib.asynccontextmanager
async def serving(gateway: Gateway) -> AsyncIterator[str]:
    """The gateway behind a real uvicorn on a free loopback port, in this event loop."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(gateway, lifespan="off", log_level="critical", http="h11")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        assert not task.done(), "uvicorn did not start"
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        await task
        sock.close()


def file_digests(path) -> list[bytes]:
    """What serve.remote's `keys` verb publishes: the digests of the key file's keys."""
    return [key_digest(key) for key in k.read_api_keys(path)]


async def status(client: httpx.AsyncClient, key: str) -> int:
    response = await client.get("/v1/models", headers={"Authorization": f"Bearer {key}"})
    return response.status_code


async def test_revoked_key_is_refused_within_seconds_while_streams_run_on(tmp_path) -> None:
    path = tmp_path / "api_key"
    path.write_text("sk-stays\n")
    path.chmod(0o600)
    leaving = k.add_key(path, "leaving").secret
    gate = asyncio.Event()
    state = ServerState(app=inner_app(gate), last_probe_ok=time.monotonic())
    gateway = Gateway(state, api_key_digests=file_digests(path))
    follower = asyncio.create_task(
        gateway.follow_key_digests(lambda: file_digests(path), interval_s=POLL_S)
    )
    try:
        async with serving(gateway) as url, httpx.AsyncClient(base_url=url, timeout=10) as client:
            assert await status(client, leaving) == 200
            streams = {}
            for key in ("sk-stays", leaving):
                request = client.build_request(
                    "POST",
                    "/v1/completions",
                    json={"model": "m", "prompt": "hi", "stream": True},
                    headers={"Authorization": f"Bearer {key}"},
                )
                response = await client.send(request, stream=True)
                assert response.status_code == 200
                lines = response.aiter_lines()
                assert await anext(lines) == 'data: {"n": 0}'
                streams[key] = (response, lines)

            k.revoke_key(path, "leaving")
            start = time.monotonic()
            while await status(client, leaving) != 401:
                assert time.monotonic() - start < 5, "the revoked key is still accepted"
                await asyncio.sleep(0.05)
            took = time.monotonic() - start
            assert took < 3 * POLL_S + 1
            assert await status(client, "sk-stays") == 200

            # Both streams were in flight at the revoke: they run to their end.
            gate.set()
            for response, lines in streams.values():
                rest = [line async for line in lines if line]
                assert rest == [
                    'data: {"n": 1}',
                    'data: {"n": 2}',
                    'data: {"n": 3}',
                    "data: [DONE]",
                ]
                await response.aclose()

            # A new key is accepted just as fast, and the old file's plain form still reads.
            fresh = k.add_key(path, "fresh").secret
            start = time.monotonic()
            while await status(client, fresh) != 200:
                assert time.monotonic() - start < 5, "the new key is not accepted"
                await asyncio.sleep(0.05)
    finally:
        follower.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await follower


async def test_a_failing_or_empty_source_keeps_the_last_keys() -> None:
    gate = asyncio.Event()
    gate.set()
    state = ServerState(app=inner_app(gate), last_probe_ok=time.monotonic())
    gateway = Gateway(state, api_keys=["sk-a"])
    source: dict[str, object] = {"value": [key_digest("sk-b")]}

    def read():
        value = source["value"]
        if isinstance(value, Exception):
            raise value
        return value

    follower = asyncio.create_task(gateway.follow_key_digests(read, interval_s=0.05))
    try:
        async with serving(gateway) as url, httpx.AsyncClient(base_url=url, timeout=10) as client:

            async def settle() -> None:
                await asyncio.sleep(0.3)  # several polls

            await settle()
            assert (await status(client, "sk-a"), await status(client, "sk-b")) == (401, 200)
            for broken in (ConnectionError("GCS unreachable"), None, [], ValueError("bad JSON")):
                source["value"] = broken
                await settle()
                assert (await status(client, "sk-a"), await status(client, "sk-b")) == (401, 200)
            source["value"] = [key_digest("sk-a")]
            await settle()
            assert (await status(client, "sk-a"), await status(client, "sk-b")) == (200, 401)
    finally:
        follower.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await follower


def test_an_empty_key_set_is_refused() -> None:
    gateway = Gateway(ServerState(), api_keys=["sk-a"])
    with pytest.raises(ValueError, match="empty"):
        gateway.set_key_digests([])
    assert gateway.set_key_digests([key_digest("sk-a")]) is False
    assert gateway.set_key_digests([key_digest("sk-b"), key_digest("sk-b")]) is True
