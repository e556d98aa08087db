"""Replicas in status, logs, preflight and down: the per-replica lines, the probes behind them,
the ports several replicas need, and the removal of an app's HAProxy files."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Gauge, generate_latest

from cluster.errors import ConfigError, RemoteError
from cluster.stages.preflight import (
    FREE_PORT_BLOCK_TEMPLATE,
    FREE_PORTS_TEMPLATE,
    PORTS_TAKEN_TEMPLATE,
    PRIVATE_PORT_RANGE,
    replica_port_span,
    replica_side_ports,
)
from cluster.stages.serve import balancer_dir_removal, replica_logs_command
from serve.balancer import (
    placement_nodes,
    private_dir_path,
    probe_replica,
    replica_lines,
    requests_running,
)
from serve.config import load_config
from tests.support.metrics_server import metrics_server


def _vllm_metrics(running: dict[str, float]) -> str:
    """A /metrics page with vLLM's gauge, one series per engine (prometheus_client writes it)."""
    registry = CollectorRegistry()
    gauge = Gauge(
        "vllm:num_requests_running",
        "Number of requests in model execution batches.",
        ["model_name", "engine"],
        registry=registry,
    )
    for engine, value in running.items():
        gauge.labels(model_name="demo", engine=engine).set(value)
    return generate_latest(registry).decode()


def test_status_line_per_replica():
    rows = [
        {
            "replica_id": "a",
            "state": "RUNNING",
            "node_ip": "10.0.0.1",
            "pid": 41,
            "port": 8010,
            "nodes": ["10.0.0.1", "10.0.0.2"],
            "running": 3.0,
            "restarts": 2,
            "last_restart": "stall: recovered",
        },
        {"replica_id": "b", "state": "STARTING", "node_ip": "10.0.0.2"},
        {"replica_id": "c", "state": "RUNNING", "node_ip": "10.0.0.2", "pid": 7, "port": 8011,
         "nodes": ["10.0.0.2"], "running": 0.0, "restarts": 0},
    ]  # fmt: skip
    assert replica_lines(rows) == [
        "replica 1 on 10.0.0.1,10.0.0.2 (pid 41): RUNNING, port 8010, 3 request(s) running, "
        "2 restart(s) (last stall: recovered)",
        "replica 2 on 10.0.0.2: STARTING",
        "replica 3 on 10.0.0.2 (pid 7): RUNNING, port 8011, 0 request(s) running, 0 restart(s)",
    ]


def test_running_requests_summed_from_vllms_gauge():
    assert requests_running(_vllm_metrics({"0": 2, "1": 3})) == 5
    assert requests_running(_vllm_metrics({"0": 0})) == 0
    assert requests_running("# nothing here\n") is None


def test_placement_group_nodes_by_address():
    group = {"name": "SERVE_REPLICA::x", "bundles_to_node_id": {0: "n1", 1: "n2", 2: "n1"}}
    ips = {"n1": "10.0.0.1", "n2": "10.0.0.2"}
    assert placement_nodes(group, ips) == ["10.0.0.1", "10.0.0.2"]
    assert placement_nodes(None, ips) == []
    assert placement_nodes({"bundles_to_node_id": {0: "gone"}}, ips) == ["gone"]


def test_probe_reads_running_requests_only_with_the_key():
    key = "sk-probe-0123456789"
    with metrics_server(_vllm_metrics({"0": 4}), token=key) as server:
        with_key = probe_replica(server.host, server.port, key)
        wrong = probe_replica(server.host, server.port, "sk-wrong-0123456789")
        without = probe_replica(server.host, server.port, None)
    assert with_key["running"] == 4
    assert wrong["running"] is None and without["running"] is None
    # This stand-in has no /health: the restart count stays unknown rather than 0.
    assert with_key["restarts"] is None
    # /health then /metrics with each key; without one, /health only (no request for metrics).
    wrong_auth = "Bearer sk-wrong-0123456789"
    assert [auth for auth, _ in server.seen] == [f"Bearer {key}"] * 2 + [wrong_auth] * 2 + [None]


def test_replica_side_ports_follow_the_servers_rules():
    ports = replica_side_ports(9000, 9002, 2)
    assert ports == {
        "HAProxy statistics": [9003],
        "HAProxy metrics": [9004],
        "replicas": list(range(9010, 9016)),
    }
    with pytest.raises(ConfigError, match="ports overlap or pass 65535"):
        replica_side_ports(65530, 65532, 4)


def test_an_api_port_asked_as_0_leaves_room_for_the_replicas_above_it():
    from cluster.state import NodeState

    nodes = [NodeState(name="head", label="h", host="h", devices=2)]
    # Two replicas: HAProxy's api+3, api+4 and 2 x 2 + 2 replica ports from api+10.
    assert replica_port_span(2, nodes) == 15
    assert replica_port_span("auto", nodes) == 15  # the slots hold two at most
    assert replica_port_span(1, nodes) == 0
    assert replica_port_span("auto", [nodes[0].model_copy(update={"devices": 1})]) == 0
    # The real script on this machine: a port whose next 15 are free and clear of another
    # port already chosen.
    holder = socket.socket()
    holder.bind(("", 0))
    avoid = holder.getsockname()[1]
    try:
        done = subprocess.run(
            FREE_PORT_BLOCK_TEMPLATE.format(span=15, avoid=avoid),
            shell=True,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        base = int(done.stdout)
        assert not base <= avoid <= base + 15
        taken = subprocess.run(
            PORTS_TAKEN_TEMPLATE.format(ports=" ".join(str(base + i) for i in range(16))),
            shell=True,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        assert taken.stdout.strip() == ""
    finally:
        holder.close()


def _private_range_free() -> bool:
    """This machine's ephemeral range stays clear of the range ports asked as 0 come from."""
    low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    return high < PRIVATE_PORT_RANGE[0] or low >= PRIVATE_PORT_RANGE[1]


def test_ports_asked_as_0_come_from_outside_the_ephemeral_range():
    """No outgoing connection can take a chosen port before its stage binds it: the real
    scripts pick distinct, free ports in the private range (the kernel's, where its ephemeral
    range reaches into that one)."""
    singles = subprocess.run(
        FREE_PORTS_TEMPLATE.format(count=6), shell=True, capture_output=True, text=True,
        timeout=60, check=True,
    ).stdout.split()  # fmt: skip
    block = subprocess.run(
        FREE_PORT_BLOCK_TEMPLATE.format(span=40, avoid=",".join(singles)), shell=True,
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    ports = [int(p) for p in singles]
    assert len(set(ports)) == 6 and not any(_taken(p) for p in ports)
    base = int(block)
    assert not set(ports) & set(range(base, base + 41))
    if not _private_range_free():
        pytest.skip("this machine's ephemeral range reaches into the private range")
    low, high = PRIVATE_PORT_RANGE
    assert all(low <= p < high for p in ports) and low <= base and base + 40 < high


def test_taken_ports_are_named():
    holder = socket.socket()
    holder.bind(("", 0))
    holder.listen()
    taken = holder.getsockname()[1]
    free = socket.socket()
    free.bind(("", 0))
    free_port = free.getsockname()[1]
    free.close()
    try:
        out = subprocess.run(
            PORTS_TAKEN_TEMPLATE.format(ports=f"{taken} {free_port}"),
            shell=True,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    finally:
        holder.close()
    assert out.split() == [str(taken)]


def _run(command: str) -> None:
    subprocess.run(["bash", "-c", command], check=True, timeout=30)


def test_down_removes_only_that_apps_haproxy_files(tmp_path):
    uid = os.getuid()
    assert private_dir_path("app", 8000, uid=uid).parent == Path(f"/tmp/lchap-{uid}")
    command = balancer_dir_removal("app", 8000)
    assert command.startswith('d="/tmp/lchap-$(id -u)"; ')
    # The same line against a parent of the test's own (the shared /tmp one may hold others').
    base = tmp_path / "lchap"
    ours = base / private_dir_path("app", 8000).name
    other = base / private_dir_path("app", 8001).name
    for folder in (ours, other):
        folder.mkdir(parents=True)
        (folder / "admin.sock").write_text("")
    local = command.replace('"/tmp/lchap-$(id -u)"', str(base))
    _run(local)
    assert not ours.exists() and other.is_dir()  # only that app's, the parent kept
    _run(balancer_dir_removal("app", 8001).replace('"/tmp/lchap-$(id -u)"', str(base)))
    assert not base.exists()  # empty: removed too
    # A link in the parent's place is left alone, and so is what it points to.
    target = tmp_path / "elsewhere"
    (target / ours.name).mkdir(parents=True)
    base.symlink_to(target)
    _run(local)
    assert (target / ours.name).is_dir()


def test_replica_log_command_reads_serves_file_and_the_process_output():
    # Serve's path is relative to the node's logs directory, with a leading "/".
    command = replica_logs_command(
        "/tmp/lc-x", "/serve/replica_llamacluster_abc.log", 123, follow=True, lines=50
    )
    assert "cd /tmp/lc-x/session_latest/logs" in command
    assert "serve/replica_llamacluster_abc.log $(ls worker-*-123.out worker-*-123.err" in command
    assert 'tail -n 50 -F "$@"' in command
    for bad in ("/../x.log", "serve/../../x.log", "", "/"):
        with pytest.raises(RemoteError, match="unexpected log path"):
            replica_logs_command("/tmp/lc-x", bad, 1, follow=False, lines=1)


@pytest.mark.engine
@pytest.mark.timeout(900)
def test_replica_table_asks_each_replica(api_server, ray_cluster_1node, tmp_path):
    """The real verb on the shared server: its replica with node, port, requests and restarts."""
    from tests.support.server import _cluster_address_and_env

    address, env = _cluster_address_and_env(ray_cluster_1node)
    key_file = tmp_path / "keys"
    key_file.write_text(api_server.api_key + "\n")
    key_file.chmod(0o600)
    request = {
        "ray_address": address,
        "app_name": api_server.app_name,
        "api_key_file": str(key_file),
    }
    done = subprocess.run(
        [sys.executable, "-m", "serve.balancer", "replicas"],
        input=json.dumps(request),
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    (row,) = json.loads(done.stdout.strip().splitlines()[-1])["replicas"]
    port = int(api_server.url.rsplit(":", 1)[1])
    assert row["state"] == "RUNNING" and row["port"] == port, row
    assert row["nodes"] == [row["node_ip"]] and row["log_file_path"], row
    assert row["running"] == 0 and isinstance(row["restarts"], int), row
    (line,) = replica_lines([row])
    assert line.startswith(f"replica 1 on {row['node_ip']} (pid {row['pid']}): RUNNING, port ")
    # `logs --replica 1`'s command on that node reads Serve's file and the process's output.
    temp_dir = ray_cluster_1node.spec.temp_dir
    command = replica_logs_command(
        temp_dir, row["log_file_path"], row["pid"], follow=False, lines=5
    )
    logs = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=30)
    assert logs.returncode == 0, logs.stderr
    assert f"==> {row['log_file_path'].lstrip('/')} <==" in logs.stdout, logs.stdout
    assert re.search(rf"==> worker-\S+-{row['pid']}\.(out|err) <==", logs.stdout), logs.stdout


# A small Llama (about 0.2 GiB of bf16 weights): what a CPU slot holds many times over.
SMALL_LLAMA = {
    "model_type": "llama",
    "num_hidden_layers": 4,
    "hidden_size": 1024,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "intermediate_size": 2816,
    "vocab_size": 32000,
    "max_position_embeddings": 2048,
    "torch_dtype": "bfloat16",
}


def _up_context(tmp_path, *, slots: list[int], mem_gb: list[str | None], kind="cpu", **config):
    import io

    from rich.console import Console

    from cluster.inventory import local_cluster
    from cluster.lifecycle import UpConfig
    from cluster.runner import LocalRunner
    from cluster.stages.base import Reporter, UpContext
    from cluster.state import Access, ClusterState, ModelSection, NodeState

    (tmp_path / "config.json").write_text(json.dumps(SMALL_LLAMA))
    nodes = []
    for i, (devices, mem) in enumerate(zip(slots, mem_gb, strict=True)):
        info = {"memory_mib": "81559"} if kind == "gpu" else {}
        if mem is not None:
            info["mem_total_gb"] = mem
        nodes.append(
            NodeState(
                name=f"n{i}",
                label=f"n{i}",
                host=f"h{i}",
                devices=devices,
                device_kind=kind,
                device_info=info,
            )
        )
    cluster = local_cluster()
    state = ClusterState(
        name="t", access=Access(local=True), model=ModelSection(dir=str(tmp_path)), nodes=nodes
    )
    return UpContext(
        config=UpConfig(local=True, cpu_kvcache_gb=1, **config),
        cluster=cluster,
        state=state,
        runners=[LocalRunner(n) for n in cluster],
        reporter=Reporter(Console(file=io.StringIO(), width=200)),
    )


def test_auto_on_cpu_nodes_counts_the_slots_their_memory_holds(tmp_path):
    from cluster.stages.serve import replica_choice

    # One slot (this kind of machine: one NUMA node): one replica, the direct-ingress path.
    one = replica_choice(_up_context(tmp_path, slots=[1], mem_gb=["23.5"]), 1, 1)
    assert (one.replicas, one.auto) == (1, True)
    # Two slots and 23.5 GiB: each worker needs about 2.3 GiB (1 GiB of it KV cache): two.
    two = replica_choice(_up_context(tmp_path, slots=[2], mem_gb=["23.5"]), 1, 1)
    assert two.replicas == 2, two.why
    # Two slots on a 3 GiB host: the memory holds one worker only.
    small = replica_choice(_up_context(tmp_path, slots=[2], mem_gb=["3.0"]), 1, 1)
    assert small.replicas == 1 and "memory holds 1 of its 2 slots" in small.why
    # Memory not recorded: the slots decide.
    assert replica_choice(_up_context(tmp_path, slots=[2], mem_gb=[None]), 1, 1).replicas == 2
    # tp=2 on 2 nodes of 2 slots: one group per node.
    wide = replica_choice(_up_context(tmp_path, slots=[2, 2], mem_gb=["23.5", "23.5"]), 2, 1)
    assert wide.replicas == 2


def test_an_integer_stays_and_tls_does_not_change_auto(tmp_path):
    from cluster.stages.serve import replica_choice

    given = _up_context(tmp_path, slots=[8], mem_gb=[None], kind="gpu", num_replicas="3")
    assert replica_choice(given, 2, 1).model_dump(include={"replicas", "auto"}) == {
        "replicas": 3,
        "auto": False,
    }
    assert (
        replica_choice(_up_context(tmp_path, slots=[8], mem_gb=[None], kind="gpu"), 2, 1).replicas
        == 4
    )
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    from cluster.tls import self_signed

    self_signed(["127.0.0.1"], cert_path=cert, key_path=key)
    tls = _up_context(tmp_path, slots=[8], mem_gb=[None], kind="gpu", tls_cert=cert, tls_key=key)
    choice = replica_choice(tls, 2, 1)
    # HAProxy terminates TLS and speaks it to every replica: as many as without it.
    assert choice.replicas == 4 and "TLS" not in choice.why
    # Except with prefix routing, whose routing step speaks plain HTTP: one, and it says why.
    prefix = _up_context(
        tmp_path, slots=[8], mem_gb=[None], kind="gpu", tls_cert=cert, tls_key=key, routing="prefix"
    )
    capped = replica_choice(prefix, 2, 1)
    assert capped.replicas == 1 and "1 with TLS and prefix routing" in capped.why
    # Asked for explicitly, refused before anything runs, in one line.
    from cluster.lifecycle import UpConfig

    with pytest.raises(ValueError, match="--routing prefix cannot be combined with TLS"):
        UpConfig(local=True, tls="self-signed", routing="prefix", num_replicas="2")


def test_tls_with_several_replicas_needs_one_home_on_every_node(tmp_path, monkeypatch):
    from cluster.stages.serve import prepare_tls
    from serve.rollout import front_digest

    monkeypatch.setenv("LLAMACLUSTER_HOME", str(tmp_path / "controller"))
    ctx = _up_context(tmp_path, slots=[1, 1], mem_gb=[None, None], tls="self-signed")
    ctx.state.nodes[0].home, ctx.state.nodes[1].home = "/home/a", "/home/b"
    with pytest.raises(ConfigError, match="same home directory on every node") as err:
        prepare_tls(ctx, 2)
    assert "/home/a" in str(err.value) and "\n" not in str(err.value)
    # A new certificate at the same paths restarts HAProxy (not a rolling update).
    config = load_config(model="/m", no_auth=True, device="cpu", num_replicas=2)
    assert front_digest(config, tls_fingerprint="AA") != front_digest(config, tls_fingerprint="BB")
    assert front_digest(config) == front_digest(config, tls_fingerprint=None)


def test_serve_auto_counts_the_free_slots():
    from serve.config import NodeSlots, replicas_for_free_slots

    head = NodeSlots(address="10.0.0.1", device_total=4, device_free=4, is_head=True)
    busy = NodeSlots(address="10.0.0.2", device_total=4, device_free=1, is_head=False)
    assert replicas_for_free_slots([head, busy], tp=2, pp=1) == 2  # the busy node holds no pair
    assert replicas_for_free_slots([head, busy], tp=1, pp=1) == 5
    with pytest.raises(ConfigError, match="needs 8 devices; the cluster has 5"):
        replicas_for_free_slots([head, busy], tp=4, pp=2)


def test_ports_of_the_systems_choosing_move_when_taken_since(tmp_path):
    """An API port asked as 0 with nothing served on it: replica ports taken since it was
    chosen (an outgoing connection's, say) move it to a free block instead of failing `up`."""
    from cluster.stages.preflight import check_replica_ports
    from cluster.state import Ports

    holder = socket.socket()
    holder.bind(("", 0))
    holder.listen()
    api = holder.getsockname()[1] - 11  # the second replica port is taken
    ctx = _up_context(tmp_path, slots=[2], mem_gb=[None], api_port=0)
    ctx.state.ports = Ports(ray_gcs=1, dashboard=2, api=api, serve_proxy=api + 2)
    try:
        # The serve stage does not own the ports: it refuses in one line and changes nothing
        # (a second `up` runs preflight, which moves them).
        before = ctx.state.ports
        with pytest.raises(ConfigError, match=rf"{api + 11} \(replicas\)") as refused:
            check_replica_ports(ctx, 2, may_move=False)
        assert ctx.state.ports == before
        assert refused.value.hint.startswith("rerun `llamacluster up`")
        check_replica_ports(ctx, 2)
        moved = ctx.state.ports.api
        assert PRIVATE_PORT_RANGE[0] <= moved < PRIVATE_PORT_RANGE[1] or not _private_range_free()
        assert moved != api and ctx.state.ports.serve_proxy == api + 2
        assert not any(_taken(moved + d) for d in (3, 4, *range(10, 16)))
        # Asked for explicitly, the same port is refused in one line instead.
        fixed = _up_context(tmp_path, slots=[2], mem_gb=[None], api_port=api)
        fixed.state.ports = Ports(ray_gcs=1, dashboard=2, api=api, serve_proxy=api + 2)
        with pytest.raises(ConfigError, match=rf"{api + 11} \(replicas\)"):
            check_replica_ports(fixed, 2)
    finally:
        holder.close()


def test_taken_replica_ports_refused_on_the_head_with_what_needs_them(tmp_path):
    from cluster.stages.preflight import check_replica_ports
    from cluster.state import Ports

    # An API port whose neighbours are free now; then one of HAProxy's and a replica's taken.
    for _ in range(20):
        with socket.socket() as probe:
            probe.bind(("", 0))
            api = probe.getsockname()[1]
        if api + 20 < 65535 and not any(_taken(api + d) for d in (3, 4, *range(10, 20))):
            break
    ctx = _up_context(tmp_path, slots=[2], mem_gb=[None])
    ctx.state.ports = Ports(ray_gcs=1, dashboard=2, api=api, serve_proxy=api + 2)
    check_replica_ports(ctx, 2)  # all free
    check_replica_ports(ctx, 1)  # one replica needs none of them
    holders = [socket.socket(), socket.socket()]
    try:
        for holder, port in zip(holders, (api + 3, api + 11), strict=True):
            holder.bind(("", port))
            holder.listen()
        with pytest.raises(ConfigError) as info:
            check_replica_ports(ctx, 2)
    finally:
        for holder in holders:
            holder.close()
    assert info.value.message.endswith(
        f"in use on the head {ctx.head.label}: {api + 3} (HAProxy statistics), {api + 11} "
        "(replicas)"
    )
    assert info.value.hint and "--api-port" in info.value.hint

    # A running two-replica server holds its own ports (api+3, api+4, api+10..api+15): going to
    # four replicas asks only the ports it does not hold yet (api+16..api+19).
    ctx.state.server.config_digest, ctx.state.server.replicas = "x", 2
    holders = [socket.socket(), socket.socket()]
    try:
        for holder, port in zip(holders, (api + 3, api + 11), strict=True):
            holder.bind(("", port))
            holder.listen()
        check_replica_ports(ctx, 2)  # the same count: nothing new to ask
        check_replica_ports(ctx, 4)
        extra = socket.socket()
        try:
            extra.bind(("", api + 17))
            extra.listen()
            with pytest.raises(ConfigError, match=rf"{api + 17} \(replicas\)"):
                check_replica_ports(ctx, 4)
        finally:
            extra.close()
    finally:
        for holder in holders:
            holder.close()


def _taken(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("", port))
        except OSError:
            return True
    return False


def test_status_engine_line_says_restarting_with_attempt_cause_and_history():
    from cluster.stages.serve import engine_line

    since = "2026-11-30T03:50:12+00:00"
    restarting = {
        "status": "restarting",
        "engine": {"state": "restarting", "since": since, "cause": "stall", "attempt": 2},
        "restarts": [
            {"cause": "engine_dead", "time": "2026-11-30T03:40:00+00:00", "outcome": "recovered"},
            {"cause": "stall", "time": since, "outcome": "restarting"},
        ],
    }
    restarting["engine"]["max_attempts"] = 5
    assert engine_line(restarting) == (
        f"restarting (attempt 2 of 5, cause stall, since {since}); 2 restart(s), last: "
        f"2026-11-30T03:40:00+00:00 engine_dead: recovered; {since} stall: restarting"
    )
    # Healthy again: the state word, and only the last three restarts of a longer history.
    history = [{"cause": "stall", "time": f"t{i}", "outcome": "recovered"} for i in range(5)]
    line = engine_line({"status": "ok", "engine": {"state": "serving"}, "restarts": history})
    assert (
        line
        == "ok; 5 restart(s), last: t2 stall: recovered; t3 stall: recovered; t4 stall: recovered"
    )
    assert engine_line({}) == "?"
