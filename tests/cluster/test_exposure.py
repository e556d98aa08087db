"""The exposure probe: real TCP connects to a cluster's recorded ports, and the report's rules."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from cluster.exposure import (
    RAY_HEAD_FIXED_PORTS,
    ProbeTarget,
    closing_rule,
    exposure_targets,
    probe_cluster,
)
from cluster.state import ClusterState, NodeState, Ports, RayNode, RaySection


@contextmanager
def listening(host: str) -> Iterator[int]:
    """A TCP listener on ``host`` at a free port, for the test's duration."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind((host, 0))
        sock.listen(8)
        yield sock.getsockname()[1]
    finally:
        sock.close()


def _state(
    host: str, private_ip: str, *, api: int, dashboard: int, **ray_ports: int
) -> ClusterState:
    node = NodeState(name="head", label=host, host=host, private_ip=private_ip)
    return ClusterState(
        name="exposure-test",
        nodes=[node],
        ports=Ports(ray_gcs=ray_ports.pop("gcs", 0) or 1, dashboard=dashboard, api=api),
        ray=RaySection(nodes={"head": RayNode(ports=dict(ray_ports))}),
    )


def test_an_open_port_is_found_and_one_bound_to_another_address_is_closed() -> None:
    # 127.0.0.1 stands for the node's public address; a port bound to 127.0.0.2 only (another
    # address of the same host, as a private address is) must not answer there.
    with listening("127.0.0.1") as exposed, listening("127.0.0.2") as private:
        state = _state(
            "127.0.0.1", "127.0.0.2", api=exposed, dashboard=private, node_manager=private
        )
        findings, lines = probe_cluster(state, timeout=2.0)
    by_port = {(f.target.name, f.target.port): f.state for f in findings}
    assert by_port[("api", exposed)] == "open"
    assert by_port[("ray dashboard", private)] == "closed"
    assert ("ray node manager", private) not in by_port  # one probe per port
    # Ray's fixed head metrics ports (44217, 44227) are probed too; on a shared test host
    # another cluster's head may hold them, so only the ports made here are counted.
    fixed = {f":{port} " for port, _ in RAY_HEAD_FIXED_PORTS}
    open_lines = [
        ln for ln in lines if ln.lstrip().startswith("OPEN") and not any(p in ln for p in fixed)
    ]
    assert len(open_lines) == 1
    assert f"127.0.0.1:{exposed} (api)" in open_lines[0]
    assert "bind it to the private address" in open_lines[0] and "127.0.0.2" in open_lines[0]
    assert "(Ray binds it to every interface)" not in open_lines[0]
    assert lines[0].startswith("exposure: ")


def test_targets_cover_head_and_node_ports_at_the_public_address() -> None:
    state = _state(
        "203.0.113.5", "10.0.0.5", api=8000, dashboard=8265, gcs=6379, object_manager=8076
    )
    state.ports.monitor = 9090
    state.ports.serve_proxy = 8002
    targets = {(t.host, t.port, t.kind) for t in exposure_targets(state)}
    assert targets == {
        ("203.0.113.5", 6379, "ray"),
        ("203.0.113.5", 8265, "loopback"),
        ("203.0.113.5", 9090, "loopback"),
        ("203.0.113.5", 8000, "api"),
        ("203.0.113.5", 8002, "api"),
        ("203.0.113.5", 8076, "ray"),
        # Ray runs on the head: its fixed autoscaler and dashboard metrics ports.
        ("203.0.113.5", 44217, "ray"),
        ("203.0.113.5", 44227, "ray"),
    }
    # A cluster on this machine alone: its loopback inventory host is no public address.
    state.access.local = True
    state.nodes[0].private_ip = "127.0.0.1"
    assert exposure_targets(state) == []


def test_rules_name_the_bind_address_or_a_firewall_line_admitting_the_nodes() -> None:
    ips = ["10.0.0.5", "10.0.0.6"]
    ray = ProbeTarget("worker1", "203.0.113.6", 6379, "ray gcs", "ray", private_ip="10.0.0.6")
    assert closing_rule(ray, ips) == (
        "on worker1: nft add rule inet llamacluster input ip saddr != { 10.0.0.5, 10.0.0.6 } "
        "tcp dport 6379 drop"
    )
    dash = ProbeTarget("head", "203.0.113.5", 8265, "ray dashboard", "loopback", "10.0.0.5")
    assert closing_rule(dash, ips).startswith("bind it to 127.0.0.1")
    api = ProbeTarget("head", "10.0.0.5", 8000, "api", "api", private_ip="10.0.0.5")
    assert "the public and private address are the same" in closing_rule(api, ips)


@pytest.mark.e2e
def test_probe_on_a_namespace_node(netns_hosts) -> None:
    """A node with a network stack of its own: a port on all its interfaces answers the
    controller, one on its loopback does not."""
    hosts = netns_hosts(1)
    ns, addr = hosts.namespaces[0], hosts.addresses[0]
    script = (
        "import socket, sys, time\n"
        "a = socket.socket(); a.bind(('0.0.0.0', 18000)); a.listen()\n"
        "b = socket.socket(); b.bind(('127.0.0.1', 18265)); b.listen()\n"
        "print('up', flush=True); time.sleep(120)\n"
    )
    proc = subprocess.Popen(
        ["ip", "netns", "exec", ns, sys.executable, "-c", script], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "up"
        state = _state(addr, addr, api=18000, dashboard=18265)
        started = time.monotonic()
        findings, lines = probe_cluster(state, timeout=2.0)
        assert time.monotonic() - started < 5
    finally:
        proc.kill()
        proc.wait(timeout=10)
    states = {f.target.port: f.state for f in findings}
    assert states[18000] == "open"
    assert states[18265] == "closed"
    open_lines = [ln for ln in lines if ln.lstrip().startswith("OPEN")]
    assert len(open_lines) == 1 and f"{addr}:18000 (api)" in open_lines[0]
    assert f"ip saddr != {{ {addr} }} tcp dport 18000 drop" in open_lines[0]
