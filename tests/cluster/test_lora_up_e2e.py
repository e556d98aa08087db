"""`llamacluster up --local --lora NAME=REPO` end to end: the adapter comes from the (loopback)
hub through the sharded, verified download into <shared>/models and is served beside the model."""

from __future__ import annotations

import json
import os
from pathlib import Path

import httpx
import pytest

from cluster.demo_lora import DEMO_LORA_REPO_ID, build_demo_lora
from cluster.demo_model import DEMO_MODEL_REPO_ID
from tests.cluster.test_up_e2e import _bring_down_and_check, _ok, _state, llamacluster
from tests.support.hub import LoopbackHub

pytestmark = pytest.mark.e2e


@pytest.mark.timeout(900)
def test_up_downloads_and_serves_a_hub_adapter(tmp_path: Path, demo_model_dir: Path) -> None:
    home = tmp_path / "home"
    env = {**os.environ, "LLAMACLUSTER_HOME": str(home), "VLLM_CPU_KVCACHE_SPACE": "1"}
    env.pop("HF_TOKEN", None)
    adapter = build_demo_lora(tmp_path / "demo-lora")
    hub = LoopbackHub()
    hub.add_repo(DEMO_MODEL_REPO_ID, demo_model_dir)
    hub.add_repo(DEMO_LORA_REPO_ID, adapter)
    args = ["--local", "--model", DEMO_MODEL_REPO_ID, "--lora", f"tuned={DEMO_LORA_REPO_ID}"]
    args += ["--ray-port", "0", "--dashboard-port", "0", "--api-port", "0"]
    args += ["--monitor-port", "0", "--cpu-kvcache-gb", "1", "--skip", "monitor"]
    args += ["--skip", "measure"]  # the CPU and link measurement: not what this test checks
    args += ["--engine-arg", "enforce_eager=true"]
    with hub:
        env.update(hub.env())
        try:
            _ok(llamacluster("up", *args, env=env))
            state = _state(home, "local")
            shared = Path(state["shared_dir"])
            target = shared / "models" / DEMO_LORA_REPO_ID.replace("/", "--")
            manifest = json.loads((target / "manifest.json").read_text())
            assert manifest["repo"] == DEMO_LORA_REPO_ID
            assert (target / "adapter_model.safetensors").read_bytes() == (
                adapter / "adapter_model.safetensors"
            ).read_bytes()

            url = state["server"]["endpoint"]
            key = Path(state["secrets"]["api_key_file"]).read_text().strip()
            auth = {"Authorization": f"Bearer {key}"}
            models = httpx.get(f"{url}/v1/models", headers=auth, timeout=30).json()["data"]
            parents = {m["id"]: m.get("parent") for m in models}
            assert parents == {DEMO_MODEL_REPO_ID: None, "tuned": DEMO_MODEL_REPO_ID}
            answers = []
            for model in (DEMO_MODEL_REPO_ID, "tuned"):
                body = {"model": model, "prompt": "Hello", "max_tokens": 12, "temperature": 0}
                done = httpx.post(f"{url}/v1/completions", json=body, headers=auth, timeout=120)
                assert done.status_code == 200, done.text
                answers.append(done.json()["choices"][0]["text"])
            assert answers[0] != answers[1]
        finally:
            if (home / "clusters" / "local" / "state.json").exists():
                _bring_down_and_check(home, "local", env)
