"""One operator at a time: a second `up` or `down` on a held cluster says who holds it."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

CLI = [sys.executable, "-c", "from cluster.cli.app import run; run()"]
# Holds cluster NAME's lock as `up` would, prints "held", then waits for a line on stdin.
HOLDER = (
    "import sys\n"
    "from cluster.lock import cluster_lock\n"
    "with cluster_lock(sys.argv[1], 'up'):\n"
    "    print('held', flush=True)\n"
    "    sys.stdin.readline()\n"
)


@pytest.fixture
def env(tmp_path) -> dict[str, str]:
    return {**os.environ, "LLAMACLUSTER_HOME": str(tmp_path / "home")}


def _hold(name: str, env: dict[str, str]) -> subprocess.Popen:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, name],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    return holder


def _release(holder: subprocess.Popen) -> None:
    assert holder.stdin is not None
    holder.stdin.write("\n")
    holder.stdin.flush()
    holder.wait(timeout=30)


def test_a_second_up_on_a_held_cluster_names_the_holder_and_changes_nothing(
    env, tmp_path, bare_model_dir
):
    holder = _hold("local", env)
    try:
        started = time.monotonic()
        done = subprocess.run(
            [*CLI, "up", "--local", "--model", str(bare_model_dir)],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
        assert done.returncode == 3, done.stderr
        line = done.stderr.strip()
        assert line.startswith("error: cluster 'local' is busy: `up` (pid ")
        assert f"pid {holder.pid} on " in line and "--wait" in line
        assert time.monotonic() - started < 60  # refused at once, nothing ran
        assert not (tmp_path.parent / "home" / "clusters" / "local" / "state.json").exists()
    finally:
        _release(holder)


def test_down_waits_for_the_holder_with_wait(env, monkeypatch):
    from cluster.state import Access, ClusterState

    monkeypatch.setenv("LLAMACLUSTER_HOME", env["LLAMACLUSTER_HOME"])
    ClusterState(name="c", access=Access(local=True)).save()
    holder = _hold("c", env)
    try:
        refused = subprocess.run(
            [*CLI, "down", "--name", "c"], capture_output=True, text=True, env=env, timeout=120
        )
        assert refused.returncode == 3 and "is busy" in refused.stderr
        waiting = subprocess.Popen(
            [*CLI, "down", "--name", "c", "--wait"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        time.sleep(3)
        assert waiting.poll() is None  # queued behind the holder
    finally:
        _release(holder)
    out, err = waiting.communicate(timeout=120)
    assert waiting.returncode == 0, err
    assert "waiting for it (--wait)" in out and "cluster c is down" in out


def test_the_lock_is_free_again_when_its_holder_dies(env, monkeypatch):
    from cluster.lock import cluster_lock

    monkeypatch.setenv("LLAMACLUSTER_HOME", env["LLAMACLUSTER_HOME"])
    holder = _hold("gone", env)
    holder.kill()
    holder.wait()
    with cluster_lock("gone", "up") as path:
        assert '"command": "up"' in path.read_text()
