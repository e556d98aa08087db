"""Network counters for bench: parsing, arithmetic, and real reads of this host's counters."""

from __future__ import annotations

import json
import math
import socket
import threading
from pathlib import Path

import pytest

from cluster.bench.config import BenchConfig, Endpoint, LoadConfig, WorkloadConfig
from cluster.bench.netcount import (
    Counters,
    NetCounterObserver,
    NetNode,
    counter_delta,
    counters_command,
    kb_per_token,
    net_columns,
    parse_counters,
    parse_proc_net_dev,
    read_counters,
)
from cluster.bench.report import result_csv, result_json, results_table
from cluster.bench.runner import run_benchmark
from cluster.errors import ConfigError
from cluster.inventory import Node
from cluster.runner import LocalRunner
from tests.support.stream_server import StreamServer

PROC_NET_DEV = """\
Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo: 1234567     100    0    0    0     0          0         0  7654321     100    0    0    0     0       0          0
  eth0:99887766 5000    0    0    0     0          0         0 11223344    4000    0    0    0     0       0          0
"""


def test_parse_proc_net_dev() -> None:
    assert parse_proc_net_dev(PROC_NET_DEV, "lo") == Counters(tx=7654321, rx=1234567)
    # No space between the colon and a large first number (older kernels).
    assert parse_proc_net_dev(PROC_NET_DEV, "eth0") == Counters(tx=11223344, rx=99887766)
    with pytest.raises(ValueError, match="wlan0"):
        parse_proc_net_dev(PROC_NET_DEV, "wlan0")


def test_parse_counters_both_forms() -> None:
    assert parse_counters("sys 10 20\n", "eth0") == Counters(tx=10, rx=20)
    assert parse_counters("proc\n" + PROC_NET_DEV, "lo") == Counters(tx=7654321, rx=1234567)
    with pytest.raises(ValueError):
        parse_counters("garbage", "lo")


def test_delta_and_kb_per_token() -> None:
    assert counter_delta(Counters(100, 50), Counters(2100, 1050)) == Counters(2000, 1000)
    with pytest.raises(ValueError, match="backwards"):
        counter_delta(Counters(100, 50), Counters(99, 60))
    assert kb_per_token(5000, 10) == 0.5
    assert math.isnan(kb_per_token(5000, 0))


def test_net_columns_count_a_shared_counter_once() -> None:
    deltas = {"head": Counters(40_000, 20_000), "worker1": Counters(10_000, 30_000)}
    separate = net_columns(
        deltas, host_keys={"head": "a/eth0", "worker1": "b/eth0"}, output_tokens=100
    )
    assert separate["head kB tx/tok"] == 0.4
    assert separate["worker1 kB rx/tok"] == 0.3
    assert separate["net kB tx/tok"] == 0.5
    assert separate["net kB rx/tok"] == 0.5
    # Loopback "nodes" on one host read the same lo counters: the total takes them once.
    same = {"head": Counters(40_000, 40_000), "worker1": Counters(40_000, 40_000)}
    shared = net_columns(same, host_keys={"head": "h/lo", "worker1": "h/lo"}, output_tokens=100)
    assert shared["net kB tx/tok"] == 0.4


def test_interface_name_is_checked() -> None:
    with pytest.raises(ConfigError, match="interface"):
        counters_command("eth0; rm -rf /")


def _loopback_nodes() -> list[NetNode]:
    return [
        NetNode(name=name, runner=LocalRunner(Node(index=i, host=host, local=True)),
                interface="lo", host_key="this-host/lo")
        for i, (name, host) in enumerate((("head", "127.0.0.1"), ("worker1", "127.0.0.2")))
    ]  # fmt: skip


def _send_over_loopback(nbytes: int) -> None:
    server = socket.create_server(("127.0.0.1", 0))
    got = bytearray()

    def sink() -> None:
        conn, _ = server.accept()
        with conn:
            while chunk := conn.recv(1 << 16):
                got.extend(chunk)

    thread = threading.Thread(target=sink)
    thread.start()
    with socket.create_connection(server.getsockname()) as client:
        client.sendall(b"x" * nbytes)
    thread.join(10)
    server.close()
    assert len(got) == nbytes


def test_real_lo_counters_see_traffic() -> None:
    nodes = _loopback_nodes()
    before = read_counters(nodes)
    _send_over_loopback(3_000_000)
    after = read_counters(nodes)
    for name in ("head", "worker1"):
        d = counter_delta(before[name], after[name])
        assert d.tx >= 3_000_000 and d.rx >= 3_000_000


def test_bench_reports_net_columns_in_table_json_csv(stream_server: StreamServer) -> None:
    config = BenchConfig(
        endpoints=[Endpoint(name="main", base_url=stream_server.base_url, api_key="k")],
        workload=WorkloadConfig(input_len=8, output_len=16),
        load=LoadConfig(num_requests=4, warmup_requests=1),
    )
    observer = NetCounterObserver(_loopback_nodes(), endpoint="main")
    result = run_benchmark(config, observers=[observer])
    point = result.points[0]
    # The bench's own HTTP traffic runs over lo here: every token costs bytes.
    assert point.output_tokens == 64
    assert point.extra["head kB tx/tok"] > 0
    assert point.extra["net kB rx/tok"] == point.extra["head kB rx/tok"]
    assert json.loads(result_json(result))["points"][0]["extra"]["net kB tx/tok"] > 0
    header = result_csv(result).splitlines()[0].split(",")
    assert "worker1 kB rx/tok" in header and "net kB tx/tok" in header
    assert "net kB tx/tok" in [c.header for c in results_table(result).columns]


def test_bench_cli_on_a_recorded_cluster(
    stream_server: StreamServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    from cluster.cli.app import main
    from cluster.state import Access, ClusterState, NodeState, Secrets, ServerSection

    monkeypatch.setenv("LLAMACLUSTER_HOME", str(tmp_path / "home"))
    key = tmp_path / "api_key"
    key.write_text("secret-key-123\n")
    key.chmod(0o600)
    ClusterState(
        name="t", access=Access(local=True), secrets=Secrets(api_key_file=str(key)),
        server=ServerSection(
            endpoint=stream_server.base_url.removesuffix("/v1"), served_name="tiny-test"
        ),
        nodes=[NodeState(name="head", label="127.0.0.1", host="127.0.0.1", interface="lo")],
    ).save()  # fmt: skip
    out = tmp_path / "out"
    argv = ["bench", "--name", "t", "-n", "4", "--input-len", "8", "--output-len", "8"]
    assert main([*argv, "--no-plots", "--no-progress", "-o", str(out)]) == 0
    assert "net kB tx/tok" in (out / "bench.csv").read_text().splitlines()[0]
    extra = json.loads((out / "bench.json").read_text())["points"][0]["extra"]
    assert extra["head kB rx/tok"] > 0
    assert stream_server.received[-1]["model"] == "tiny-test"
    # Without a cluster there are no nodes to read.
    assert main(["bench", "--base-url", stream_server.base_url, "--net-counters"]) == 3
    assert "needs the cluster" in capsys.readouterr().err


def test_recorded_nodes_share_a_counter_only_within_one_network_namespace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cluster.bench.netcount import cluster_net_nodes
    from cluster.state import Access, ClusterState, NodeState

    monkeypatch.setenv("LLAMACLUSTER_HOME", str(tmp_path / "home"))

    def node(name: str, host: str, iface: str, ns: str | None) -> NodeState:
        return NodeState(
            name=name, label=host, host=host, interface=iface, machine_id="m1", net_namespace=ns
        )

    hosts = ["127.0.0.2", "127.0.0.3", "198.18.1.3", "198.18.1.4"]
    ClusterState(
        name="ns",
        access=Access(inventory_text="\n".join(hosts) + "\n"),
        nodes=[
            node("head", "127.0.0.2", "lo", "net:[1]"),
            node("worker1", "127.0.0.3", "lo", "net:[1]"),  # same host, same namespace
            node("worker2", "198.18.1.3", "eth0", "net:[2]"),  # same host, own namespace
            node("worker3", "198.18.1.4", "eth0", "net:[3]"),
        ],
    ).save()
    keys = [n.host_key for n in cluster_net_nodes("ns")]
    assert keys[0] == keys[1] and len(set(keys)) == 3
