"""A real engine whose Ray worker hangs (SIGSTOP): the watchdog ends the stream in flight with an
SSE error event, answers 503 while it restarts the engine, and the replica is ready again."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from cluster.top import parse_metrics
from serve.app import HISTORY_KV_NAMESPACE, history_kv_key
from tests.support.server import run_driver, running_server

pytestmark = [pytest.mark.engine, pytest.mark.e2e, pytest.mark.timeout(900)]

STALL_TIMEOUT_S = 4.0
# Reads an app's restart history where the replica stores it (Ray's internal KV).
READ_HISTORY_SNIPPET = """
import sys, ray
from ray.experimental import internal_kv
ray.init(address=sys.argv[1], log_to_driver=False)
print(internal_kv._internal_kv_get(sys.argv[2], namespace=sys.argv[3]).decode())
"""


def ray_worker_pids(session_ids: list[int]) -> list[int]:
    """vLLM's Ray worker processes (``ray::RayWorkerProc``) of exactly one test cluster: every
    process of a loopback node shares that node's session (tests/support/ray_cluster.py)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            session = os.getsid(int(entry.name))
        except (OSError, ProcessLookupError):
            continue
        if cmdline.startswith(b"ray::RayWorkerProc") and session in session_ids:
            pids.append(int(entry.name))
    return pids


def restarts_counted(server, cause: str) -> float:
    """``llamacluster_engine_restarts_total{cause}`` as the server's /metrics reports it."""
    resp = httpx.get(f"{server.url}/metrics", headers=server.auth, timeout=10)
    assert resp.status_code == 200, resp.text[:300]
    key = ("llamacluster_engine_restarts_total", (("cause", cause),))
    return parse_metrics(resp.text).get(key, 0.0)


def alive(pid: int) -> bool:
    """Running or stopped, not gone and not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_stalled_worker_is_detected_and_the_whole_engine_restarted(
    make_ray_cluster, demo_model_dir: Path
) -> None:
    # A Ray cluster of its own: the shared server's cluster stays untouched, and every Ray worker
    # of this cluster belongs to this app.
    cluster = make_ray_cluster(nodes=1, slots_per_node=1)
    stopped: list[int] = []
    with running_server(
        cluster,
        demo_model_dir,
        stall_timeout_s=STALL_TIMEOUT_S,
        ready_probe_interval_s=1.0,
        restart_backoff_s=1.0,
        restart_backoff_max_s=2.0,
        retry_after_s=2,
    ) as server:
        try:
            workers = ray_worker_pids(cluster.session_ids)
            assert len(workers) == 1, workers
            # On a crowded 2-core machine a warm-up could already have tripped the watchdog:
            # count from here.
            before = httpx.get(f"{server.url}/health", timeout=5).json()
            counted_before = restarts_counted(server, "stall")
            body = {
                "model": server.model,
                "messages": [{"role": "user", "content": "Go on."}],
                "max_tokens": 1900,
                "ignore_eos": True,
                "stream": True,
            }
            events: list[str] = []
            stopped_at = 0.0
            with httpx.stream(
                "POST",
                f"{server.base_url}/chat/completions",
                json=body,
                headers=server.auth,
                timeout=httpx.Timeout(10.0, read=STALL_TIMEOUT_S + 30),
            ) as response:
                assert response.status_code == 200
                for line in response.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    events.append(line[6:])
                    if len(events) == 3:
                        os.kill(workers[0], signal.SIGSTOP)  # a hang in decode
                        stopped.append(workers[0])
                        stopped_at = time.monotonic()
            ended_at = time.monotonic()
            detect_s = ended_at - stopped_at

            # The stream ended by itself, soon after the stall timeout, with an error event.
            assert events[-1] == "[DONE]"
            error = json.loads(events[-2])["error"]
            assert set(error) == {"message", "type", "param", "code"}
            assert error["code"] == 503 and "stall" in error["message"]
            assert detect_s <= STALL_TIMEOUT_S + 5, detect_s

            # While the engine restarts: 503 + Retry-After in OpenAI's shape, /ready false,
            # /health says why.
            refused = httpx.post(
                f"{server.base_url}/chat/completions",
                json={**body, "stream": False, "max_tokens": 4},
                headers=server.auth,
                timeout=10,
            )
            assert refused.status_code == 503, refused.text
            assert refused.headers["retry-after"] == "2"
            assert set(refused.json()["error"]) == {"message", "type", "param", "code"}
            assert httpx.get(f"{server.url}/ready", timeout=5).status_code == 503
            health = httpx.get(f"{server.url}/health", timeout=5)
            assert health.status_code == 503
            engine = health.json()["engine"]
            assert health.json()["status"] == "restarting"
            assert (engine["state"], engine["cause"], engine["attempt"]) == (
                "restarting",
                "stall",
                before["engine"]["attempt"] + 1,
            )
            assert engine["since"]

            # Recovered: a fresh engine (new worker, the stopped one gone) answers again.
            deadline = time.monotonic() + 300
            while httpx.get(f"{server.url}/ready", timeout=5).status_code != 200:
                assert time.monotonic() < deadline, httpx.get(f"{server.url}/health").text
                time.sleep(0.5)
            ready_s = time.monotonic() - stopped_at
            reply = server.client().chat.completions.create(
                model=server.model, messages=body["messages"], max_tokens=4
            )
            assert reply.usage.completion_tokens == 4
            # With the key: the full history (free-text details too), as stored in the KV.
            health = httpx.get(f"{server.url}/health", headers=server.auth, timeout=5).json()
            assert health["status"] == "ok" and health["engine"]["state"] == "serving"
            assert len(health["restarts"]) == len(before["restarts"]) + 1
            restart = health["restarts"][-1]
            assert (restart["cause"], restart["attempt"], restart["outcome"]) == (
                "stall",
                before["engine"]["attempt"] + 1,
                "recovered",
            )
            assert not alive(workers[0]), "the hung worker outlived its engine"
            # The monitor's restart counter went up by exactly this one restart.
            assert restarts_counted(server, "stall") == counted_before + 1
            # The history is also in Ray's internal KV (it outlives a replaced replica).
            stored = run_driver(
                READ_HISTORY_SNIPPET,
                cluster.address,
                history_kv_key(server.app_name),
                HISTORY_KV_NAMESPACE,
                env=cluster.env,
                timeout=120,
            )
            assert json.loads(stored.strip().splitlines()[-1]) == health["restarts"]
            [new_worker] = ray_worker_pids(cluster.session_ids)
            assert new_worker != workers[0]
            print(
                f"\nwatchdog: stream ended {detect_s:.1f}s after SIGSTOP "
                f"(stall timeout {STALL_TIMEOUT_S:g}s); ready again {ready_s:.1f}s after it; "
                f"/health down_s {restart['down_s']}"
            )
        finally:
            for pid in stopped:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
