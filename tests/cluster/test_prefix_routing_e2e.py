"""`up --local --replicas 2 --routing prefix`: two real vLLM engines behind Ray Serve's HAProxy,
whose Lua asks serve/prefix_router.py for each request's replica.

The turns of each conversation land on one replica (the router's own decisions, by the client's
request id), and `bench --workload chat-sessions --name` reports the replicas' prefix-cache hit
rate summed from their own /metrics.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import httpx
import pytest

from serve.balancer import private_dir_path
from tests.cluster.test_up_e2e import _bring_down_and_check, _ok, _state, llamacluster

pytestmark = pytest.mark.e2e

ROUTER = re.compile(r'host = "([^"]+)", port = (\d+)')
SYSTEM = (
    "You are a careful assistant of a travel agency. Answer briefly, name prices in euros, "
    "and never invent timetables. " * 6
)


def _router_url(api_port: int) -> str:
    """The router's own address, from the Lua file Ray wrote for this endpoint's HAProxy."""
    for lua in private_dir_path("llamacluster", api_port).glob("*/ingress_request_router.lua"):
        found = ROUTER.search(lua.read_text())
        if found:
            return f"http://{found[1]}:{found[2]}"
    raise AssertionError("no ingress request router in HAProxy's Lua file")


def _chat(url: str, key: str, model: str, messages: list[dict], request_id: str) -> str:
    r = httpx.post(
        f"{url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {key}", "x-request-id": request_id},
        json={"model": model, "messages": messages, "max_tokens": 6, "ignore_eos": True},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


@pytest.mark.timeout(900)
def test_prefix_routing_keeps_conversations_on_one_replica(tmp_path, cli_env, demo_model_dir):
    home = Path(cli_env["LLAMACLUSTER_HOME"])
    args = ["--local", "--model", str(demo_model_dir), "--tp", "1", "--pp", "1", "--replicas", "2"]
    args += ["--routing", "prefix", "--cpu-slots", "2", "--cpu-kvcache-gb", "1"]
    args += ["--skip", "monitor", "--skip", "measure"]
    args += ["--ray-port", "0", "--dashboard-port", "0", "--api-port", "0"]
    try:
        _ok(llamacluster("up", *args, env=cli_env))
        state = _state(home, "local")
        url, model = state["server"]["endpoint"], state["server"]["served_name"]
        key = Path(state["secrets"]["api_key_file"]).read_text().strip()
        api_port = int(url.rsplit(":", 1)[1])
        deadline = time.monotonic() + 300
        while httpx.get(f"{url}/ready?all=1", timeout=30).status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(2)

        # Three conversations, three turns each, one after the other.
        for c in range(3):
            messages = [{"role": "system", "content": SYSTEM}]
            for t in range(3):
                messages.append({"role": "user", "content": f"Conversation {c}, question {t}?"})
                answer = _chat(url, key, model, messages, f"conv{c}-turn{t}")
                messages.append({"role": "assistant", "content": answer})
        decisions = httpx.get(f"{_router_url(api_port)}/internal/decisions", timeout=30).json()
        by_id = {d["request_id"]: d for d in decisions["decisions"] if d["request_id"]}
        for c in range(3):
            turns = [by_id[f"conv{c}-turn{t}"] for t in range(3)]
            assert len({d["replica_id"] for d in turns}) == 1, turns
            # Later turns match every block of the earlier ones (system prompt and all).
            assert [d["reason"] for d in turns[1:]] == ["prefix", "prefix"], turns
            assert turns[2]["matched_blocks"] >= turns[1]["blocks"] - 1, turns

        # The workload: conversations with a shared system prompt; the hit rate is the
        # replicas' own counters (both found from the cluster's state) over the run.
        out = tmp_path / "bench"
        bench_args = ["--name", "local", "--workload", "chat-sessions", "--turns", "3"]
        bench_args += ["--system-prompt-len", "300", "--input-len", "32", "--output-len", "8"]
        bench_args += ["-n", "12", "-c", "2", "--tokenizer", str(demo_model_dir)]
        bench_args += ["--no-plots", "--no-progress", "--no-net-counters", "-o", str(out)]
        bench = _ok(llamacluster("bench", *bench_args, env=cli_env, timeout=300))
        result = json.loads((out / "bench.json").read_text())
        point = result["points"][0]
        assert point["completed"] == 12, (bench, result["warnings"])
        assert point["extra"]["prefix_cache_replicas"] == 2, point["extra"]
        # Two of each conversation's three prompts start with the one before it.
        assert point["extra"]["prefix_cache_hit_rate"] > 0.3, point["extra"]
    finally:
        _bring_down_and_check(home, "local", cli_env)
