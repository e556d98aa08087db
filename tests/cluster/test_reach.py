"""Preflight's node-to-node port probe: over a real sshd, and against a port that drops SYNs."""

from __future__ import annotations

import io
import os
import socket
import time
from pathlib import Path

import pytest
from rich.console import Console

from cluster import reach
from cluster.lifecycle import UpConfig
from cluster.ray_nodes import WORKER_BLOCK_RANGE
from cluster.runner import LocalRunner
from cluster.stages.base import Reporter, UpContext
from cluster.stages.preflight import Preflight
from cluster.state import ClusterState

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMACLUSTER_HOME", str(tmp_path / "home"))


def _listeners_alive() -> list[int]:
    """Pids of probe listeners on this machine (the loopback nodes' side is here too)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if reach.LISTENER_MARK.encode() in cmdline and b"select" in cmdline:
                found.append(int(entry))
    return found


def test_preflight_proves_both_ways_between_two_ssh_nodes(sshd, tmp_path):
    inv = tmp_path / "ips.txt"
    inv.write_text("")
    out = io.StringIO()
    cluster = sshd.cluster()
    ctx = UpContext(
        config=UpConfig(
            inventory=inv, system_root=tmp_path / "root", device="cpu", verbose=True, ray_port=0
        ),
        cluster=cluster,
        state=ClusterState(name="reach", shared_dir=str(tmp_path)),
        runners=sshd.runners(),
        reporter=Reporter(Console(file=out, soft_wrap=True), verbose=True),
    )
    before = set(_listeners_alive())
    outcome = Preflight().run(ctx)
    text = out.getvalue()
    assert outcome.status == "done", text
    assert [n.private_ip for n in ctx.state.nodes] == ["127.0.0.2", "127.0.0.3"]
    gcs = ctx.state.ports.ray_gcs
    assert f"TCP open between all 2 nodes both ways: GCS port {gcs}" in text
    # -v shows the probe commands on each node: a listener on the node's own address.
    assert reach.LISTENER_MARK + " 127.0.0.2 " in text.replace("'", "")
    assert reach.LISTENER_MARK + " 127.0.0.3 " in text.replace("'", "")
    assert f"127.0.0.2:{gcs}" in text  # the worker tried the head's GCS port
    assert 's.bind(("", p))' in text  # commands shown as they are, not markup
    # Every peer got through, so every listener ended by itself.
    deadline = time.monotonic() + 5
    while not set(_listeners_alive()) <= before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert set(_listeners_alive()) <= before


def test_a_port_that_drops_syns_is_named_with_its_range_and_the_fix():
    runner = LocalRunner()
    started = runner.run(reach.listen_command("127.0.0.3", peers=1), timeout=30)
    lis = reach.parse_listener(started.stdout)
    assert lis is not None, started.stderr
    lo, hi = WORKER_BLOCK_RANGE
    assert lo <= lis.worker < hi and lis.ephemeral != lis.worker
    # A listener that never accepts, with its queue full: the kernel drops further SYNs, as a
    # DROP firewall rule does.
    full = socket.socket()
    full.bind(("127.0.0.3", 0))
    full.listen(0)
    filler = socket.socket()
    filler.connect(full.getsockname())
    try:
        ips = {"head": "127.0.0.2", "worker1": "127.0.0.3"}
        listeners = {"worker1": reach.Listener(full.getsockname()[1], lis.worker, "32768-60999", 0)}
        targets = reach.plan_targets(ips, listeners, head="worker1", gcs_port=1)["head"]
        assert [t.kind for t in targets] == ["gcs", "ephemeral", "worker"]
        tried = runner.run(reach.connect_command([t.address for t in targets]), timeout=30)
        verdicts = reach.parse_verdicts(tried.stdout, targets)
        assert [v for _, v in verdicts] == ["refused", "timeout", "open"]
        message, hint = reach.blocked_report(
            {"head": verdicts}, ips=ips, listeners=listeners, gcs_port=1
        )
    finally:
        runner.run(reach.stop_listener_command(lis.pid), timeout=30)
        filler.close()
        full.close()
    port = listeners["worker1"].ephemeral
    assert f"head (127.0.0.2) → worker1 (127.0.0.3) port {port}" in message
    assert "the ephemeral range 32768-60999" in message and "timed out" in message
    assert "port 1," not in message  # refused on the GCS port: packets got through
    assert f"port {lis.worker}" not in message
    assert "ufw allow proto tcp from 127.0.0.2 to any port 1,20000:60999" in hint
    assert "iptables -A INPUT -p tcp -s 127.0.0.2" in hint
    assert lis.pid not in _listeners_alive()


def test_refused_by_a_live_listener_is_a_firewall_but_fine_on_the_gcs_port():
    ips = {"head": "10.0.0.1", "worker1": "10.0.0.2", "worker2": "10.0.0.3"}
    listeners = {
        n: reach.Listener(40000 + i, 21000 + i, "32768-60999", 1) for i, n in enumerate(ips)
    }
    targets = reach.plan_targets(ips, listeners, head="head", gcs_port=6379)
    # Every node tries both ports of every other node; workers also try the head's GCS port.
    assert len(targets["head"]) == 4 and len(targets["worker1"]) == 5
    assert {t.dst for t in targets["worker1"]} == {"head", "worker2"}
    gcs = targets["worker1"][0]
    assert (gcs.kind, gcs.address) == ("gcs", "10.0.0.1:6379")
    assert reach.passes(gcs, "refused") and not reach.passes(gcs, "timeout")
    worker_port = targets["worker1"][2]
    assert worker_port.kind == "worker" and not reach.passes(worker_port, "refused")
    results = {"worker1": [(gcs, "refused"), (worker_port, "refused")]}
    message, _ = reach.blocked_report(results, ips=ips, listeners=listeners, gcs_port=6379)
    assert message.count("→") == 1 and "refused (a firewall rejects it)" in message
    assert "Ray's worker ports, 20000-31999" in message
    assert (
        reach.blocked_report({"w": [(gcs, "open")]}, ips=ips, listeners={}, gcs_port=6379) is None
    )
