"""`up --local --model A --model B,name=...`: two models behind one endpoint (each its own Serve
app and engine, HAProxy routing by the request's `model`), listed together, `status` and `ready`
know both, a second `up` changes nothing, `up --model A` alone stops B, and `down` stops all."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest

from cluster.demo_model import build_demo_model
from tests.cluster.test_up_e2e import _bring_down_and_check, _ok, _state, llamacluster

pytestmark = pytest.mark.e2e

PROMPT = "The llama is a domesticated"


def _complete(url: str, key: str, model: str) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/completions",
        headers={"Authorization": f"Bearer {key}"},
        json={"model": model, "prompt": PROMPT, "max_tokens": 6, "temperature": 0.0},
        timeout=120,
    )


@pytest.mark.timeout(1500)
def test_up_serves_two_models_and_a_plain_up_keeps_them(tmp_path, demo_model_dir: Path) -> None:
    other = build_demo_model(tmp_path / "demo-b", seed=1)
    home = tmp_path / "home"
    env = {**os.environ, "LLAMACLUSTER_HOME": str(home), "COLUMNS": "250"}
    base = ["--local", "--cpu-slots", "2", "--cpu-kvcache-gb", "1", "--skip", "monitor"]
    base += ["--skip", "measure"]  # the CPU and link measurement: not what this test checks
    base += ["--ray-port", "0", "--dashboard-port", "0", "--api-port", "0"]
    models = ["--model", str(demo_model_dir), "--model", f"{other},name=demo-b"]
    try:
        up = _ok(llamacluster("up", *base, *models, env=env, timeout=1200))
        assert "further models (send their name as `model`): demo-b" in up, up[-3000:]
        state = _state(home, "local")
        server = state["server"]
        first = server["served_name"]
        assert server["models"] == [first, "demo-b"]
        assert server["model_routes"] == ["/_lc/llamacluster--demo-b"]
        # One replica of each (the first model's `auto` fills what the second leaves).
        assert server["replicas"] == 1 and server["deployed_more"][0]["num_replicas"] == 1
        url = server["endpoint"]
        key = Path(state["secrets"]["api_key_file"]).read_text().split()[0]
        listed = httpx.get(
            f"{url}/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=30
        ).json()
        assert {m["id"] for m in listed["data"]} == {first, "demo-b"}
        a, b = _complete(url, key, first), _complete(url, key, "demo-b")
        assert a.status_code == b.status_code == 200, (a.text, b.text)
        assert (a.json()["model"], b.json()["model"]) == (first, "demo-b")
        assert a.json()["choices"][0]["text"] != b.json()["choices"][0]["text"]
        assert _complete(url, key, "demo-c").status_code == 404

        status = _ok(llamacluster("status", "--local", env=env, timeout=300))
        assert "model demo-b ready (at /_lc/llamacluster--demo-b)" in status, status

        # A plain `up` keeps both models and changes nothing.
        again = _ok(
            llamacluster("up", *base, "--skip", "env", "--skip", "ray", env=env, timeout=600)
        )
        assert "already serving" in again, again[-3000:]
        assert _state(home, "local")["server"]["models"] == [first, "demo-b"]

        # `up --model A` alone: the endpoint serves A only (the second app stops).
        one = _ok(
            llamacluster(
                "up", *base, "--model", str(demo_model_dir), "--skip", "env", "--skip", "ray",
                env=env, timeout=900,
            )
        )  # fmt: skip
        server = _state(home, "local")["server"]
        assert server["models"] == [first] and server["model_routes"] == [], one[-3000:]
        url = server["endpoint"]
        assert _complete(url, key, first).status_code == 200
        gone = _complete(url, key, "demo-b")
        assert gone.status_code == 404, gone.text
    finally:
        _bring_down_and_check(home, "local", env)
