"""Nodes come back by themselves, and `up` repairs only a lost node: two network-namespace nodes
reached over SSH, real Ray, the real CLI."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster.supervisor import UNIT_DIR, session_members
from tests.cluster.test_up_e2e import _ok, _state, llamacluster

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

NAME = "e2e-sup"


def _pids(sid: int, *comms: str) -> set[int]:
    """Pids of session ``sid`` (its leader included), only those named ``comms`` when given."""
    return {p for p, c, _ in session_members(sid) if not comms or c in comms or p == sid}


def _kill_ray_of(sid: int, *, keep: int | None) -> set[int]:
    """SIGKILL every process of session ``sid`` (one node's Ray) but ``keep``."""
    pids = {p for p, _, _ in session_members(sid) if p != keep}
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return pids


def _registered(env: dict[str, str]) -> str:
    """`status` until its ray line says every node is registered (at most 3 tries)."""
    out = ""
    for _ in range(3):
        done = llamacluster("status", "--name", NAME, env=env, timeout=300)
        out = done.stdout
        if "all registered with the head" in out:
            return out
    raise AssertionError(out + done.stderr)


def test_a_node_returns_by_itself_and_up_repairs_only_a_lost_node(
    tmp_path: Path, netns_hosts, demo_model_dir: Path
) -> None:
    hosts = netns_hosts(2)
    home = tmp_path / "home"
    env = {**os.environ, "LLAMACLUSTER_HOME": str(home), "VLLM_CPU_KVCACHE_SPACE": "1"}
    inventory = tmp_path / "ips.txt"
    inventory.write_text(hosts.inventory_text())
    shared, root = tmp_path / "shared", tmp_path / "sysroot"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "fstab").write_text(f"nfs.example:/export {shared} nfs4 rw,hard 0 0\n")
    args = [
        "--ips", str(inventory), "--name", NAME, "--ssh-key", str(hosts.client_key),
        "--known-hosts", str(tmp_path / "known_hosts"), "--model", str(demo_model_dir),
        "--shared-dir", str(shared), "--env", sys.prefix, "--system-root", str(root),
        "--cpu-slots", "1", "--ray-port", "0", "--dashboard-port", "0", "--api-port", "0",
        "--monitor-port", "0",
        *[x for s in ("cache", "download", "serve", "ready", "monitor") for x in ("--skip", s)],
    ]  # fmt: skip
    units = root / UNIT_DIR
    try:
        started = time.monotonic()
        first = _ok(llamacluster("up", *args, env=env, timeout=600))
        print(f"\nup: {time.monotonic() - started:.1f} s")
        assert first.count("supervised, 1 cpu slot(s)") == 2, first
        ray = _state(home, NAME)["ray"]["nodes"]
        assert {r["supervisor"] for r in ray.values()} == {"process"}
        # Under a test root the units are written (files only): the real text, one per node.
        assert sorted(p.name for p in units.iterdir()) == sorted(r["unit"] for r in ray.values())
        worker_unit = (units / ray["worker1"]["unit"]).read_text()
        assert "Restart=on-failure" in worker_unit and "--block" in worker_unit
        assert f"--address {hosts.addresses[0]}:" in worker_unit

        # 1. Every Ray process of the worker dies: its supervisor starts Ray again, the node
        #    rejoins the head.
        head_sid, worker_sid = ray["head"]["session"], ray["worker1"]["session"]
        head_before = _pids(head_sid, "gcs_server", "raylet")
        killed = _kill_ray_of(worker_sid, keep=worker_sid)
        assert killed and worker_sid not in killed
        t0 = time.monotonic()
        while time.monotonic() - t0 < 60:
            back = _pids(worker_sid, "raylet") - {worker_sid} - killed
            if back:
                break
            time.sleep(0.5)
        assert back, "the supervisor did not start the worker's Ray again within 60 s"
        status = _registered(env)
        rejoined = time.monotonic() - t0
        print(f"raylet back after the kill; registered with the head in {rejoined:.1f} s")
        assert rejoined < 90, rejoined
        assert status.count("ray running") == 2
        assert _pids(head_sid, "gcs_server", "raylet") == head_before  # the head untouched

        # 2. Supervisor off and the worker's Ray gone: `up` repairs that node only.
        os.kill(worker_sid, signal.SIGKILL)
        time.sleep(0.5)
        _kill_ray_of(worker_sid, keep=None)
        started = time.monotonic()
        second = _ok(llamacluster("up", *args, env=env, timeout=600))
        print(f"repairing up: {time.monotonic() - started:.1f} s")
        worker_label = f"{hosts.addresses[1]}:22"
        assert f"repairing {worker_label}: its Ray is gone" in second, second
        assert second.count("ray started") == 1 and f"{worker_label} ray started" in second
        assert _pids(head_sid, "gcs_server", "raylet") == head_before
        ray = _state(home, NAME)["ray"]["nodes"]
        assert ray["head"]["session"] == head_sid and ray["worker1"]["session"] != worker_sid
        assert _registered(env).count("ray running") == 2

        # 3. `down --purge`: units removed (exactly them), Ray and supervisors stopped.
        sessions = [r["session"] for r in ray.values()]
        purged = _ok(llamacluster("down", "--name", NAME, "--purge", env=env, timeout=300))
        assert "purged" in purged
        assert list(units.iterdir()) == []
        assert all(session_members(sid) == [] for sid in sessions)
    finally:
        if (home / "clusters" / NAME / "state.json").exists():
            subprocess.run(
                [sys.executable, "-c", "from cluster.cli.app import run; run()", "down",
                 "--name", NAME], env=env, capture_output=True, timeout=300, check=False,
            )  # fmt: skip
