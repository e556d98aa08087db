"""`up --local --cpu-slots 2 --tls self-signed` with the default `--replicas auto`: the planner
fills both slots, HAProxy serves HTTPS with the cluster's certificate and speaks HTTPS to each
replica, `status` shows each replica's requests and restarts, `logs --replica` reads one
replica's files, and `down` removes the app's HAProxy directory."""

from __future__ import annotations

import os
import re
import ssl
from pathlib import Path

import httpx
import pytest

from serve.balancer import private_dir_path
from tests.cluster.test_up_e2e import _bring_down_and_check, _ok, _state, llamacluster

pytestmark = pytest.mark.e2e

REPLICA_LINE = re.compile(
    r"replica (\d) on (\S+) \(pid (\d+)\): RUNNING, port (\d+), (\d+) request\(s\) running, "
    r"(\d+) restart\(s\)"
)


@pytest.mark.timeout(1200)
def test_auto_fills_the_slots_and_status_logs_down_know_the_replicas(tmp_path, demo_model_dir):
    home = tmp_path / "home"
    env = {**os.environ, "LLAMACLUSTER_HOME": str(home), "VLLM_CPU_KVCACHE_SPACE": "1"}
    env["COLUMNS"] = "250"
    args = ["--local", "--model", str(demo_model_dir), "--tp", "1", "--pp", "1"]
    args += ["--cpu-slots", "2", "--cpu-kvcache-gb", "1", "--skip", "monitor"]
    args += ["--tls", "self-signed"]
    args += ["--ray-port", "0", "--dashboard-port", "0", "--api-port", "0"]
    balancer_dir = None
    try:
        up = _ok(llamacluster("up", *args, env=env, timeout=900))
        # Two slots and this machine's memory hold two demo engines: the planner picks two.
        assert "--replicas auto: replicas: 2 of tp=1 × pp=1" in up, up
        state = _state(home, "local")
        assert state["server"]["replicas"] == 2
        url = state["server"]["endpoint"]
        assert url.startswith("https://"), url
        balancer_dir = private_dir_path("llamacluster", state["ports"]["api"])
        key = Path(state["secrets"]["api_key_file"]).read_text().split()[0]
        verify = ssl.create_default_context(cafile=str(home / "clusters/local/tls/api.crt"))
        for _ in range(4):  # both replicas, through HAProxy's TLS hop to each
            answer = httpx.post(
                f"{url}/v1/completions",
                headers={"Authorization": f"Bearer {key}"},
                json={"model": state["server"]["served_name"], "prompt": "Hi", "max_tokens": 2},
                timeout=120,
                verify=verify,
            )
            assert answer.status_code == 200, answer.text
        # Every replica asked by one of them, over HTTPS on their own ports.
        every = httpx.get(f"{url}/ready?all=1", verify=verify, timeout=60)
        assert every.status_code == 200, every.text
        with pytest.raises(httpx.HTTPError):  # no plain HTTP on the endpoint
            httpx.get(url.replace("https://", "http://") + "/v1/models", timeout=10)
        # The HTTPS HAProxy config: the key sits in the private directory, 0600.
        (pem,) = balancer_dir.glob("*/api.pem")
        assert pem.stat().st_mode & 0o777 == 0o600
        status = _ok(llamacluster("status", "--local", env=env, timeout=300))
        lines = REPLICA_LINE.findall(status)
        assert [n for n, *_ in lines] == ["1", "2"], status
        assert len({p for *_, p, _, _ in lines}) == 2  # each its own port
        for *_, port, _, _ in lines:  # each replica's own port speaks HTTPS too
            host = url.split("://")[1].rsplit(":", 1)[0]
            r = httpx.get(f"https://{host}:{port}/v1/models", verify=verify, timeout=30)
            assert r.status_code == 401, r.text  # TLS verified; the key is still required
        assert all(running == "0" for *_, running, _ in lines), status  # idle again
        logs = _ok(llamacluster("logs", "--local", "--replica", "2", "-n", "50", env=env))
        # tail's header of each file: Serve's log of that replica and its process's output.
        assert "==> serve/replica_llamacluster_" in logs, logs[-3000:]
        assert re.search(rf"==> worker-\S+-{lines[1][2]}\.(out|err) <==", logs), logs[-3000:]
        refused = llamacluster("logs", "--local", "--replica", "3", env=env)
        assert refused.returncode != 0 and "has 2 replica(s), not a replica 3" in refused.stderr
        assert balancer_dir.is_dir()
    finally:
        if (home / "clusters" / "local" / "state.json").exists():
            _bring_down_and_check(home, "local", env)
    assert balancer_dir is not None and not balancer_dir.exists()  # `down` removed it
