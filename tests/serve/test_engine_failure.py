"""A real engine dying mid-stream: the client gets an SSE error event, then [DONE]; /health fails
while the watchdog restarts the engine in the replica, and the server is ready again."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from serve.app import APP_ENV
from tests.support.server import running_server

pytestmark = [pytest.mark.engine, pytest.mark.e2e, pytest.mark.timeout(900)]


def engine_core_pids(app_name: str) -> list[int]:
    """Engine core processes of exactly this app (its name is in their environment)."""
    pids = []
    marker = f"{APP_ENV}={app_name}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if cmdline.startswith(b"VLLM::EngineCore") and marker in environ:
            pids.append(int(entry.name))
    return pids


def test_engine_death_mid_stream(make_ray_cluster, demo_model_dir: Path) -> None:
    # A Ray cluster of its own: Serve holds one app per route prefix, and the session's shared
    # server may already own "/" on the shared cluster.
    cluster = make_ray_cluster(nodes=1, slots_per_node=1)
    with running_server(cluster, demo_model_dir, ready_probe_interval_s=30.0) as server:
        pids = engine_core_pids(server.app_name)
        assert len(pids) == 1, pids
        body = {
            "model": server.model,
            "messages": [{"role": "user", "content": "Go on."}],
            "max_tokens": 1900,
            "ignore_eos": True,
            "stream": True,
        }
        events: list[str] = []
        killed_at = time.monotonic()
        with httpx.stream(
            "POST",
            f"{server.base_url}/chat/completions",
            json=body,
            headers=server.auth,
            timeout=120,
        ) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if not line.startswith("data: "):
                    continue
                events.append(line[6:])
                if len(events) == 3:
                    os.kill(pids[0], signal.SIGKILL)
                    killed_at = time.monotonic()
        ended_s = time.monotonic() - killed_at
        assert events[-1] == "[DONE]"
        errors = [json.loads(e) for e in events[:-1] if '"error"' in e]
        assert errors, events[-5:]
        assert set(errors[-1]["error"]) >= {"message", "type", "code"}
        assert errors[-1]["error"]["code"] == 503  # the engine is gone: retry later
        assert len(events) < 1900  # it stopped early, not after all tokens

        deadline = time.monotonic() + 30
        health = None
        while time.monotonic() < deadline:
            health = httpx.get(f"{server.url}/health", timeout=5)
            if health.status_code == 503:
                break
            time.sleep(0.5)
        assert health is not None and health.status_code == 503
        assert "engine" in health.json()["error"]["message"]

        # The watchdog restarts the engine inside the replica and records why.
        deadline = time.monotonic() + 300
        while httpx.get(f"{server.url}/ready", timeout=5).status_code != 200:
            assert time.monotonic() < deadline, httpx.get(f"{server.url}/health").text
            time.sleep(0.5)
        ready_s = time.monotonic() - killed_at
        restarts = httpx.get(f"{server.url}/health", timeout=5).json()["restarts"]
        assert [(r["cause"], r["outcome"]) for r in restarts] == [("engine_dead", "recovered")]
        assert len(engine_core_pids(server.app_name)) == 1  # the new one; the old one is gone
        print(
            f"\nengine core killed: stream ended {ended_s:.1f}s after SIGKILL; "
            f"ready again {ready_s:.1f}s after it"
        )
