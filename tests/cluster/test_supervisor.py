"""The node supervisor: its backoff, the systemd unit it writes (files under a temp root: the
test bed has no systemd to run it), and the real supervisor process restarting a node's Ray."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from cluster import supervisor as sup
from cluster.inventory import local_cluster
from cluster.ray_nodes import (
    RayClusterSpec,
    RayNodeSpec,
    raylet_alive_command,
    start_ray_node,
    stop_ray_node,
    supervisor_log,
)
from cluster.runner import LocalRunner
from tests.support.ray_cluster import write_token_file


def test_backoff_doubles_up_to_its_cap():
    assert [sup.backoff_delay(n, base=1, cap=10) for n in range(0, 7)] == [0, 1, 2, 4, 8, 10, 10]
    assert sup.backoff_delay(1000, base=1, cap=30) == 30  # no overflow for long outages


def _unit() -> tuple[str, str]:
    argv = ["/env/bin/ray", "start", "--address", "10.0.0.1:6379", "--resources", '{"x": 1}']
    env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": "/home/a b/ray_token"}
    name = sup.unit_name("prod", "0123456789", "worker1")
    text = sup.unit_text(
        cluster="prod", node="worker1", user="alice", argv=argv, env=env, temp_dir="/tmp/lc-x"
    )
    return name, text


def test_unit_runs_the_nodes_ray_start_blocking_and_restarts_it():
    name, text = _unit()
    assert name == "llamacluster-ray-prod-0123456789-worker1.service"
    lines = text.splitlines()
    assert lines[0].startswith(sup.UNIT_MARK)
    # systemd keeps the words apart: the JSON is one argument, the blank in a path is kept.
    assert (
        'ExecStart=/env/bin/ray start --address 10.0.0.1:6379 --resources "{\\"x\\": 1}" --block'
        in lines
    )
    assert 'Environment="RAY_AUTH_TOKEN_PATH=/home/a b/ray_token"' in lines
    for line in ("Restart=on-failure", "User=alice", "WantedBy=multi-user.target"):
        assert line in lines
    assert "StartLimitIntervalSec=0" in lines  # never gives up on a node that keeps failing
    assert f"RestartMaxDelaySec={sup.UNIT_RESTART_MAX_S}" in lines


def test_unit_is_written_once_and_removed_exactly(tmp_path):
    name, text = _unit()
    units = tmp_path / "etc/systemd/system"
    units.mkdir(parents=True)
    (units / "other.service").write_text("[Service]\n")
    assert sup.install_unit(str(tmp_path), name, text) is True
    assert (units / name).read_text() == text and (units / name).stat().st_mode & 0o777 == 0o644
    before = (units / name).stat().st_mtime_ns
    assert sup.install_unit(str(tmp_path), name, text) is False  # the same text: no write
    assert (units / name).stat().st_mtime_ns == before
    assert sorted(p.name for p in units.iterdir()) == sorted([name, "other.service"])
    assert sup.remove_unit(str(tmp_path), name) is True
    assert sup.remove_unit(str(tmp_path), name) is False
    assert [p.name for p in units.iterdir()] == ["other.service"]
    # A unit of that name that llamacluster did not write is neither replaced nor removed.
    (units / name).write_text("[Service]\nExecStart=/bin/true\n")
    with pytest.raises(ValueError, match="not written by llamacluster"):
        sup.install_unit(str(tmp_path), name, text)
    assert sup.remove_unit(str(tmp_path), name) is False


def test_unit_script_runs_from_stdin_with_the_system_python(tmp_path):
    """As the ray stage ships it: the module's source on stdin of `python3 - install-unit`."""
    from cluster.stages.ray import unit_file_command

    name, text = _unit()
    root = str(tmp_path)

    def run(command: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["bash", "-c", command], input=sup.script_source(), capture_output=True, text=True
        )

    install = unit_file_command("install-unit", root, name, text=text, python="python3", sudo="")
    first, second = run(install), run(install)
    assert (first.stdout, second.stdout) == ("changed\n", "unchanged\n"), first.stderr
    assert (tmp_path / sup.UNIT_DIR / name).read_text() == text
    remove = unit_file_command("remove-unit", root, name, python="python3", sudo="")
    assert run(remove).stdout == "changed\n"
    assert not (tmp_path / sup.UNIT_DIR / name).exists()


# `ray start` that leaves a "raylet" daemon (a copy of sleep under that name, naming the temp dir)
# and a second daemon behind in its session, and exits: what the supervisor watches.
FAKE_RAY = """#!/bin/bash
temp=$(printf '%s\\n' "$@" | grep -A1 -x -- --temp-dir | tail -n 1)
echo "fake ray start $(date +%s.%N)" >> "$temp/starts"
cp "$(command -v sleep)" "$temp/raylet"
"$temp/raylet" 300 </dev/null >/dev/null 2>&1 &
bash -c "exec -a 'fake-agent --temp-dir=$temp' sleep 300" </dev/null >/dev/null 2>&1 &
exit 0
"""


def _members(sid: int) -> list[tuple[int, str, str]]:
    return sup.session_members(sid)


@pytest.mark.timeout(90)
def test_supervisor_restarts_a_killed_nodes_ray_and_stops_when_asked(tmp_path):
    env = tmp_path / "env" / "bin"
    env.mkdir(parents=True)
    (env / "python").symlink_to(sys.executable)
    ray = env / "ray"
    ray.write_text(FAKE_RAY)
    ray.chmod(0o755)
    spec = RayClusterSpec(
        name="sup",
        temp_dir=tempfile.mkdtemp(prefix="lcs-", dir="/tmp"),
        token_path=str(write_token_file(tmp_path / "token")),
        nodes=(RayNodeSpec(ip="127.0.0.1", num_gpus=1),),
        ray_bin=str(ray),
        python=str(env / "python"),
    )
    runner = LocalRunner(local_cluster().head)
    cwd = os.getcwd()  # `python -m cluster.supervisor` imports this project
    handle = None
    try:
        os.chdir(Path(__file__).resolve().parents[2])
        handle = start_ray_node(runner, spec, 0, timeout=60, supervise=True)
        sid = handle.session_id
        assert handle.supervised
        assert runner.run(raylet_alive_command(sid, spec.temp_dir)).ok
        leader = [cmd for pid, _, cmd in _members(sid) if pid == sid]
        assert leader and "cluster.supervisor run" in leader[0]
        # Every Ray process of the node dies (by the recorded session, never by name).
        ray_pids = [pid for pid, _, _ in _members(sid) if pid != sid]
        assert len(ray_pids) == 2
        for pid in ray_pids:
            os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        while time.monotonic() - killed < 20:
            again = [p for p, c, _ in _members(sid) if c == "raylet" and p not in ray_pids]
            if again:
                break
            time.sleep(0.2)
        assert again, Path(supervisor_log(spec, spec.nodes[0])).read_text()
        took = time.monotonic() - killed
        assert took < 8, took  # two 1 s looks, then the first backoff (1 s)
        log = Path(supervisor_log(spec, spec.nodes[0])).read_text()
        assert "raylet gone; restarting Ray in 1 s (attempt 1)" in log
        assert "Ray started again (restart 1)" in log
        assert len((Path(spec.temp_dir) / "starts").read_text().splitlines()) == 2
        # `down`: the supervisor by its pid first, then the session; nothing starts again.
        assert stop_ray_node(runner, handle, grace_s=2).ok
        time.sleep(2.5)
        assert _members(sid) == []
        assert len((Path(spec.temp_dir) / "starts").read_text().splitlines()) == 2
    finally:
        os.chdir(cwd)
        if handle is not None:
            stop_ray_node(runner, handle, grace_s=1)
        shutil.rmtree(spec.temp_dir, ignore_errors=True)


def test_supervisor_loop_backs_off_and_starts_over_after_a_good_run():
    """The loop's decisions on a scripted clock: misses before a restart, the growing wait, a
    failed start, and the attempt count reset once Ray stayed up."""
    now = [0.0]
    said: list[str] = []
    alive = iter([True, False, False, False, False, True] + [True] * 200)

    def sleep_until(seconds: float) -> None:
        now[0] += seconds

    starts = iter([1, 0])
    s = sup.Supervisor(
        temp_dir="/tmp/x",
        start=lambda: next(starts),
        alive=lambda: next(alive),
        clean=lambda: None,
        say=said.append,
        interval=1,
        base=1,
        cap=4,
        reset_after=50,
        clock=lambda: now[0],
    )
    s._sleep = sleep_until  # type: ignore[method-assign]  # the scripted clock, no real waits
    ticks = [0]

    def stop_after_alive() -> bool:
        ticks[0] += 1
        if ticks[0] > 80:
            s.stopping = True
        return next(alive)

    s.alive = stop_after_alive
    assert s.loop() == 0
    assert said[0] == "raylet gone; restarting Ray in 1 s (attempt 1)"
    assert said[1] == "ray start failed with exit 1; cleaning up, trying again"
    assert said[2] == "raylet gone; restarting Ray in 2 s (attempt 2)"
    assert said[3] == "Ray started again (restart 1)"
    assert s.restarts == 1
