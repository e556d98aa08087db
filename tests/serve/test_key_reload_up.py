"""Key changes on a cluster brought up by `up --local`: a hand-edited key file and a second `up`,
then `llamacluster keys add/revoke`, each applied to the running server without a redeploy."""

from __future__ import annotations

import os
import time
from pathlib import Path

import httpx
import pytest

from cluster.keys import read_api_key
from tests.cluster.test_up_e2e import _bring_down_and_check, _ok, _state, llamacluster

pytestmark = pytest.mark.e2e


def wait_for_status(endpoint: str, key: str, status: int, *, limit_s: float = 10) -> float:
    """Seconds until GET /v1/models with ``key`` answers ``status``."""
    start = time.monotonic()
    while True:
        got = httpx.get(
            f"{endpoint}/v1/models", headers={"Authorization": f"Bearer {key}"}
        ).status_code
        if got == status:
            return time.monotonic() - start
        assert time.monotonic() - start < limit_s, f"still {got}, not {status}, after {limit_s}s"
        time.sleep(0.1)


@pytest.mark.timeout(1200)
def test_key_changes_reach_the_running_server_without_a_redeploy(tmp_path, demo_model_dir):
    home = tmp_path / "home"
    env = {**os.environ, "LLAMACLUSTER_HOME": str(home), "VLLM_CPU_KVCACHE_SPACE": "1"}
    args = ["--local", "--model", str(demo_model_dir), "--tp", "1", "--pp", "1"]
    args += ["--ray-port", "0", "--dashboard-port", "0", "--api-port", "0", "--monitor-port", "0"]
    args += ["--cpu-kvcache-gb", "1"]
    try:
        _ok(llamacluster("up", *args, env=env))
        state = _state(home, "local")
        endpoint, key_file = state["server"]["endpoint"], Path(state["secrets"]["api_key_file"])
        first = read_api_key(key_file)
        assert wait_for_status(endpoint, first, 200) < 1

        # A new key written into the key file by hand, then `up` again: applied, no redeploy.
        key_file.write_text("sk-by-hand-0123456789\n")
        again = _ok(llamacluster("up", *args, env=env))
        assert "API keys updated (1 accepted, no redeploy)" in again, again
        assert "redeployed" not in again
        assert wait_for_status(endpoint, first, 401, limit_s=5) < 5
        assert wait_for_status(endpoint, "sk-by-hand-0123456789", 200, limit_s=5) < 5

        added = llamacluster("keys", "add", "ci", "--local", env=env)
        secret = _ok(added).strip()
        assert "applied" in added.stderr and secret not in added.stderr
        assert wait_for_status(endpoint, secret, 200, limit_s=5) < 5
        _ok(llamacluster("keys", "revoke", "ci", "--local", env=env))
        assert wait_for_status(endpoint, secret, 401, limit_s=5) < 5
        assert wait_for_status(endpoint, "sk-by-hand-0123456789", 200, limit_s=1) < 1

        listed = _ok(llamacluster("keys", "list", "--local", env=env))
        assert "key-1" in listed and "sk-by-hand" not in listed
        assert "nothing changed" in _ok(llamacluster("up", *args, env=env))
    finally:
        if (home / "clusters" / "local" / "state.json").exists():
            _bring_down_and_check(home, "local", env)
