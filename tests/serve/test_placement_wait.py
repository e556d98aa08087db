"""A restart waits for its placement group: with a node's Ray killed, the wait for live bundles
reports that node and ends once Ray has placed its bundle on a live node (loopback Ray nodes)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from cluster.supervisor import session_members
from serve.placement import waiting_reason
from tests.support.child import next_json_line

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

# A driver holding a two-bundle placement group on two of the three nodes; on "go" it waits for
# live bundles and prints every reason it was given, then where the bundles are.
DRIVER = r"""
import asyncio, json, sys, time
import ray
from ray.util import placement_group, placement_group_table
from serve.placement import wait_for_live_bundles

ray.init(address=sys.argv[1], log_to_driver=False)
pg = placement_group([{"GPU": 1}, {"GPU": 1}], strategy="STRICT_SPREAD")
ray.get(pg.ready(), timeout=120)
def where():
    alive = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]}
    return {str(k): alive.get(v) for k, v in placement_group_table(pg)["bundles_to_node_id"].items()}
print(json.dumps({"placed": where()}), flush=True)
sys.stdin.readline()
started = time.time()
reasons = []
def on_wait(reason):
    reasons.append([round(time.time() - started, 1), reason])
result = asyncio.run(wait_for_live_bundles(pg, timeout_s=float(sys.argv[2]), on_wait=on_wait))
print(json.dumps({"result": result, "waited_s": round(time.time() - started, 1),
                  "reasons": reasons, "bundles": where(),
                  "state": placement_group_table(pg)["state"]}), flush=True)
"""


def test_the_wait_names_the_lost_node_and_ends_when_its_bundle_is_on_a_live_one(
    make_ray_cluster,
) -> None:
    cluster = make_ray_cluster(nodes=3, slots_per_node=1)
    proc = subprocess.Popen(
        [sys.executable, "-c", DRIVER, cluster.address, "180"],
        env={**os.environ, **cluster.env},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        placed = next_json_line(proc, 180)["placed"]
        # A worker node holding a bundle: every Ray process of it SIGKILLed (a crashed node).
        lost = next(ip for ip in ("127.0.0.2", "127.0.0.3") if ip in placed.values())
        spare = ({"127.0.0.2", "127.0.0.3"} - {lost}).pop()
        handle = next(h for h in cluster.handles if h.ip == lost)
        for pid, _, _ in session_members(handle.session_id):
            os.kill(pid, signal.SIGKILL)
        proc.stdin.write("go\n")
        proc.stdin.flush()
        out = next_json_line(proc, 240)
        print(f"\nwaited {out['waited_s']} s; reasons: {out['reasons'][:2]} ...")
        # Ray declares the node dead only after missed health checks, then places its bundle on
        # the spare node: the wait saw the lost node and ended with both bundles on live nodes.
        assert out["result"] is None, out
        assert out["state"] == "CREATED", out
        assert lost not in out["bundles"].values() and spare in out["bundles"].values(), out
        assert None not in out["bundles"].values(), out
        reasons = " ".join(r for _, r in out["reasons"])
        assert lost in reasons, reasons
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)


def test_waiting_reason_names_the_lost_node() -> None:
    nodes = [
        {"NodeID": "a", "Alive": True, "NodeManagerAddress": "10.0.0.1"},
        {"NodeID": "b", "Alive": False, "NodeManagerAddress": "10.0.0.2"},
        {"NodeID": "c", "Alive": True, "NodeManagerAddress": "10.0.0.3"},
    ]
    table = {
        "state": "RESCHEDULING",
        "bundles": {0: {"GPU": 1.0}, 1: {"GPU": 1.0}, 2: {"GPU": 1.0}},
        "bundles_to_node_id": {0: "a", 1: "b", 2: "c"},
    }
    text = waiting_reason([1, 2], table, nodes)
    assert text.startswith("waiting for the placement group (RESCHEDULING)")
    assert "bundle 1 {'GPU': 1.0}: its node 10.0.0.2 is gone" in text
    assert "bundle 2 {'GPU': 1.0}: node 10.0.0.3 does not answer" in text
    assert "10.0.0.1" not in text
    table["bundles_to_node_id"] = {0: "a"}
    assert "bundle 1 {'GPU': 1.0}: not placed on any node yet" in waiting_reason([1], table, nodes)
