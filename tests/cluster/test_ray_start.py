"""`ray start` as `up` runs it (cluster/ray_start.py): a dashboard agent that takes longer to
start than the raylet's fixed 15 s wait for its port file no longer aborts the node."""

from __future__ import annotations

import socket
import time

import pytest

from cluster.errors import RemoteError
from cluster.ray_start import (
    LISTEN_FLAG,
    agent_listens,
    exit_code,
    flag_value,
    with_listen_port,
)
from cluster.supervisor import session_members
from tests.support.ray_cluster import start_loopback_ray_cluster

# On PYTHONPATH, imported by every Python process of the node: the dashboard agent alone waits
# first, as one does on a busy node (measured there: 16-30 s before its first log line).
SLOW_AGENT = """\
import sys, time
if any(arg.endswith("dashboard/agent.py") for arg in sys.orig_argv):
    time.sleep({delay})
"""
AGENT_DELAY_S = 25


def test_the_listen_port_goes_to_the_raylet_once_and_only_when_fixed() -> None:
    raylet = ["/env/raylet", "--node_manager_port=1"]
    assert with_listen_port(raylet, 52400) == [*raylet, f"{LISTEN_FLAG}=52400"]
    for port in (None, 0, -1, "52400"):  # chosen by the agent: only its file can tell
        assert with_listen_port(raylet, port) == raylet
    given = [*raylet, f"{LISTEN_FLAG}=7"]
    assert with_listen_port(given, 52400) == given


def test_flag_values_in_both_spellings() -> None:
    argv = ["start", "--node-ip-address", "127.0.0.2", "--dashboard-agent-listen-port=5"]
    assert flag_value(argv, "--node-ip-address") == "127.0.0.2"
    assert flag_value(argv, "--dashboard-agent-listen-port") == "5"
    assert flag_value(argv, "--temp-dir") is None
    assert flag_value(["--temp-dir"], "--temp-dir") is None  # no value after it


def test_exit_codes_follow_sys_exit() -> None:
    assert [exit_code(c) for c in (None, 0, 2, "usage: ...")] == [0, 0, 2, 1]


def test_the_agent_wait_ends_when_the_port_listens_or_the_time_is_over() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        started = time.monotonic()
        assert not agent_listens("127.0.0.1", port, 1.0)  # bound, not listening: refused
        assert 1.0 <= time.monotonic() - started < 10
        sock.listen()
        assert agent_listens("127.0.0.1", port, 0.0)


def _listening(port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            time.sleep(0.5)
    return False


@pytest.mark.e2e
@pytest.mark.timeout(400)
def test_a_slow_dashboard_agent_aborts_rays_own_start_but_not_ours(tmp_path) -> None:
    slow = tmp_path / "slow"
    slow.mkdir()
    (slow / "sitecustomize.py").write_text(SLOW_AGENT.format(delay=AGENT_DELAY_S))
    env = {"PYTHONPATH": str(slow)}

    # Ray's CLI: the raylet stops waiting for the agent's port file after 15 s and aborts.
    try:
        started_anyway = start_loopback_ray_cluster(
            nodes=1, env=env, ray_cli=(), retries=0, timeout=120
        )
    except RemoteError as exc:
        assert "timed out during startup" in str(exc)
    else:
        started_anyway.stop()
        pytest.fail("Ray's own CLI started the node although its agent was 25 s late")

    started = time.monotonic()
    cluster = start_loopback_ray_cluster(nodes=1, env=env, timeout=120)
    try:
        registered_s = time.monotonic() - started
        port = cluster.spec.head.ports.dashboard_agent_listen
        raylets = [
            cmdline
            for sid in cluster.session_ids
            for _, comm, cmdline in session_members(sid)
            if comm == "raylet"
        ]
        assert port and len(raylets) == 1 and f"{LISTEN_FLAG}={port}" in raylets[0].split()
        # The start returned once the late agent listened, on the port the raylet was told.
        assert registered_s >= AGENT_DELAY_S, registered_s
        assert _listening(port, 2)
        print(f"registered after {registered_s:.1f}s; agent listening on {port}")
    finally:
        cluster.stop()
