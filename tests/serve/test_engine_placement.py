"""Degraded serving's own placement group (serve/placement.py, `EnginePlacement`) on real Ray:
two loopback nodes with one device slot each, the full layout tp=2 across them. The worker
node's Ray is killed: the group with its bundle is removed (not left for Ray to place again),
the wait for the full layout ends naming the lost node, the smaller layout is placed on the
head; the node is started again: `all_back` sees it and the full layout is placed again."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from cluster.ray_nodes import start_ray_node
from cluster.supervisor import session_members
from serve.placement import pending_reason
from tests.support.child import next_json_line

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

# Drives an EnginePlacement step by step: a line on stdin starts the next step, each step prints
# one JSON line. The "engine" it opens is the group's id and where its bundles are.
DRIVER = r"""
import asyncio, json, sys, time
import ray
from ray.util import placement_group_table
from serve.placement import EnginePlacement, _group_addresses, nodes_answer

ray.init(address=sys.argv[1], log_to_driver=False)

async def opened(tp, pp, pg):
    return {"tp": tp, "pp": pp, "nodes": sorted(_group_addresses(pg))}

def states():
    return sorted(t["state"] for t in placement_group_table().values())

async def main():
    place = EnginePlacement(full=(2, 1), small=(1, 1), device_key="GPU",
                            open_session=opened, round_s=2.0, small_wait_s=60.0)
    session = await place.start()
    live = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
    answer = {"live": nodes_answer(live, 30.0), "unknown": nodes_answer(live + ["ab" * 28], 5.0)}
    print(json.dumps({"session": session, "full_nodes": sorted(place.full_nodes),
                      "answer": answer}), flush=True)
    sys.stdin.readline()  # the worker node's Ray is killed
    reasons = []
    started = time.monotonic()
    left = await place.wait_full(float(sys.argv[2]), lambda why: reasons.append(why))
    waited = round(time.monotonic() - started, 1)
    print(json.dumps({"left": left, "waited_s": waited, "reasons": reasons[-3:],
                      "group": place.pg is not None, "states": states()}), flush=True)
    planned = await place.plan()
    layout, start = planned
    session = await start()
    print(json.dumps({"layout": layout, "session": session, "states": states(),
                      "all_back": await place.all_back(),
                      "full_nodes": sorted(place.full_nodes)}), flush=True)
    sys.stdin.readline()  # the worker node is started again
    deadline = time.monotonic() + 120
    while not await place.all_back():
        if time.monotonic() > deadline:
            print(json.dumps({"all_back": False}), flush=True)
            return
        await asyncio.sleep(1)
    left = await place.wait_full(120, lambda why: None)
    session = await place.start()
    print(json.dumps({"all_back": True, "left": left, "session": session,
                      "states": states()}), flush=True)
    await place.release()

asyncio.run(main())
"""


def _say(proc: subprocess.Popen) -> None:
    proc.stdin.write("go\n")
    proc.stdin.flush()


def test_a_lost_node_gets_the_group_removed_the_smaller_layout_then_the_full_one_back(
    make_ray_cluster,
) -> None:
    cluster = make_ray_cluster(nodes=2, slots_per_node=1)
    wait_s = 60
    proc = subprocess.Popen(
        [sys.executable, "-c", DRIVER, cluster.address, str(wait_s)],
        env={**os.environ, **cluster.env},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        first = next_json_line(proc, 180)
        # One bundle on each node (Ray may name the head by the host's own address).
        nodes = first["session"]["nodes"]
        assert first["session"]["tp"] == 2 and len(set(nodes)) == 2 and "127.0.0.2" in nodes
        assert first["full_nodes"] == nodes  # what all_back waits for later
        # The pinned task runs on each live node; a node Ray does not have fails the check.
        assert first["answer"] == {"live": True, "unknown": False}, first
        head = next(n for n in nodes if n != "127.0.0.2")

        worker = cluster.handles[1]
        for pid, _, _ in session_members(worker.session_id):
            os.kill(pid, signal.SIGKILL)
        _say(proc)
        lost = next_json_line(proc, wait_s + 60)
        print(f"\nwait for the full layout: {lost['waited_s']} s, {lost['reasons'][-1:]}")
        # Not placed (one slot is left), and no group is left for Ray to retry: the group with
        # the dead node's bundle went as soon as Ray declared the node dead.
        assert lost["left"] is not None and "127.0.0.2" in lost["left"], lost
        assert "gone" in lost["left"], lost
        # The reason is the fresh group's (free slots): the one Ray was placing again went
        # before the wait ended.
        assert "free GPU slots" in lost["left"], lost
        assert not lost["group"], lost
        assert lost["states"] and set(lost["states"]) == {"REMOVED"}, lost

        small = next_json_line(proc, 120)
        assert small["session"] == {"tp": 1, "pp": 1, "nodes": [head]}, small
        assert small["layout"] == f"tp=1 × pp=1 (on {head})", small
        assert small["all_back"] is False, small
        # The smaller layout does not overwrite the nodes the full one needs back.
        assert small["full_nodes"] == nodes, small
        assert small["states"].count("CREATED") == 1, small

        # The node's supervisor (or `up`) starts its Ray again: same address and ports.
        cluster.handles[1] = start_ray_node(cluster.runners[1], cluster.spec, 1, retries=3)
        _say(proc)
        back = next_json_line(proc, 240)
        assert back["all_back"] is True, back
        assert back["left"] is None, back
        assert back["session"] == {"tp": 2, "pp": 1, "nodes": nodes}, back
        assert back["states"].count("CREATED") == 1 and "RESCHEDULING" not in back["states"]
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)


def test_the_pending_reason_names_free_slots_and_the_lost_node() -> None:
    nodes = [
        {"NodeID": "a", "Alive": True, "NodeManagerAddress": "10.0.0.1", "Resources": {"GPU": 2}},
        {"NodeID": "b", "Alive": False, "NodeManagerAddress": "10.0.0.2", "Resources": {"GPU": 2}},
        {"NodeID": "c", "Alive": True, "NodeManagerAddress": "10.0.0.3", "Resources": {"CPU": 4}},
    ]
    free = {"a": {"GPU": 1.0}, "c": {"CPU": 4.0}}
    text = pending_reason((2, 2), "GPU", nodes, free, frozenset({"10.0.0.1", "10.0.0.2"}))
    assert text == (
        "waiting for 4 free GPU slots for tp=2 × pp=2 (free per live node: 10.0.0.1: 1); "
        "node 10.0.0.2 of the full layout is gone"
    )
    assert pending_reason((1, 1), "GPU", nodes[2:], {}) == (
        "waiting for 1 free GPU slots for tp=1 × pp=1 (free per live node: no live node has any)"
    )
