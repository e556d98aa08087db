"""The ray stage: each node's token under its own home, and `-v` showing each `ray start`."""

from __future__ import annotations

import io
import subprocess
import tempfile
from pathlib import Path

import pytest
from rich.console import Console

from cluster.inventory import Cluster, Node
from cluster.lifecycle import UpConfig, up
from cluster.ray_nodes import (
    RayClusterSpec,
    RayHeadPorts,
    RayNodeSpec,
    ray_node_env,
    ray_start_display,
    stop_ray_node,
)
from cluster.runner import LocalRunner
from cluster.stages.base import Reporter, UpContext
from cluster.stages.ray import node_token_path, start_node, token_path
from cluster.state import ClusterState, NodeState, cluster_key
from tests.cluster.test_ray_nodes import FAKE_RAY
from tests.support.ray_cluster import write_token_file


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMACLUSTER_HOME", str(tmp_path / "home"))


def _state(name: str) -> ClusterState:
    return ClusterState(
        name=name,
        nodes=[
            NodeState(
                name="head",
                label="127.0.0.2:2222",
                host="127.0.0.2",
                private_ip="127.0.0.2",
                home="/home/alice",
                devices=1,
            ),
            NodeState(
                name="worker1",
                label="127.0.0.3:2222",
                host="127.0.0.3",
                private_ip="127.0.0.3",
                home="/srv/bob",
                devices=1,
            ),
        ],
    )


def test_each_nodes_token_path_comes_from_its_own_home():
    state = _state("homes")
    key = cluster_key("homes")
    assert (
        node_token_path(state, "head") == f"/home/alice/.llamacluster/nodes/homes-{key}/ray_token"
    )
    assert (
        node_token_path(state, "worker1") == f"/srv/bob/.llamacluster/nodes/homes-{key}/ray_token"
    )
    assert token_path(state) == node_token_path(state, "head")  # drivers run on the head
    # Before preflight knows a home, the path is the SSH user's home on that node.
    assert node_token_path(state, "worker2").startswith("~/.llamacluster/nodes/")


def test_dry_run_plans_each_nodes_token_under_its_own_home(tmp_path, capsys):
    inv = tmp_path / "ips.txt"
    inv.write_text("root@127.0.0.2:2222\nroot@127.0.0.3:2222\n")
    _state("homes").save()  # a recorded cluster: preflight saw two different homes
    up(
        UpConfig(
            name="homes",
            inventory=inv,
            model="org/model",
            shared_dir=tmp_path / "shared",
            system_root=tmp_path / "root",
            dry_run=True,
        )
    )
    out = capsys.readouterr().out
    ray = out[out.index("▸ ray") : out.index("▸ serve")]
    key = cluster_key("homes")
    for label, home in (("127.0.0.2:2222", "/home/alice"), ("127.0.0.3:2222", "/srv/bob")):
        path = f"{home}/.llamacluster/nodes/homes-{key}/ray_token"
        lines = [ln.strip() for ln in ray.splitlines() if ln.strip().startswith(label + "$")]
        assert f"{label}$ copy <controller token> -> {path} (0600)" in lines
        start = next(ln for ln in lines if "cluster.ray_start start " in ln and "RAY_AUTH" in ln)
        assert f"RAY_AUTH_TOKEN_PATH={path} " in start
    assert "/srv/bob" not in "".join(ln for ln in ray.splitlines() if "127.0.0.2:2222$" in ln)


def test_verbose_start_shows_each_ray_start_line_and_never_the_token(tmp_path):
    ray = tmp_path / "ray"
    ray.write_text(FAKE_RAY)
    ray.chmod(0o755)
    token = "f" * 8 + "0123456789abcdef" * 3  # one token, a copy under each node's home
    paths = [str(write_token_file(tmp_path / who / "ray_token", token)) for who in ("a", "b")]
    spec = RayClusterSpec(
        name="verbose",
        temp_dir=tempfile.mkdtemp(prefix="lcv-", dir="/tmp"),
        token_path=paths[0],
        nodes=tuple(
            RayNodeSpec(ip=f"127.0.0.{i + 2}", num_gpus=1, token_path=p)
            for i, p in enumerate(paths)
        ),
        head_ports=RayHeadPorts(gcs=6390),
        env={"VLLM_HOST_IP": "127.0.0.2"},
        ray_bin=str(ray),
    )
    nodes = tuple(Node(index=i, host=n.ip, local=True) for i, n in enumerate(spec.nodes))
    runners = [LocalRunner(n) for n in nodes]
    out = io.StringIO()
    ctx = UpContext(
        config=UpConfig(local=True, verbose=True),
        cluster=Cluster(nodes=nodes),
        state=ClusterState(name="verbose"),
        runners=runners,
        reporter=Reporter(Console(file=out, soft_wrap=True), verbose=True),
    )
    handles = []
    try:
        for i, runner in enumerate(runners):
            handles.append(start_node(ctx, runner, spec, i))
    finally:
        for runner, handle in zip(runners, handles, strict=False):
            stop_ray_node(runner, handle, grace_s=1)
        subprocess.run(["rm", "-rf", spec.temp_dir], check=False)
    text = out.getvalue()
    assert token not in text
    head = next(ln for ln in text.splitlines() if "127.0.0.2$" in ln)
    worker = next(ln for ln in text.splitlines() if "127.0.0.3$" in ln)
    assert "ray start --head --port 6390" in head and "--node-ip-address 127.0.0.2" in head
    assert """--resources '{"llamacluster_head": 1}'""" in head
    assert "ray start --address 127.0.0.2:6390 --node-ip-address 127.0.0.3" in worker
    assert (
        f"RAY_AUTH_TOKEN_PATH={paths[0]} " in head and f"RAY_AUTH_TOKEN_PATH={paths[1]} " in worker
    )
    # Ray's own output follows live, prefixed by node: each start read its own token file.
    assert f"token={paths[1]} ingress=1" in text and f"token={paths[0]} ingress=1" in text
    masked = ray_start_display(RayClusterSpec(**{**spec.__dict__, "env": {"HF_TOKEN": "x"}}), 1)
    assert "HF_TOKEN=***" in masked and "HF_TOKEN=x" not in masked


def test_spec_without_node_token_paths_uses_the_clusters():
    spec = RayClusterSpec(
        name="one",
        temp_dir="/tmp/lc-one",
        token_path="/t/ray_token",
        nodes=(RayNodeSpec(ip="10.0.0.1", num_gpus=1), RayNodeSpec(ip="10.0.0.2", num_gpus=1)),
    )
    assert [spec.node_token_path(i) for i in range(2)] == ["/t/ray_token"] * 2
    assert ray_node_env(spec, 1)["RAY_AUTH_TOKEN_PATH"] == "/t/ray_token"


def test_logs_command_tails_serve_logs_and_the_engine_workers_output(tmp_path: Path) -> None:
    from cluster.stages.ray import serve_logs_command

    logs = tmp_path / "session_latest" / "logs"
    (logs / "serve").mkdir(parents=True)
    (logs / "serve" / "controller_1.log").write_text("controller line\n")
    (logs / "worker-aa-01000000-7.err").write_text(
        ":job_id:01000000\n:actor_name:ServeReplica:llamacluster:LlamaclusterServer\n"
        "RuntimeError: open shm in SHMManager failed\n"
    )
    (logs / "worker-bb-01000000-8.out").write_text(":actor_name:RayWorkerProc\nworker line\n")
    (logs / "worker-cc-01000000-9.err").write_text(":actor_name:ProxyActor\nproxy noise\n")
    done = subprocess.run(
        ["sh", "-c", serve_logs_command(str(tmp_path), follow=False, lines=5)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "controller line" in done.stdout and "open shm in SHMManager failed" in done.stdout
    assert "worker line" in done.stdout and "proxy noise" not in done.stdout
    missing = subprocess.run(
        ["sh", "-c", serve_logs_command(str(tmp_path / "none"), follow=False, lines=5)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert missing.returncode == 1 and "no Ray logs" in missing.stderr


def test_root_cause_is_the_engines_last_exception_not_vllms_wrapper(tmp_path: Path) -> None:
    from cluster.stages.ray import root_cause_command

    logs = tmp_path / "session_latest" / "logs"
    logs.mkdir(parents=True)
    (logs / "worker-aa-01000000-7.err").write_text(
        ":actor_name:ServeReplica:llamacluster:LlamaclusterServer\n"
        "Traceback (most recent call last):\n"
        "RuntimeError: open shm in SHMManager failed. errno: 2\n"
        "RuntimeError: Engine core initialization failed. See root cause above.\n"
    )
    (logs / "worker-cc-01000000-9.err").write_text(":actor_name:ProxyActor\nValueError: other\n")

    def cause(temp: Path) -> str:
        return subprocess.run(
            ["sh", "-c", root_cause_command(str(temp))], capture_output=True, text=True, check=True
        ).stdout.strip()

    assert cause(tmp_path) == "RuntimeError: open shm in SHMManager failed. errno: 2"
    assert cause(tmp_path / "none") == ""


# `ray start` that fails the first time as Ray does when a raylet never registers, then works
# like FAKE_RAY; it logs the node manager port of every call.
FLAKY_RAY = """#!/bin/bash
echo "$*" | grep -o -- '--node-manager-port [0-9]*' >> "$FLAKY_LOG"
if [ ! -e "$FLAKY_LOG.failed" ]; then
  touch "$FLAKY_LOG.failed"
  echo "Exception: The current node timed out during startup. This could happen because"
  exit 1
fi
"""


def test_a_node_that_times_out_registering_starts_again_on_fresh_ports(tmp_path, monkeypatch):
    import os
    import sys

    from cluster.stages.ray import RayCluster
    from cluster.state import EnvSection, Ports, Secrets

    env = tmp_path / "env"
    (env / "bin").mkdir(parents=True)
    (env / "bin" / "python").symlink_to(sys.executable)
    ray = env / "bin" / "ray"
    ray.write_text(FLAKY_RAY + FAKE_RAY.split("\n", 1)[1])
    ray.chmod(0o755)
    log = tmp_path / "starts.log"
    monkeypatch.setenv("FLAKY_LOG", str(log))
    token = write_token_file(tmp_path / "ray_token")
    node = Node(index=0, host="127.0.0.2", local=True)
    state = ClusterState(
        name="flaky",
        nodes=[
            NodeState(
                name="head", label="127.0.0.2", host="127.0.0.2", private_ip="127.0.0.2",
                home=str(tmp_path / "home"), devices=1,
            )
        ],
        ports=Ports(ray_gcs=6391, dashboard=8266, api=8001),
        env=EnvSection(dir=str(env)),
        secrets=Secrets(ray_token=str(token)),
    )  # fmt: skip
    out = io.StringIO()
    ctx = UpContext(
        config=UpConfig(local=True),
        cluster=Cluster(nodes=(node,)),
        state=state,
        runners=[LocalRunner(node)],
        reporter=Reporter(Console(file=out, soft_wrap=True)),
    )
    monkeypatch.setattr(RayCluster, "_wait", staticmethod(lambda ctx, timeout: None))
    monkeypatch.setattr("cluster.stages.ray.ray_cli", lambda python: (str(ray),))
    try:
        outcome = RayCluster().run(ctx)
    finally:
        rec = state.ray.node("head")
        if rec.session:
            stop_ray_node(ctx.runners[0], rec.session, temp_dir=str(rec.temp_dir), grace_s=1)
        subprocess.run(["rm", "-rf", str(rec.temp_dir)], check=False)
    starts = log.read_text().split()
    ports = [int(p) for p in starts if p.isdigit()]
    assert len(ports) == 2 and ports[0] != ports[1], starts  # the second try: fresh ports
    assert state.ray.node("head").ports["node_manager"] == ports[1]
    assert outcome.status == "done" and state.ray.node("head").session
    assert "timed out starting (try 1 of 3); starting it again on fresh ports" in out.getvalue()
    assert os.path.exists(f"{log}.failed")


def test_dry_run_plans_the_supervisor_and_no_supervise_plans_plain_ray_start(tmp_path, capsys):
    inv = tmp_path / "ips.txt"
    inv.write_text("root@127.0.0.2:2222\nroot@127.0.0.3:2222\n")
    _state("sup").save()
    common = dict(
        name="sup",
        inventory=inv,
        model="org/model",
        shared_dir=tmp_path / "shared",
        system_root=tmp_path / "root",
        dry_run=True,
    )

    def ray_plan(**kw) -> str:
        up(UpConfig(**common, **kw))
        out = capsys.readouterr().out
        return out[out.index("▸ ray") : out.index("▸ serve")]

    key = cluster_key("sup")
    supervised = ray_plan()
    for node in ("head", "worker1"):
        unit = f"llamacluster-ray-sup-{key}-{node}.service"
        assert f"install-unit --root {tmp_path / 'root'} --name {unit}" in supervised
    assert supervised.count("-m cluster.supervisor run --temp-dir") == 2
    assert "systemctl restart" not in supervised  # a test root runs no service command
    plain = ray_plan(supervise=False)
    assert "cluster.supervisor" not in plain and "install-unit" not in plain
    assert plain.count("setsid --wait") == 2
