"""An endpoint of several models: the `--model` spec, the endpoint's model table, and the first
app's gateway forwarding another model's request (over real HTTP) and listing every model."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import httpx
import pytest
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from cluster.errors import ConfigError
from serve.api import Gateway, ServerState
from serve.balancer import balancer_env
from serve.config import EndpointApp, ServeConfig, model_app_name
from serve.haproxy_hooks import MODEL_ROUTES_ENV, model_routes_from_env
from serve.models import (
    ModelRoutes,
    endpoint_configs,
    parse_model_spec,
    route_path,
    with_shared_fields,
)

KEY = "sk-models-key"
MESSAGES = [{"role": "user", "content": "hi"}]


def _config(**values) -> ServeConfig:
    return ServeConfig(**{"model": "/models/a", "api_keys": [KEY], "device": "cpu", **values})


def test_model_spec_options() -> None:
    assert parse_model_spec("/m/b") == {"model": "/m/b"}
    assert parse_model_spec("org/b,name=b,name=b2,tp=2,pp=1,replicas=3,max-model-len=512") == {
        "model": "org/b",
        "served_model_name": ["b", "b2"],
        "tp": 2,
        "pp": 1,
        "num_replicas": 3,
        "max_model_len": 512,
    }
    assert parse_model_spec("/m/b,lora=sql=/m/sql")["lora_modules"] == ["sql=/m/sql"]
    for bad, needle in (
        (",tp=2", "names no model"),
        ("/m/b,tp=two", "whole number"),
        ("/m/b,colour=red", "not an option"),
        ("/m/b,tp", "not an option"),
    ):
        with pytest.raises(ConfigError, match=needle):
            parse_model_spec(bad)


def test_endpoint_configs_make_one_table() -> None:
    first = _config(served_model_name=["a"], port=9000, num_replicas=2)
    second = ServeConfig(
        **with_shared_fields(
            dict(first), {"model": "/models/b", "served_model_name": ["org/b"], "tp": 2}
        )
    )
    a, b = endpoint_configs([first, second])
    assert (a.app_name, a.route_prefix) == ("llamacluster", "/")
    assert (b.app_name, b.route_prefix) == ("llamacluster--b", "/_lc/llamacluster--b")
    assert a.endpoint_apps == b.endpoint_apps
    assert [x.names for x in a.endpoint_apps] == [["a"], ["org/b"]]
    assert b.port == 9000 and b.tp == 2 and b.key_app == "llamacluster"
    # Both are behind HAProxy; the replica ports cover every model's replicas (2 + 1).
    assert a.balanced and b.balanced
    assert len(a.replica_ports) == 2 * 3 + 2 == len(b.replica_ports)
    env = balancer_env(a, "/tmp/x")
    assert model_routes_from_env(env[MODEL_ROUTES_ENV]) == [("/_lc/llamacluster--b", ["org/b"])]
    # One model alone is unchanged.
    assert endpoint_configs([first]) == [first]


def test_endpoint_tables_refuse_what_cannot_be_routed() -> None:
    first = _config(served_model_name=["same"])
    twin = _config(model="/models/b", served_model_name=["same"])
    with pytest.raises(ConfigError, match="'same' is used by two models"):
        endpoint_configs([first, twin])
    routed = _config(served_model_name=["a"], routing="prefix", num_replicas=2)
    with pytest.raises(ConfigError, match="prefix routing serves one model"):
        endpoint_configs([routed, _config(model="/models/b", served_model_name=["b"])])
    assert model_app_name("lc", "Org/Name v2!", {"lc--Name-v2"}) == "lc--Name-v2-2"


def test_route_path_strips_the_apps_prefix() -> None:
    assert route_path({"path": "/_lc/x/v1/models", "root_path": "/_lc/x"}) == "/v1/models"
    assert route_path({"path": "/_lc/x", "root_path": "/_lc/x"}) == "/"
    assert route_path({"path": "/_lc/xy/v1", "root_path": "/_lc/x"}) == "/_lc/xy/v1"
    assert route_path({"path": "/v1/models"}) == "/v1/models"


class _Peer(BaseHTTPRequestHandler):
    """The endpoint (HAProxy) in front of the other model's app: records what it got, answers
    a JSON body or, for `stream`, a few SSE events."""

    seen: ClassVar[list[dict]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.seen.append(
            {"path": self.path, "auth": self.headers.get("Authorization"), "body": body}
        )
        asked = json.loads(body)
        if asked.get("stream"):
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            try:
                for i in range(int(asked.get("events", 3))):
                    self.wfile.write(f'data: {{"n": {i}}}\n\n'.encode())
                    self.wfile.flush()
                    time.sleep(float(asked.get("gap_s", 0.05)))
                self.wfile.write(b"data: [DONE]\n\n")
                self.seen[-1]["finished"] = True
            except OSError:  # the forwarding side closed the connection
                self.seen[-1]["closed_at"] = time.monotonic()
            return
        out = json.dumps({"served_by": "peer"}).encode()
        self.send_response(201)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def peer():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Peer)
    server.daemon_threads = True
    _Peer.seen = []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def _own_app() -> Starlette:
    async def chat(request):
        return JSONResponse({"served_by": "own", "model": (await request.json())["model"]})

    async def models(request):
        return JSONResponse({"object": "list", "data": [{"id": "a", "object": "model"}]})

    return Starlette(
        routes=[
            Route("/v1/chat/completions", chat, methods=["POST"]),
            Route("/v1/models", models),
        ]
    )


def _gateway(peer: str, *, loaded: bool = True) -> Gateway:
    state = ServerState(app=_own_app() if loaded else None)
    if loaded:
        state.last_probe_ok = time.monotonic()
    gateway = Gateway(state, api_keys=[KEY])
    other = EndpointApp(
        app_name="lc--b",
        route_prefix="/_lc/lc--b",
        names=["b", "b-sql"],
        adapters=["b-sql"],
        root="/models/b",
        max_model_len=256,
    )
    gateway.models = ModelRoutes(apps=[other], base_url=peer)
    return gateway


@contextlib.asynccontextmanager
async def _client(gateway: Gateway):
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=gateway),
        base_url="http://test",
        headers={"Authorization": f"Bearer {KEY}"},
    ) as client:
        yield client
    await gateway.models.aclose()


@pytest.mark.anyio
async def test_another_models_request_is_forwarded_to_its_route(peer: str) -> None:
    async with _client(_gateway(peer)) as client:
        body = {"model": "b", "messages": [{"role": "user", "content": "x" * 100_000}]}
        r = await client.post("/v1/chat/completions?trace=1", json=body)
        assert (r.status_code, r.json()) == (201, {"served_by": "peer"})
        seen = _Peer.seen[-1]
        assert seen["path"] == "/_lc/lc--b/v1/chat/completions?trace=1"
        assert seen["auth"] == f"Bearer {KEY}" and json.loads(seen["body"]) == body
        # A stream comes back as the peer sends it, event by event.
        events = []
        stream = {"model": "b-sql", "stream": True, "messages": [{"role": "user", "content": "q"}]}
        async with client.stream("POST", "/v1/chat/completions", json=stream) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            async for line in r.aiter_lines():
                if line:
                    events.append(line)
        assert events == ['data: {"n": 0}', 'data: {"n": 1}', 'data: {"n": 2}', "data: [DONE]"]
        # The first app's own model stays here; so does an unknown one (vLLM's 404).
        r = await client.post("/v1/chat/completions", json={"model": "a", "messages": MESSAGES})
        assert r.json() == {"served_by": "own", "model": "a"}
        assert len(_Peer.seen) == 2


@pytest.mark.anyio
async def test_models_lists_every_model_of_the_endpoint(peer: str) -> None:
    async with _client(_gateway(peer)) as client:
        r = await client.get("/v1/models")
    assert r.status_code == 200 and int(r.headers["content-length"]) == len(r.content)
    cards = {c["id"]: c for c in r.json()["data"]}
    assert list(cards) == ["a", "b", "b-sql"]
    assert cards["b"]["root"] == "/models/b" and cards["b"]["max_model_len"] == 256
    assert cards["b-sql"]["parent"] == "b"


@pytest.mark.anyio
async def test_another_model_serves_while_this_one_loads(peer: str) -> None:
    async with _client(_gateway(peer, loaded=False)) as client:
        r = await client.post("/v1/chat/completions", json={"model": "b", "messages": MESSAGES})
        assert r.status_code == 201
        r = await client.post("/v1/chat/completions", json={"model": "a", "messages": MESSAGES})
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == 503
        # Auth still comes first.
        r = await client.post(
            "/v1/chat/completions", json={"model": "b"}, headers={"Authorization": "Bearer no"}
        )
        assert r.status_code == 401 and len(_Peer.seen) == 1


@pytest.mark.anyio
async def test_an_unreachable_model_is_a_503_not_a_500() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"  # bound, never listening
        async with _client(_gateway(dead)) as client:
            r = await client.post("/v1/chat/completions", json={"model": "b", "messages": MESSAGES})
    assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
    assert "'b' cannot be reached" in r.json()["error"]["message"]


async def _forward(peer: str, body: dict, receive) -> list[tuple[float, dict]]:
    """Run the forwarding app alone (no test transport buffering it); what it sent, timed."""
    routes = ModelRoutes(apps=[_other()], base_url=peer)
    sent: list[tuple[float, dict]] = []

    async def send(message: dict) -> None:
        sent.append((time.monotonic(), message))

    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "headers": []}
    try:
        await routes.forward_app(_other(), json.dumps(body).encode())(scope, receive, send)
    finally:
        await routes.aclose()
    return sent


def _other() -> EndpointApp:
    return EndpointApp(app_name="lc--b", route_prefix="/_lc/lc--b", names=["b"], root="/m/b")


@pytest.mark.anyio
async def test_a_forwarded_stream_is_passed_on_as_it_comes(peer: str) -> None:
    async def stays() -> dict:
        await asyncio.sleep(30)
        return {"type": "http.disconnect"}

    body = {"model": "b", "stream": True, "events": 4, "gap_s": 0.3}
    sent = await _forward(peer, body, stays)
    chunks = [(t, m["body"]) for t, m in sent if m["type"] == "http.response.body" and m["body"]]
    assert b"".join(c for _, c in chunks).endswith(b"data: [DONE]\n\n")
    # The first event went out while the peer was still writing the others (0.3 s apart).
    assert chunks[-1][0] - chunks[0][0] > 0.6, [t for t, _ in chunks]


@pytest.mark.anyio
async def test_the_client_leaving_ends_the_forwarded_request(peer: str) -> None:
    async def leaves() -> dict:
        await asyncio.sleep(0.5)
        return {"type": "http.disconnect"}

    started = time.monotonic()
    body = {"model": "b", "stream": True, "events": 50, "gap_s": 0.1}  # 5 s of events
    await _forward(peer, body, leaves)
    assert time.monotonic() - started < 2.0
    deadline = time.monotonic() + 5
    while "closed_at" not in _Peer.seen[-1] and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert "finished" not in _Peer.seen[-1] and _Peer.seen[-1]["closed_at"] - started < 3.0


def test_names_that_cannot_be_routed_are_refused() -> None:
    first = _config(served_model_name=["a"])
    for bad in ("b{{x}}", 'b"', "b c", "b%"):
        other = _config(model="/models/b", served_model_name=[bad])
        with pytest.raises(ConfigError, match="cannot be routed among several models"):
            endpoint_configs([first, other])
