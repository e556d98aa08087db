"""A LoRA adapter on a real server (Ray Serve + vLLM CPU, demo model): listed in /v1/models with
the base model as its parent, used when a request names it, and unknown names answer 404."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from cluster.demo_lora import build_demo_lora
from tests.support.server import running_server

pytestmark = [pytest.mark.engine, pytest.mark.e2e, pytest.mark.timeout(600)]

PROMPT = "The llama is a domesticated"


def greedy(url: str, auth: dict[str, str], model: str) -> str:
    """A 16-token greedy completion of PROMPT with ``model``."""
    body = {"model": model, "prompt": PROMPT, "max_tokens": 16, "temperature": 0.0}
    response = httpx.post(f"{url}/v1/completions", json=body, headers=auth, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def test_adapter_is_listed_used_and_changes_the_answer(
    make_ray_cluster, demo_model_dir: Path, tmp_path: Path
) -> None:
    adapter = build_demo_lora(tmp_path / "demo-lora")
    # A Ray cluster of its own: Serve holds one app per route prefix, and the session's shared
    # server may already own "/" on the shared cluster.
    cluster = make_ray_cluster(nodes=1, slots_per_node=1)
    with running_server(cluster, demo_model_dir, lora_modules=[f"demo-lora={adapter}"]) as server:
        models = httpx.get(f"{server.base_url}/models", headers=server.auth, timeout=30).json()
        by_id = {m["id"]: m for m in models["data"]}
        assert set(by_id) == {server.model, "demo-lora"}
        assert by_id["demo-lora"]["parent"] == server.model
        assert by_id["demo-lora"]["root"] == str(adapter)

        base = greedy(server.url, server.auth, server.model)
        tuned = greedy(server.url, server.auth, "demo-lora")
        assert tuned != base
        # Greedy and deterministic: the adapter's answer is the same every time.
        assert greedy(server.url, server.auth, "demo-lora") == tuned

        chat = httpx.post(
            f"{server.base_url}/chat/completions",
            json={"model": "demo-lora", "messages": [{"role": "user", "content": "hi"}],
                  "max_tokens": 4},
            headers=server.auth,
            timeout=120,
        )  # fmt: skip
        assert chat.status_code == 200 and chat.json()["model"] == "demo-lora"

        unknown = httpx.post(
            f"{server.base_url}/completions",
            json={"model": "no-such-adapter", "prompt": PROMPT, "max_tokens": 4},
            headers=server.auth,
            timeout=30,
        )
        assert unknown.status_code == 404
        error = unknown.json()["error"]
        assert error["type"] == "not_found_error" and "no-such-adapter" in error["message"]
