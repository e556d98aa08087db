"""Ray start/stop commands, session-exact teardown, and real loopback Ray clusters."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import pytest

from cluster.errors import ConfigError, NotReadyError, RemoteError
from cluster.inventory import Node
from cluster.ray_nodes import (
    HEAD_RESOURCE,
    RayClusterSpec,
    RayHeadPorts,
    RayNodeHandle,
    RayNodePorts,
    RayNodeSpec,
    allocate_ports,
    ray_node_env,
    ray_start_head_argv,
    ray_start_worker_argv,
    start_ray_node,
    stop_ray_node,
    wait_for_nodes,
)
from cluster.runner import LocalRunner
from tests.support.ray_cluster import start_ray_cluster, stop_ray_cluster, write_token_file


def _session_members(sid: int) -> list[str]:
    """Live (non-zombie) processes of session ``sid`` as 'pid comm'."""
    out = subprocess.run(
        ["ps", "-eo", "pid=,sid=,stat=,comm="], capture_output=True, text=True, check=True
    ).stdout
    rows = [line.split(None, 3) for line in out.splitlines()]
    return [f"{r[0]} {r[3]}" for r in rows if int(r[1]) == sid and not r[2].startswith("Z")]


def _spec(tmp: str = "/tmp/lcr-test", **kw) -> RayClusterSpec:
    ports = RayNodePorts(
        node_manager=41001,
        object_manager=41002,
        metrics_export=41003,
        dashboard_agent_listen=41004,
        dashboard_agent_grpc=41005,
        runtime_env_agent=41006,
        min_worker=21000,
        max_worker=21063,
    )
    defaults = {
        "name": "t",
        "temp_dir": tmp,
        "token_path": f"{tmp}/token",
        "head_ports": RayHeadPorts(gcs=40001, dashboard=40002, client_server=40003),
        "nodes": (
            RayNodeSpec(ip="10.0.0.1", num_gpus=8, num_cpus=32, ports=ports),
            RayNodeSpec(ip="10.0.0.2", num_gpus=4, resources={"fast_disk": 1}, ports=ports),
        ),
        "env": {"GLOO_SOCKET_IFNAME": "eth1", "VLLM_HOST_IP": "10.0.0.1"},
    }
    return RayClusterSpec(**{**defaults, **kw})


def _flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_head_command_pins_every_port_and_binds_dashboard_locally():
    argv = ray_start_head_argv(_spec())
    assert argv[:3] == ["ray", "start", "--head"]
    expected = {
        "--port": "40001",
        "--dashboard-host": "127.0.0.1",
        "--dashboard-port": "40002",
        "--ray-client-server-port": "40003",
        "--node-ip-address": "10.0.0.1",
        "--num-gpus": "8",
        "--num-cpus": "32",
        "--temp-dir": "/tmp/lcr-test",
        "--node-manager-port": "41001",
        "--object-manager-port": "41002",
        "--metrics-export-port": "41003",
        "--dashboard-agent-listen-port": "41004",
        "--dashboard-agent-grpc-port": "41005",
        "--runtime-env-agent-port": "41006",
        "--min-worker-port": "21000",
        "--max-worker-port": "21063",
    }
    assert {k: _flag(argv, k) for k in expected} == expected
    assert json.loads(_flag(argv, "--resources")) == {HEAD_RESOURCE: 1}
    assert "--disable-usage-stats" in argv


def test_worker_command_joins_the_head_without_head_resource():
    spec = _spec()
    argv = ray_start_worker_argv(spec, spec.nodes[1])
    assert "--head" not in argv and _flag(argv, "--address") == "10.0.0.1:40001"
    assert _flag(argv, "--node-ip-address") == "10.0.0.2" and _flag(argv, "--num-gpus") == "4"
    assert "--num-cpus" not in argv  # not given: Ray counts the cores itself
    assert json.loads(_flag(argv, "--resources")) == {"fast_disk": 1}
    assert "--dashboard-port" not in argv and "--ray-client-server-port" not in argv


def test_unset_ports_leave_ray_defaults_and_env_carries_auth_and_passthrough():
    spec = _spec(nodes=(RayNodeSpec(ip="10.0.0.1", num_gpus=1),))
    argv = ray_start_head_argv(spec)
    assert "--node-manager-port" not in argv and "--min-worker-port" not in argv
    env = ray_node_env(spec)
    assert env["RAY_AUTH_MODE"] == "token"
    assert env["RAY_AUTH_TOKEN_PATH"] == "/tmp/lcr-test/token"
    assert env["RAY_SERVE_ENABLE_DIRECT_INGRESS"] == "1"
    assert env["GLOO_SOCKET_IFNAME"] == "eth1" and env["VLLM_HOST_IP"] == "10.0.0.1"
    assert spec.address == "10.0.0.1:40001"


def test_long_temp_dir_is_refused():
    with pytest.raises(ConfigError, match="65 characters") as info:
        _spec(tmp="/tmp/" + "x" * 60)
    assert "unix socket" in info.value.hint


def test_handle_round_trips_through_state():
    handle = RayNodeHandle(node="10.0.0.2", ip="10.0.0.2", session_id=4321)
    assert RayNodeHandle.from_dict(json.loads(json.dumps(handle.to_dict()))) == handle


def test_allocated_ports_are_distinct_and_free():
    head, nodes = allocate_ports(LocalRunner(), nodes=3, python=sys.executable)
    singles = [head.gcs, head.dashboard, head.client_server]
    ranges = []
    for p in nodes:
        singles += [
            p.node_manager,
            p.object_manager,
            p.metrics_export,
            p.dashboard_agent_listen,
            p.dashboard_agent_grpc,
            p.runtime_env_agent,
        ]
        ranges.append(set(range(p.min_worker, p.max_worker + 1)))
    assert len(set(singles)) == len(singles) == 21
    for i, r in enumerate(ranges):
        assert len(r) == 64 and not r & set(singles)
        assert all(not r & other for other in ranges[i + 1 :])
    with socket.socket() as s:
        s.bind(("127.0.0.1", head.gcs))  # released again for Ray to take


FAKE_RAY = """#!/bin/bash
# Stands in for `ray start`: leaves daemons behind in its session and exits, like Ray does. Like
# Ray's daemons, they name the cluster's temp dir on their command line.
echo "fake ray $*"
echo "auth=$RAY_AUTH_MODE token=$RAY_AUTH_TOKEN_PATH ingress=$RAY_SERVE_ENABLE_DIRECT_INGRESS"
temp=$(printf '%s\\n' "$@" | grep -A1 -x -- --temp-dir | tail -n 1)
bash -c "exec -a 'fake-raylet --temp-dir=$temp' sleep 300" </dev/null >/dev/null 2>&1 &
[ "$FAKE_RAY_FAIL" = 1 ] && { echo "raylet failed" >&2; exit 1; }
# A daemon that ignores TERM, so the stop has to escalate to KILL.
bash -c "trap '' TERM; exec -a 'fake-gcs --temp-dir=$temp' sleep 301" </dev/null >/dev/null 2>&1 &
exit 0
"""


def _fake_spec(tmp_path: Path, nodes: int = 2) -> RayClusterSpec:
    ray = tmp_path / "ray"
    ray.write_text(FAKE_RAY)
    ray.chmod(0o755)
    temp = tmp_path / "t"
    return RayClusterSpec(
        name="fake",
        temp_dir=tempfile.mkdtemp(prefix="lcf-", dir="/tmp"),
        token_path=str(write_token_file(temp / "token")),
        nodes=tuple(RayNodeSpec(ip=f"127.0.0.{i + 1}", num_gpus=1) for i in range(nodes)),
        ray_bin=str(ray),
    )


@pytest.mark.timeout(60)
def test_stop_ends_exactly_the_nodes_session(tmp_path):
    spec = _fake_spec(tmp_path)
    runners = [LocalRunner(Node(index=i, host=n.ip, local=True)) for i, n in enumerate(spec.nodes)]
    bystander = subprocess.Popen(["sleep", "303"], start_new_session=True)
    try:
        handles = start_ray_cluster(runners, spec)
        assert [h.head for h in handles] == [True, False]
        sids = [h.session_id for h in handles]
        assert len(set(sids)) == 2
        for sid in sids:
            assert len(_session_members(sid)) == 2, _session_members(sid)  # both daemons
        head_log = Path(spec.temp_dir) / "llamacluster-start-127.0.0.1.log"
        assert f"token={spec.token_path} ingress=1" in head_log.read_text()
        assert (Path(spec.temp_dir) / "llamacluster-127.0.0.1.sid").read_text().strip() == str(
            sids[0]
        )

        result = stop_ray_node(runners[1], handles[1], grace_s=1)
        assert result.ok, result.stderr
        assert "killing what ignored TERM" in result.stderr
        assert _session_members(sids[1]) == []
        assert len(_session_members(sids[0])) == 2  # the other node is untouched
        assert stop_ray_node(runners[1], handles[1]).ok  # again: nothing left, still fine
        assert stop_ray_node(runners[0], handles[0], grace_s=1).ok
        assert _session_members(sids[0]) == []
        assert bystander.poll() is None, "an unrelated process was stopped"
    finally:
        bystander.kill()
        bystander.wait()
        subprocess.run(["rm", "-rf", spec.temp_dir], check=False)


@pytest.mark.timeout(60)
def test_failed_start_leaves_nothing_behind(tmp_path):
    spec = _fake_spec(tmp_path, nodes=1)
    runner = LocalRunner()
    try:
        with pytest.raises(RemoteError, match="raylet failed"):
            start_ray_node(runner, replace(spec, env={"FAKE_RAY_FAIL": "1"}), 0)
        sid = int((Path(spec.temp_dir) / "llamacluster-127.0.0.1.sid").read_text())
        assert _session_members(sid) == []
        # A missing token file stops the start before Ray runs (Ray itself would abort oddly).
        Path(spec.token_path).unlink()
        with pytest.raises(RemoteError, match="missing or empty"):
            start_ray_node(runner, spec, 0)
    finally:
        subprocess.run(["rm", "-rf", spec.temp_dir], check=False)


# ---- real Ray ------------------------------------------------------------------------------


def _ray_client(cluster, env: dict[str, str], code: str, timeout: float = 90):
    return LocalRunner().run(
        [sys.executable, "-c", code, cluster.address], env=env, timeout=timeout
    )


# Each live node's resources, and the niceness of a task's process on each (Ray's workers host
# the server's processes).
_LIST_NODES = """
import json, os, sys, ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
ray.init(address=sys.argv[1], log_to_driver=False, logging_level="ERROR")
alive = [n for n in ray.nodes() if n["Alive"]]
niceness = ray.remote(num_cpus=0)(lambda: os.getpriority(os.PRIO_PROCESS, 0))
on = [NodeAffinitySchedulingStrategy(n["NodeID"], soft=False) for n in alive]
nice = ray.get([niceness.options(scheduling_strategy=s).remote() for s in on])
print(json.dumps({"resources": [n["Resources"] for n in alive], "niceness": nice}))
"""


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_two_node_loopback_cluster(make_ray_cluster):
    cluster = make_ray_cluster(nodes=2, slots_per_node=2)
    assert cluster.hosts == ["127.0.0.1", "127.0.0.2"]
    assert stat.S_IMODE(cluster.token_path.stat().st_mode) == 0o600
    assert len(str(cluster.temp_dir)) <= 20

    # Both nodes with their slots, the head resource on the head only (as a client sees it).
    res = _ray_client(cluster, cluster.env, _LIST_NODES)
    assert res.ok, res.tail(20)
    listed = json.loads(res.stdout.strip().splitlines()[-1])
    resources = listed["resources"]
    assert len(resources) == 2 and all(r["GPU"] == 2 for r in resources)
    assert sorted(r.get(HEAD_RESOURCE, 0) for r in resources) == [0, 1]
    assert {f"node:{ip}" for ip in cluster.node_ips} <= {k for r in resources for k in r}

    # Workers run at the priority the nodes were started with, not Ray's default nice 15: they
    # are the server's processes (replica, engine core, engine workers).
    own = os.getpriority(os.PRIO_PROCESS, 0)
    assert listed["niceness"] == [own, own], res.tail(5)

    # Token auth is really on: no token, or a wrong one, is refused.
    # (Each refused client retries for about 20 s before it gives up: run both at once.)
    no_token = {"RAY_AUTH_MODE": "disabled", "RAY_ADDRESS": cluster.address}
    wrong_token = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64}
    with ThreadPoolExecutor(2) as pool:
        refused = list(
            pool.map(
                lambda env: _ray_client(cluster, env, _LIST_NODES, timeout=90),
                [no_token, wrong_token],
            )
        )
    for res in refused:
        assert not res.ok and "auth" in (res.stdout + res.stderr).lower(), res.tail(5)
        assert "GPU" not in res.stdout

    # The dashboard listens on 127.0.0.1 only, and wants the token.
    port = cluster.spec.head_ports.dashboard
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(f"{cluster.dashboard_url}/nodes?view=summary", timeout=10)
    assert info.value.code in (401, 403)
    req = urllib.request.Request(
        f"{cluster.dashboard_url}/nodes?view=summary",
        headers={"Authorization": f"Bearer {cluster.token}"},
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        assert resp.status == 200
    head_ip = cluster.node_ips[0]
    other = head_ip if head_ip != "127.0.0.1" else "127.0.0.2"
    with pytest.raises(OSError):
        socket.create_connection((other, port), timeout=3).close()

    # Teardown stops every process of the cluster's sessions and nothing else.
    bystander = subprocess.Popen(["sleep", "304"], start_new_session=True)
    try:
        sids = cluster.session_ids
        assert all(_session_members(sid) for sid in sids)
        cluster.stop()
        for sid in sids:
            assert _session_members(sid) == [], _session_members(sid)
        assert bystander.poll() is None
        assert not cluster.temp_dir.exists()
    finally:
        bystander.kill()
        bystander.wait()


@pytest.mark.e2e
@pytest.mark.timeout(500)
def test_one_node_fixture_and_missing_nodes_are_named(ray_cluster_1node):
    cluster = ray_cluster_1node
    head = cluster.hosts[0]
    states = wait_for_nodes(
        cluster.address, [head], 2, token_path=str(cluster.token_path), python=sys.executable
    )
    assert states[head].gpus == 2 and states[head].resources[HEAD_RESOURCE] == 1
    assert set(cluster.env) == {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS"}
    start = time.monotonic()
    with pytest.raises(NotReadyError) as info:
        wait_for_nodes(
            cluster.address,
            [head, "127.0.0.9"],
            {head: 4, "127.0.0.9": 1},
            token_path=str(cluster.token_path),
            timeout=3,
            python=sys.executable,
        )
    assert "127.0.0.9 has not joined" in info.value.message
    assert f"{head} has 2 of 4 device slots" in info.value.message
    assert time.monotonic() - start < 60


@pytest.mark.e2e
@pytest.mark.timeout(500)
def test_ray_over_ssh_on_loopback_nodes(sshd, tmp_path):
    """The path `up` takes: token pushed with copy_to, Ray started and stopped over SSH."""
    runners = sshd.runners()
    temp_dir = tempfile.mkdtemp(prefix="lcs-", dir="/tmp")
    token = write_token_file(tmp_path / "token")
    remote_token = f"{temp_dir}/auth/token"
    for runner in runners:
        runner.copy_to(token, remote_token, mode=0o600)
    head_ports, node_ports = allocate_ports(runners[0], nodes=2, python=sys.executable)
    spec = RayClusterSpec(
        name="ssh",
        temp_dir=temp_dir,
        token_path=remote_token,
        head_ports=head_ports,
        nodes=tuple(
            RayNodeSpec(ip=r.node.host, num_gpus=1, num_cpus=2, ports=p)
            for r, p in zip(runners, node_ports, strict=True)
        ),
        env={"VLLM_CPU_KVCACHE_SPACE": "1"},
        ray_bin=str(Path(sys.executable).parent / "ray"),
        python=sys.executable,
        object_store_memory=128 * 1024 * 1024,
    )
    handles = []
    try:
        start = time.monotonic()
        handles = start_ray_cluster(runners, spec, retries=3)
        # ray start returned over SSH (no inherited pipe kept the session open) and the
        # daemons outlived the SSH sessions.
        assert time.monotonic() - start < 300
        states = wait_for_nodes(
            spec.address,
            ["127.0.0.2", "127.0.0.3"],
            2,
            token_path=remote_token,
            runner=runners[0],
            python=sys.executable,
            timeout=120,
        )
        assert {ip: s.gpus for ip, s in states.items()} == {"127.0.0.2": 1, "127.0.0.3": 1}
        assert states["127.0.0.2"].resources.get(HEAD_RESOURCE) == 1
    finally:
        sids = [h.session_id for h in handles]
        stop_ray_cluster(runners, handles, grace_s=3)
        subprocess.run(["rm", "-rf", temp_dir], check=False)
    for sid in sids:
        assert _session_members(sid) == []


def _decoy(argv: list[str]) -> subprocess.Popen:
    """A process in a session of its own, as an unrelated daemon after a reboot would be."""
    return subprocess.Popen(argv, start_new_session=True)


def test_a_decoy_in_the_recorded_session_is_neither_alive_nor_killed(tmp_path):
    from cluster.inventory import local_cluster
    from cluster.ray_nodes import session_alive_command

    runner = LocalRunner(local_cluster().head)
    temp = str(tmp_path / "lc-ours")
    decoy = _decoy(["sleep", "60"])  # the recorded session id now belongs to someone else
    ours = _decoy(["bash", "-c", f'exec -a "raylet --temp_dir={temp}" sleep 60'])
    try:
        assert not runner.run(session_alive_command(decoy.pid, temp)).ok
        res = stop_ray_node(runner, decoy.pid, temp_dir=temp, grace_s=1)
        assert res.ok and "left alone" in res.stdout
        assert decoy.poll() is None  # not signalled
        # A session whose process names the cluster's temp dir is ours: alive, and stopped.
        assert runner.run(session_alive_command(ours.pid, temp)).ok
        assert stop_ray_node(runner, ours.pid, temp_dir=temp, grace_s=1).ok
        assert ours.wait(timeout=10) is not None
        assert not runner.run(session_alive_command(ours.pid, temp)).ok
        with pytest.raises(ValueError, match="temp dir"):
            stop_ray_node(runner, decoy.pid)
    finally:
        for p in (decoy, ours):
            if p.poll() is None:
                p.kill()
                p.wait()


def test_a_ray_record_of_another_host_or_boot_is_not_trusted():
    from cluster.state import NodeState, RayNode

    rec = RayNode(session=77, temp_dir="/tmp/lc-x", host="h1", machine_id="m1", boot_id="b1")
    now = NodeState(name="worker1", label="h1", host="h1", machine_id="m1", boot_id="b1")
    assert rec.same_machine(now)
    assert not rec.same_machine(now.model_copy(update={"boot_id": "b2"}))  # rebooted
    assert not rec.same_machine(now.model_copy(update={"host": "h2"}))  # another host
    assert not rec.same_machine(now.model_copy(update={"machine_id": "m2"}))
    assert RayNode(session=77).same_machine(now)  # an old record without them: kept


@pytest.mark.e2e
@pytest.mark.timeout(500)
def test_a_loopback_cluster_that_does_not_register_is_stopped_and_started_again(
    monkeypatch, capsys
):
    """The harness's second attempt: the first cluster's processes and temp dir are gone, the
    raylet logs of the missed attempt are printed, and the second cluster serves."""
    import psutil

    from tests.support import ray_cluster as harness

    seen: list[tuple[str, list[int]]] = []
    real_wait = harness.wait_for_nodes

    def first_never_registers(address, hosts, *args, **kwargs):
        if not seen:
            temp_dir = kwargs["token_path"].rsplit("/", 1)[0]
            members = [
                p.pid for p in psutil.process_iter(["cmdline"])
                if any(temp_dir in part for part in p.info["cmdline"] or [])
            ]  # fmt: skip
            seen.append((temp_dir, members))
            raise NotReadyError(
                f"Ray cluster at {address} not complete: {hosts[-1]} has not joined"
            )
        return real_wait(address, hosts, *args, **kwargs)

    monkeypatch.setattr(harness, "wait_for_nodes", first_never_registers)
    cluster = harness.start_loopback_ray_cluster(nodes=1, slots_per_node=1)
    try:
        ((first_dir, first_pids),) = seen
        assert first_pids and not Path(first_dir).exists()
        assert not [pid for pid in first_pids if psutil.pid_exists(pid)
                    and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]  # fmt: skip
        out = capsys.readouterr().out
        assert "attempt 1" in out and "has not joined" in out and "--- " in out and "raylet" in out
        assert cluster.spec.temp_dir != first_dir
        states = real_wait(
            cluster.address, cluster.hosts, 1, token_path=str(cluster.token_path),
            python=sys.executable,
        )  # fmt: skip
        assert states[cluster.hosts[0]].gpus == 1
    finally:
        cluster.stop()
