"""cluster.remote_ray run as a node runs it: `python -m cluster.remote_ray VERB`, JSON on stdin."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest

from cluster.ray_nodes import nodes_call, ports_call
from cluster.remote_ray import MODULE


def run_verb(verb: str, request: object) -> subprocess.CompletedProcess:
    stdin = request if isinstance(request, str) else json.dumps(request)
    return subprocess.run(
        [sys.executable, "-m", MODULE, verb],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )


def reply_of(proc: subprocess.CompletedProcess) -> dict:
    reply = json.loads(proc.stdout.strip().splitlines()[-1])
    assert isinstance(reply, dict)
    return reply


def one_stderr_line(proc: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert reply_of(proc)["error"] == lines[0] and reply_of(proc)["ok"] is False
    return lines[0]


def test_ports_are_distinct_free_and_blocks_are_inside_the_range():
    request = {"count": 7, "blocks": 3, "block_size": 16, "lo": 20000, "hi": 32000}
    proc = run_verb("ports", request)
    assert proc.returncode == 0, proc.stderr
    reply = reply_of(proc)
    assert reply["ok"] is True and len(reply["singles"]) == 7 and len(reply["blocks"]) == 3
    taken = list(reply["singles"])
    for start in reply["blocks"]:
        assert start >= 20000 and start + 16 <= 32000
        taken += range(start, start + 16)
    assert len(set(taken)) == len(taken) == 7 + 3 * 16
    for port in reply["singles"] + reply["blocks"]:  # released when the program ended
        socket.create_server(("", port)).close()


def test_ports_fail_with_one_line_when_no_block_is_free():
    with socket.create_server(("", 0)) as held:
        port = held.getsockname()[1]
        # Every block of 4 that fits in port-2..port+4 contains the held port.
        request = {"count": 0, "blocks": 1, "block_size": 4, "lo": port - 2, "hi": port + 4}
        proc = run_verb("ports", request)
    assert proc.returncode == 1
    assert one_stderr_line(proc) == f"no free block of 4 ports in {port - 2}-{port + 4}"


@pytest.mark.parametrize(
    ("verb", "request_", "expected"),
    [
        (
            "ports",
            {"count": 1, "blocks": 1, "block_size": 64, "lo": 20000, "hi": 20010},
            "bad ports request: 20000-20010 cannot hold a block of 64",
        ),
        (
            "ports",
            {"count": -1, "blocks": 1, "block_size": 64, "lo": 20000, "hi": 32000},
            "bad ports request: count: Input should be greater than or equal to 0",
        ),
        (
            "nodes",
            {"address": "10.0.0.1:6379", "node_ip": "10.0.0.1", "timeout_s": 5},
            "bad nodes request: expected: Field required",
        ),
        ("nodes", "not json", "bad nodes request: Invalid JSON"),
    ],
)
def test_bad_requests_exit_2_with_one_line(verb, request_, expected):
    proc = run_verb(verb, request_)
    assert proc.returncode == 2
    assert one_stderr_line(proc).startswith(expected)


def test_the_controllers_calls_carry_typed_requests():
    ports = ports_call("/env/bin/python", nodes=2, with_head=True, block_size=32)
    assert ports.command == "/env/bin/python -m cluster.remote_ray ports"
    assert json.loads(ports.stdin) == {
        "count": 2 * 6 + 3,
        "blocks": 2,
        "block_size": 32,
        "lo": 20000,
        "hi": 32000,
    }
    nodes = nodes_call("/env/bin/python", "10.0.0.1:6379", {"10.0.0.2": 2}, timeout=30)
    assert json.loads(nodes.stdin) == {
        "address": "10.0.0.1:6379",
        "node_ip": "10.0.0.1",
        "timeout_s": 30.0,
        "expected": {"10.0.0.2": 2.0},
    }
