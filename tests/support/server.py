"""A real llamacluster server (Ray Serve + vLLM on the demo model) for the API tests to share."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Bound used by the shared server, small so the 429 test needs few open requests.
SHARED_MAX_ONGOING = 6


@dataclass(frozen=True)
class ApiServer:
    """Where the shared server answers and how to reach it."""

    url: str
    api_key: str
    model: str
    app_name: str
    ray_address: str
    max_ongoing_requests: int
    # (status, headers, body) of /ready and /health seen right after deploy, while loading.
    loading_ready: tuple[int, dict[str, str], dict[str, Any]] | None = None
    loading_health: tuple[int, dict[str, str], dict[str, Any]] | None = None

    @property
    def base_url(self) -> str:
        """The OpenAI base URL (`.../v1`)."""
        return f"{self.url}/v1"

    @property
    def auth(self) -> dict[str, str]:
        """Headers with the valid key."""
        return {"Authorization": f"Bearer {self.api_key}"}

    def client(self, **kwargs: Any):
        """An official `openai` client for this server."""
        import openai

        return openai.OpenAI(base_url=self.base_url, api_key=self.api_key, **kwargs)

    def metric(self, name: str) -> float:
        """The sum of a Prometheus metric's samples (all label sets) from /metrics."""
        import httpx

        text = httpx.get(f"{self.url}/metrics", headers=self.auth).text
        values = [
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith(name + "{") or line.startswith(name + " ")
        ]
        assert values, f"{name} not in /metrics"
        return sum(values)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (bind port 0)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


# Deploy/stop run in a child process: a Ray driver keeps its cluster's auth token for the life
# of the process, and the test process talks to several clusters in one session.
DEPLOY_SNIPPET = """
import json, sys
from serve.app import deploy
from serve.config import load_config
endpoint = deploy(load_config(**json.loads(sys.stdin.read())), ray_address=sys.argv[1])
print(json.dumps({"url": endpoint.url, "model": endpoint.model}))
"""
STOP_SNIPPET = """
import sys
from serve.app import shutdown
print(shutdown(sys.argv[1], ray_address=sys.argv[2]))
"""


def _cluster_address_and_env(cluster: Any) -> tuple[str, dict[str, str]]:
    address = getattr(cluster, "address", None) or getattr(cluster, "gcs_address", None)
    env = dict(getattr(cluster, "env", None) or {})
    return str(address), env


def run_driver(snippet: str, *args: str, env: dict[str, str], stdin: str = "", timeout: float):
    """Run a Python snippet as a Ray driver in a child process; fail with its stderr."""
    proc = subprocess.run(
        [sys.executable, "-c", snippet, *args],
        input=stdin,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"driver failed ({proc.returncode}): {proc.stderr[-3000:]}")
    return proc.stdout


def server_values(model_dir: Path, **overrides: Any) -> tuple[dict[str, Any], str]:
    """ServeConfig values for a small test engine, and its API key."""
    api_key = "sk-test-" + secrets.token_hex(16)
    values: dict[str, Any] = {
        "model": str(model_dir),
        "device": "cpu",
        "cpu_kvcache_space_gb": 1,
        "max_model_len": 2048,
        "max_num_seqs": 16,
        "api_keys": [api_key],
        "host": "127.0.0.1",
        "port": free_port(),
        "proxy_port": free_port(),
        # The server's own default. Each probe is a step of the engine, and after each step
        # vLLM's CPU workers spin for a second waiting for the next: a probe every 2 s kept the
        # session's shared server at half a core for the whole run (benchmarks/bench_idle_probe.py).
        "ready_probe_interval_s": 10.0,
        "drain_timeout_s": 1.0,
        "engine_cpus": 0.5,
        "app_name": "test-" + secrets.token_hex(3),
        "engine_args": {"enforce_eager": True},
    }
    values.update(overrides)
    return values, api_key


@contextlib.contextmanager
def running_server(
    cluster: Any, model_dir: Path, *, ready_timeout_s: float = 300.0, **overrides: Any
) -> Iterator[ApiServer]:
    """Deploy a server on `cluster`, wait for /ready, yield it, shut it down.

    Every engine the tests start is small: 1 GiB KV cache, short context, few sequences.
    """
    from serve.readiness import wait_until_ready

    address, env = _cluster_address_and_env(cluster)
    values, api_key = server_values(model_dir, **overrides)
    out = run_driver(DEPLOY_SNIPPET, address, env=env, stdin=json.dumps(values), timeout=300)
    endpoint = json.loads(out.strip().splitlines()[-1])
    try:
        loading_ready = _first_answer(f"{endpoint['url']}/ready")
        loading_health = _first_answer(f"{endpoint['url']}/health")
        wait_until_ready(endpoint["url"], timeout_s=ready_timeout_s)
        yield ApiServer(
            url=endpoint["url"],
            api_key=api_key,
            model=endpoint["model"],
            app_name=values["app_name"],
            ray_address=address,
            max_ongoing_requests=int(values.get("max_ongoing_requests", 256)),
            loading_ready=loading_ready,
            loading_health=loading_health,
        )
    finally:
        run_driver(STOP_SNIPPET, values["app_name"], address, env=env, timeout=300)


def _first_answer(url: str, *, timeout_s: float = 60.0):
    """The first HTTP answer of `url` (retrying while nothing listens yet)."""
    import time

    import httpx

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            response = httpx.get(url, timeout=5.0)
            return response.status_code, dict(response.headers), response.json()
        except httpx.TransportError:
            if time.monotonic() > deadline:
                return None
            time.sleep(0.2)


def seconds_until_status(
    base_url: str, key: str, status: int, *, limit_s: float, poll_s: float = 0.05
) -> float:
    """Seconds until GET ``base_url``/models with ``key`` answers ``status`` (``base_url`` ends
    in /v1); fails the test after ``limit_s``."""
    import time

    import httpx

    start = time.monotonic()
    while True:
        got = httpx.get(
            f"{base_url}/models", headers={"Authorization": f"Bearer {key}"}
        ).status_code
        if got == status:
            return time.monotonic() - start
        assert time.monotonic() - start < limit_s, f"still {got}, not {status}, after {limit_s}s"
        time.sleep(poll_s)
