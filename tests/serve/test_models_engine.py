"""Two models behind one endpoint (two real vLLM engines, each a Serve app of its own behind
HAProxy), deployed and stopped through the CLI: routed by the request's `model`, a body too large
for HAProxy forwarded by the first model's gateway, both listed, an unknown name a 404."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest

from cluster.demo_model import build_demo_model
from tests.support.server import free_port, run_driver

pytestmark = [pytest.mark.e2e, pytest.mark.engine, pytest.mark.timeout(900)]

PROMPT = "The llama is a domesticated"
LLAMACLUSTER = str(Path(sys.executable).parent / "llamacluster")

SERVE_APPS_SNIPPET = """
import json, ray
from ray import serve
ray.init(log_to_driver=False, logging_level="ERROR")
try:
    apps = {n: getattr(a.status, "value", a.status) for n, a in serve.status().applications.items()}
except Exception:
    apps = {}
print(json.dumps(apps))
"""


def _cli(*args: str, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """The installed CLI in a child process, with ``env`` over this one's."""
    return subprocess.run([LLAMACLUSTER, *args], env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=timeout, check=False)  # fmt: skip


def _free_block(span: int) -> int:
    """The first of ``span`` consecutive ports nobody listens on (bound and released)."""
    for _ in range(50):
        first = free_port()
        if first + span > 65535:
            continue
        with contextlib.ExitStack() as stack:
            try:
                for port in range(first, first + span):
                    sock = stack.enter_context(socket.socket())
                    sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        return first
    raise AssertionError("no free block of ports")


def _greedy(url: str, key: str, model: str, **extra: object) -> dict:
    body = {"prompt": PROMPT, "max_tokens": 8, "temperature": 0.0, **extra, "model": model}
    r = httpx.post(
        f"{url}/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=120
    )
    assert r.status_code == 200, r.text
    return r.json()


def test_two_models_routed_by_name(make_ray_cluster, demo_model_dir: Path, tmp_path: Path) -> None:
    other = build_demo_model(tmp_path / "demo-b", seed=1)
    cluster = make_ray_cluster(nodes=1, slots_per_node=2)
    api_key = "sk-e2e-" + secrets.token_hex(8)
    env = {**cluster.env, "LLAMACLUSTER_API_KEY": api_key}
    # Endpoint, the proxy, HAProxy's side ports (+3, +4) and the replicas' (+10 on, 2 × 2 + 2).
    port = _free_block(17)
    app_name = "mm-" + secrets.token_hex(3)
    deployed = _cli(
        "serve",
        "--model",
        str(demo_model_dir),
        "--model",
        f"{other},name=demo-b,max-model-len=256",
        "--device",
        "cpu",
        "--kv-cache-gb",
        "1",
        "--max-model-len",
        "512",
        "--max-num-seqs",
        "8",
        "--engine-arg",
        "enforce_eager=true",
        "--engine-cpus",
        "0.5",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--proxy-port",
        str(port + 1),
        "--app-name",
        app_name,
        "--address",
        cluster.address,
        "--ready-timeout",
        "600",
        "--json",
        env=env,
        timeout=800,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        assert deployed.returncode == 0, deployed.stderr[-3000:]
        endpoint = json.loads(deployed.stdout.strip().splitlines()[-1])
        assert endpoint["url"] == url
        first = endpoint["model"]
        apps = json.loads(
            run_driver(SERVE_APPS_SNIPPET, env=cluster.env, timeout=120).strip().splitlines()[-1]
        )
        assert apps == {app_name: "RUNNING", f"{app_name}--demo-b": "RUNNING"}, apps

        client = openai.OpenAI(base_url=f"{url}/v1", api_key=api_key)
        cards = {m.id: m for m in client.models.list().data}
        assert set(cards) == {first, "demo-b"}
        assert cards["demo-b"].root == str(other) and cards[first].root == str(demo_model_dir)

        # Each name reaches its own engine: different weights, different greedy answers, and
        # each engine's own context length.
        a = _greedy(url, api_key, first)
        b = _greedy(url, api_key, "demo-b")
        assert (a["model"], b["model"]) == (first, "demo-b")
        assert a["choices"][0]["text"] != b["choices"][0]["text"]
        long = {"max_tokens": 300}
        r = httpx.post(
            f"{url}/v1/completions",
            json={"prompt": PROMPT, **long, "model": "demo-b"},
            headers={"Authorization": f"Bearer {api_key}"},
            timeout=120,
        )
        assert r.status_code == 400 and "256" in r.json()["error"]["message"], r.text
        assert _greedy(url, api_key, first, **long)["usage"]["completion_tokens"] <= 300

        # A body larger than HAProxy's buffer, `model` last: the first model's gateway forwards
        # it; the answer is the second engine's, the same as through HAProxy.
        big = _greedy(url, api_key, "demo-b", user="u" * 100_000)
        assert big["model"] == "demo-b" and big["choices"] == b["choices"]

        # Streaming through the route, and the second model's own probes under its prefix.
        stream = client.chat.completions.create(
            model="demo-b",
            messages=[{"role": "user", "content": "Stream something."}],
            max_tokens=8,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
        assert chunks[-1].usage.completion_tokens == 8 and chunks[0].model == "demo-b"
        ready = httpx.get(f"{url}/_lc/{app_name}--demo-b/ready", timeout=30)
        assert ready.status_code == 200, ready.text

        unknown = httpx.post(
            f"{url}/v1/completions",
            json={"model": "no-such-model", "prompt": PROMPT, "max_tokens": 4},
            headers={"Authorization": f"Bearer {api_key}"},
            timeout=30,
        )
        assert unknown.status_code == 404, unknown.text
        error = unknown.json()["error"]
        assert error["type"] == "not_found_error" and "no-such-model" in error["message"]
        # The key applies to every model.
        denied = httpx.post(
            f"{url}/v1/completions",
            json={"model": "demo-b", "prompt": PROMPT, "max_tokens": 4},
            headers={"Authorization": "Bearer sk-wrong"},
            timeout=30,
        )
        assert denied.status_code == 401
    finally:
        stopped = _cli(
            "serve-stop", "--app-name", app_name, "--address", cluster.address, env=env, timeout=300
        )
    assert stopped.returncode == 0, stopped.stderr[-2000:]
    apps = json.loads(
        run_driver(SERVE_APPS_SNIPPET, env=cluster.env, timeout=120).strip().splitlines()[-1]
    )
    assert apps == {}
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{url}/health", timeout=5)
