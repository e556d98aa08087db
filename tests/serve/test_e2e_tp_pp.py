"""tp=2 × pp=2 across two loopback Ray nodes, deployed and stopped through the CLI."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest

from tests.support.server import free_port, run_driver

pytestmark = [pytest.mark.e2e, pytest.mark.engine, pytest.mark.timeout(900)]

LLAMACLUSTER = str(Path(sys.executable).parent / "llamacluster")

# Where every vLLM worker actor of the cluster runs (node address), from Ray's own state.
WORKER_NODES_SNIPPET = """
import json, ray
from ray.util.state import list_actors, list_nodes
ray.init(log_to_driver=False, logging_level="ERROR")
nodes = {n.node_id: n.node_ip for n in list_nodes()}
workers = [a for a in list_actors(filters=[("state", "=", "ALIVE")]) if "Worker" in a.class_name
           and "ServeReplica" not in a.class_name]
print(json.dumps([[a.class_name, nodes.get(a.node_id, "?")] for a in workers]))
"""


def _cli(*args: str, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        [LLAMACLUSTER, *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_tp2_pp2_across_two_nodes(make_ray_cluster, demo_model_dir: Path) -> None:
    cluster = make_ray_cluster(nodes=2, slots_per_node=2)
    api_key = "sk-e2e-" + secrets.token_hex(8)
    env = {**cluster.env, "LLAMACLUSTER_API_KEY": api_key}
    port = free_port()
    app_name = "e2e-" + secrets.token_hex(3)
    deployed = _cli(
        "serve",
        "--model",
        str(demo_model_dir),
        "--tp",
        "2",
        "--pp",
        "2",
        "--device",
        "cpu",
        "--kv-cache-gb",
        "1",
        "--max-model-len",
        "512",
        "--max-num-seqs",
        "8",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--proxy-port",
        str(free_port()),
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
    try:
        assert deployed.returncode == 0, deployed.stderr[-3000:]
        endpoint = json.loads(deployed.stdout.strip().splitlines()[-1])
        assert endpoint["url"] == f"http://127.0.0.1:{port}"

        workers = json.loads(
            run_driver(WORKER_NODES_SNIPPET, env=cluster.env, timeout=120).strip().splitlines()[-1]
        )
        assert len(workers) == 4, workers
        per_node: dict[str, int] = {}
        for _, node_ip in workers:
            per_node[node_ip] = per_node.get(node_ip, 0) + 1
        assert sorted(per_node.values()) == [2, 2], workers  # both nodes hold two workers

        client = openai.OpenAI(base_url=endpoint["url"] + "/v1", api_key=api_key)
        stream = client.chat.completions.create(
            model=endpoint["model"],
            messages=[{"role": "user", "content": "Stream something."}],
            max_tokens=16,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
        assert chunks[-1].usage.completion_tokens == 16
        assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) >= 1
    finally:
        stopped = _cli(
            "serve-stop", "--app-name", app_name, "--address", cluster.address, env=env, timeout=300
        )
    assert stopped.returncode == 0, stopped.stderr[-2000:]
    assert f"stopped {app_name}" in stopped.stdout
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
    left = json.loads(
        run_driver(WORKER_NODES_SNIPPET, env=cluster.env, timeout=120).strip().splitlines()[-1]
    )
    assert left == []
