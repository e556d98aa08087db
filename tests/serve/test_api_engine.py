"""The OpenAI API of a real server (Ray Serve + vLLM on the demo model) through real clients."""

from __future__ import annotations

import json
import re
import socket
import time
from urllib.parse import urlsplit

import httpx
import openai
import pytest

from tests.support.server import ApiServer

pytestmark = [pytest.mark.engine, pytest.mark.timeout(900)]

CHAT = [{"role": "user", "content": "Say something."}]


def assert_openai_error(response: httpx.Response, status: int) -> dict:
    """The answer has the status, OpenAI's error shape and a request id."""
    assert response.status_code == status, response.text
    assert response.headers.get("x-request-id")
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]


# --- the OpenAI client, chat and completions -------------------------------------------------


def test_models_lists_the_served_name(api_server: ApiServer) -> None:
    models = api_server.client().models.list()
    assert [m.id for m in models.data] == [api_server.model]


def test_chat_completion(api_server: ApiServer) -> None:
    # Random weights may sample the end-of-sequence token first: ask for exactly 8 tokens.
    reply = api_server.client().chat.completions.create(
        model=api_server.model, messages=CHAT, max_tokens=8, extra_body={"ignore_eos": True}
    )
    assert reply.choices[0].message.role == "assistant"
    assert reply.usage.completion_tokens == 8
    assert reply.usage.prompt_tokens > 0


def test_chat_stream_with_usage(api_server: ApiServer) -> None:
    stream = api_server.client().chat.completions.create(
        model=api_server.model,
        messages=CHAT,
        max_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    usage = [c.usage for c in chunks if c.usage is not None]
    assert len(usage) == 1 and usage[0].completion_tokens == 12
    assert chunks[-1].choices == []  # the usage chunk comes last, without choices
    finish = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finish == ["length"]


def test_stream_ends_with_done(api_server: ApiServer) -> None:
    body = {"model": api_server.model, "messages": CHAT, "max_tokens": 4, "stream": True}
    with httpx.stream(
        "POST", f"{api_server.base_url}/chat/completions", json=body, headers=api_server.auth
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    assert all(json.loads(e[6:])["object"] == "chat.completion.chunk" for e in events[:-1])


def test_completion_and_stream(api_server: ApiServer) -> None:
    client = api_server.client()
    reply = client.completions.create(
        model=api_server.model, prompt="hello", max_tokens=6, extra_body={"ignore_eos": True}
    )
    assert reply.usage.completion_tokens == 6
    pieces = list(
        client.completions.create(model=api_server.model, prompt="hello", max_tokens=6, stream=True)
    )
    assert sum(1 for p in pieces if p.choices) >= 1
    assert pieces[-1].choices[0].finish_reason == "length"


def test_n_two_choices(api_server: ApiServer) -> None:
    reply = api_server.client().chat.completions.create(
        model=api_server.model, messages=CHAT, max_tokens=5, n=2, temperature=1.0
    )
    assert sorted(c.index for c in reply.choices) == [0, 1]


def test_stop_string_ends_the_completion(api_server: ApiServer) -> None:
    client = api_server.client()
    free = client.completions.create(
        model=api_server.model, prompt="hello", max_tokens=30, temperature=0
    )
    text = free.choices[0].text
    stop = text[len(text) // 2 :][:2]
    assert stop, "the greedy completion is empty; cannot pick a stop string"
    stopped = client.completions.create(
        model=api_server.model, prompt="hello", max_tokens=30, temperature=0, stop=[stop]
    )
    assert stopped.choices[0].finish_reason == "stop"
    assert stop not in stopped.choices[0].text
    assert text.startswith(stopped.choices[0].text)


def test_logprobs(api_server: ApiServer) -> None:
    reply = api_server.client().chat.completions.create(
        model=api_server.model, messages=CHAT, max_tokens=4, logprobs=True, top_logprobs=3
    )
    content = reply.choices[0].logprobs.content
    assert len(content) == 4
    assert all(len(t.top_logprobs) == 3 and t.logprob <= 0.0 for t in content)


def test_seed_makes_sampling_repeatable(api_server: ApiServer) -> None:
    client = api_server.client()

    def sample(seed: int) -> str:
        reply = client.completions.create(
            model=api_server.model, prompt="hello", max_tokens=16, temperature=1.0, seed=seed
        )
        return reply.choices[0].text

    first = sample(7)
    assert sample(7) == first
    assert any(sample(s) != first for s in (8, 9, 10))


# --- bad input is a 4xx in OpenAI's shape ----------------------------------------------------

BAD_CHAT_BODIES = {
    "max_tokens over context": ({"max_tokens": 5000}, 400),
    "prompt + max_tokens over context": (
        {"messages": [{"role": "user", "content": "hello world " * 1000}], "max_tokens": 1000},
        400,
    ),
    "negative temperature": ({"temperature": -1}, 400),
    "temperature too high": ({"temperature": 1e9}, 400),
    "top_p above 1": ({"top_p": 1.5}, 400),
    "negative top_p": ({"top_p": -0.1}, 400),
    "negative max_tokens": ({"max_tokens": -5}, 400),
    "max_tokens not a number": ({"max_tokens": "many"}, 400),
    "messages missing": ({"messages": None}, 400),
    "messages empty": ({"messages": []}, 400),
    "unknown role": ({"messages": [{"role": "wizard", "content": "hi"}]}, 400),
    "unknown model": ({"model": "no-such-model"}, 404),
}


@pytest.mark.parametrize("case", list(BAD_CHAT_BODIES))
def test_bad_chat_input_is_a_4xx(api_server: ApiServer, case: str) -> None:
    change, status = BAD_CHAT_BODIES[case]
    body = {"model": api_server.model, "messages": CHAT, "max_tokens": 4, **change}
    body = {k: v for k, v in body.items() if v is not None}
    response = httpx.post(
        f"{api_server.base_url}/chat/completions", json=body, headers=api_server.auth, timeout=60
    )
    assert_openai_error(response, status)


def test_nan_temperature_is_a_400(api_server: ApiServer) -> None:
    raw = f'{{"model": "{api_server.model}", "messages": [], "temperature": NaN}}'.replace(
        "[]", json.dumps(CHAT)
    )
    response = httpx.post(
        f"{api_server.base_url}/chat/completions",
        content=raw,
        headers={**api_server.auth, "content-type": "application/json"},
    )
    assert_openai_error(response, 400)


def test_malformed_json_is_a_400(api_server: ApiServer) -> None:
    response = httpx.post(
        f"{api_server.base_url}/chat/completions",
        content=b'{"model": "x", "messages": [',
        headers={**api_server.auth, "content-type": "application/json"},
    )
    assert_openai_error(response, 400)


def test_wrong_content_type_is_a_415(api_server: ApiServer) -> None:
    response = httpx.post(
        f"{api_server.base_url}/chat/completions",
        content=json.dumps({"model": api_server.model, "messages": CHAT}),
        headers={**api_server.auth, "content-type": "text/plain"},
    )
    assert_openai_error(response, 415)


def test_oversized_body_is_a_413(api_server: ApiServer) -> None:
    huge = "x" * (9 * 1024 * 1024)
    response = httpx.post(
        f"{api_server.base_url}/chat/completions",
        json={"model": api_server.model, "messages": [{"role": "user", "content": huge}]},
        headers=api_server.auth,
        timeout=60,
    )
    assert_openai_error(response, 413)


@pytest.mark.parametrize(
    ("method", "path", "status"), [("GET", "/v1/nope", 404), ("DELETE", "/v1/models", 405)]
)
def test_unknown_route_and_method(
    api_server: ApiServer, method: str, path: str, status: int
) -> None:
    response = httpx.request(method, api_server.url + path, headers=api_server.auth)
    assert_openai_error(response, status)


# --- auth: default deny -----------------------------------------------------------------------

AUTH_CASES = {
    "no header": ({}, 401),
    "wrong key": ({"Authorization": "Bearer sk-wrong"}, 401),
    "empty token": ({"Authorization": "Bearer"}, 401),
    "wrong scheme": ({"Authorization": "Basic dXNlcjpwYXNz"}, 401),
    "key without scheme": (None, 401),
    "lower-case bearer": ("lower", 200),
}


@pytest.mark.parametrize("case", list(AUTH_CASES))
def test_auth_matrix(api_server: ApiServer, case: str) -> None:
    headers, status = AUTH_CASES[case]
    if headers is None:
        headers = {"Authorization": api_server.api_key}
    elif headers == "lower":
        headers = {"Authorization": f"bearer {api_server.api_key}"}
    response = httpx.get(f"{api_server.base_url}/models", headers=headers)
    if status == 401:
        assert_openai_error(response, 401)
        assert response.headers["www-authenticate"] == "Bearer"
        assert api_server.api_key not in response.text
    else:
        assert response.status_code == 200


@pytest.mark.parametrize("path", ["/metrics", "/docs", "/openapi.json", "/version", "/tokenize"])
def test_other_routes_are_denied_without_a_key(api_server: ApiServer, path: str) -> None:
    assert_openai_error(httpx.get(api_server.url + path), 401)


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/scale_elastic_ep"),
        ("POST", "/v1/responses"),
        ("POST", "/invocations"),
        ("GET", "/version"),
        ("GET", "/docs"),
    ],
)
def test_operational_routes_are_404_for_a_user_key(
    api_server: ApiServer, method: str, path: str
) -> None:
    response = httpx.request(method, api_server.url + path, json={}, headers=api_server.auth)
    assert assert_openai_error(response, 404)["message"].startswith("no route ")


def test_health_and_ready_are_open(api_server: ApiServer) -> None:
    assert httpx.get(f"{api_server.url}/health").status_code == 200
    assert httpx.get(f"{api_server.url}/ready").status_code == 200


def test_ready_was_503_while_loading(api_server: ApiServer) -> None:
    assert api_server.loading_ready is not None
    status, headers, body = api_server.loading_ready
    assert status == 503
    assert headers.get("retry-after")
    assert "loading" in body["error"]["message"]
    health_status, _, health_body = api_server.loading_health
    assert health_status == 200 and health_body["status"] in ("loading", "ok")


# --- load bound, disconnects, metrics ---------------------------------------------------------


def _open_socket(api_server: ApiServer) -> socket.socket:
    parts = urlsplit(api_server.url)
    return socket.create_connection((parts.hostname, parts.port), timeout=10)


def test_requests_past_the_bound_get_a_fast_429(api_server: ApiServer) -> None:
    # Requests whose body never arrives stay inside the server: a deterministic full house.
    held = []
    try:
        for _ in range(api_server.max_ongoing_requests):
            sock = _open_socket(api_server)
            sock.sendall(
                b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                + f"Authorization: Bearer {api_server.api_key}\r\nContent-Length: 100\r\n\r\n".encode()
            )
            held.append(sock)
        time.sleep(0.5)
        started = time.monotonic()
        response = httpx.post(
            f"{api_server.base_url}/completions",
            json={"model": api_server.model, "prompt": "hi", "max_tokens": 2},
            headers=api_server.auth,
        )
        elapsed = time.monotonic() - started
        assert_openai_error(response, 429)
        assert int(response.headers["retry-after"]) >= 1
        assert elapsed < 1.0
    finally:
        for sock in held:
            sock.close()
    time.sleep(0.5)
    after = httpx.post(
        f"{api_server.base_url}/completions",
        json={"model": api_server.model, "prompt": "hi", "max_tokens": 2},
        headers=api_server.auth,
    )
    assert after.status_code == 200


def test_client_disconnect_aborts_the_engine_request(api_server: ApiServer) -> None:
    body = json.dumps(
        {
            "model": api_server.model,
            "prompt": "hello",
            "max_tokens": 1900,
            "ignore_eos": True,
            "stream": True,
        }
    ).encode()
    generated_before = api_server.metric("vllm:generation_tokens_total")
    sock = _open_socket(api_server)
    sock.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Authorization: Bearer {api_server.api_key}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    received = b""
    while received.count(b"data: ") < 3:
        received += sock.recv(65536)
    assert received.startswith(b"HTTP/1.1 200")
    # >= 1: the readiness probe (one token every 10 s) may be running too.
    assert api_server.metric("vllm:num_requests_running") >= 1
    sock.close()
    deadline = time.monotonic() + 60.0
    running = 1.0
    while time.monotonic() < deadline:
        running = api_server.metric("vllm:num_requests_running")
        if running == 0:
            break
        time.sleep(0.05)
    assert running == 0
    # It was aborted, not finished: the engine generated far fewer than its 1900 tokens (the
    # readiness probe adds one token per probe), however long the abort took to show.
    generated = api_server.metric("vllm:generation_tokens_total") - generated_before
    assert generated < 1900 - 100, generated
    assert b"[DONE]" not in received


def test_metrics_has_engine_metrics_and_status_counters(api_server: ApiServer) -> None:
    httpx.get(f"{api_server.base_url}/models")  # one 401
    httpx.get(f"{api_server.base_url}/models", headers=api_server.auth)  # one 200
    text = httpx.get(f"{api_server.url}/metrics", headers=api_server.auth).text
    assert "vllm:num_requests_running" in text
    assert "vllm:generation_tokens_total" in text
    assert re.search(
        r'llamacluster_http_requests_total\{path="/v1/models",status="401"\} [1-9]', text
    )
    assert re.search(
        r'llamacluster_http_requests_total\{path="/v1/models",status="200"\} [1-9]', text
    )


def test_openai_client_sees_auth_errors(api_server: ApiServer) -> None:
    client = openai.OpenAI(base_url=api_server.base_url, api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        client.models.list()
    assert err.value.status_code == 401


def test_serve_routes_to_the_configured_port(api_server: ApiServer, ray_cluster_1node) -> None:
    """Ray Serve's own routing table says the replica listens on the port we asked for."""
    from tests.support.server import run_driver

    snippet = (
        "import sys, ray\n"
        "from serve.app import _connect, _listening_port\n"
        "_connect(sys.argv[2])\n"
        "print(_listening_port(sys.argv[1]))\n"
    )
    out = run_driver(
        snippet,
        api_server.app_name,
        api_server.ray_address,
        env=dict(ray_cluster_1node.env),
        timeout=120,
    )
    assert out.strip().splitlines()[-1] == str(urlsplit(api_server.url).port)


def test_dashboard_serve_view_shows_the_replica(api_server: ApiServer, ray_cluster_1node) -> None:
    """The Ray dashboard's Serve API (what its Serve view shows) lists the app and its replica."""
    response = httpx.get(
        f"{ray_cluster_1node.dashboard_url}/api/serve/applications/",
        headers={"Authorization": f"Bearer {ray_cluster_1node.token}"},
        timeout=30,
    )
    assert response.status_code == 200, response.text[:300]
    app = response.json()["applications"][api_server.app_name]
    assert app["status"] == "RUNNING"
    deployment = app["deployments"]["LlamaclusterServer"]
    replicas = deployment["replicas"]
    assert len(replicas) == 1 and replicas[0]["state"] == "RUNNING"
    assert replicas[0]["node_ip"]  # where it was placed (the head)
    config = deployment["deployment_config"]
    # Serve never throttles before the gateway's own bound (its default of 5 would).
    assert config["max_ongoing_requests"] > api_server.max_ongoing_requests
