"""The measure stage on two namespace nodes over SSH, with the link between them capped by `tc`
(a token bucket on the head's interface): the measured bandwidth follows the cap."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest
from rich.console import Console

from cluster.inventory import parse_inventory
from cluster.lifecycle import UpConfig
from cluster.runner import runner_for
from cluster.stages.base import Reporter, UpContext
from cluster.stages.measure import Measure, measure_link
from cluster.stages.preflight import Preflight
from cluster.state import ClusterState

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]


def _tc(hosts, index: int, *args: str) -> None:
    hosts.run_in(index, "tc", "qdisc", "replace", "dev", "eth0", "root", *args)


def test_measured_link_tracks_a_tc_cap_and_the_cpu_is_measured_once_per_machine(
    netns_hosts, tmp_path: Path, monkeypatch
):
    monkeypatch.setenv("LLAMACLUSTER_HOME", str(tmp_path / "home"))
    hosts = netns_hosts(2)
    inv = tmp_path / "ips.txt"
    inv.write_text(hosts.inventory_text())
    cluster = parse_inventory(hosts.inventory_text(), identity_file=hosts.client_key)
    ssh = hosts.ssh_config()
    out = io.StringIO()
    ctx = UpContext(
        config=UpConfig(
            inventory=inv,
            system_root=tmp_path / "root",
            device="cpu",
            ray_port=0,
            env=Path(sys.prefix),
        ),
        cluster=cluster,
        state=ClusterState(name="measure", shared_dir=str(tmp_path)),
        runners=[runner_for(n, ssh_config=ssh) for n in cluster],
        reporter=Reporter(Console(file=out, soft_wrap=True)),
    )
    Preflight().run(ctx)
    ctx.state.env.dir = sys.prefix
    # Head to worker: 200 Mbit/s on the head's egress. (netem, which could add a delay, is not
    # in every kernel; the round trip is checked for sanity only.)
    _tc(hosts, 0, "tbf", "rate", "200mbit", "burst", "64kb", "latency", "100ms")
    outcome = Measure().run(ctx)
    assert outcome.status == "done", out.getvalue()
    recorded = ctx.state.measure
    head, worker = ctx.state.nodes
    # One machine: measured once, both nodes carry the same numbers.
    assert recorded.cpu[head.name] == recorded.cpu[worker.name]
    assert recorded.cpu[head.name].read_gbs > 1 and recorded.cpu[head.name].matmul_tflops > 0
    link = recorded.links[worker.name]
    assert (link.src, link.dst, link.dst_ip) == ("head", "worker1", worker.private_ip)
    assert link.gbps == pytest.approx(0.2, rel=0.2), link
    assert 0 < link.rtt_ms < 20, link  # a bridge on one host: well under a millisecond idle
    assert "head → worker1" in outcome.message
    # The same nodes again: nothing to measure.
    assert Measure().run(ctx).status == "unchanged"
    # Another cap: the measurement follows it.
    _tc(hosts, 0, "tbf", "rate", "50mbit", "burst", "32kb", "latency", "200ms")
    slower = measure_link(ctx, sys.prefix + "/bin/python", head, worker)
    assert slower.gbps == pytest.approx(0.05, rel=0.2), slower
    check = Measure().check(ctx)
    assert check.ok and "Gbit/s" in check.message and head.label in check.per_node
