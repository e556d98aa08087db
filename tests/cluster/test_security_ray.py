"""The Ray temp dir at its fixed /tmp path: ours, 0700, no symlinks followed (real bash, fake ray)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import pytest

from cluster.errors import RemoteError
from cluster.ray_nodes import (
    auth_probe_command,
    start_ray_node,
    start_supervised_command,
    stop_ray_node,
    temp_dir_guard,
    unauthenticated_access,
)
from cluster.runner import LocalRunner
from tests.cluster.test_ray_nodes import _fake_spec


def _bash(script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=30)


@pytest.fixture
def temp_root():
    root = Path(tempfile.mkdtemp(prefix="lcs-", dir="/tmp"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


def test_temp_dir_is_created_0700_and_tightened_when_ours(temp_root):
    fresh = temp_root / "fresh"
    done = _bash(f"umask 000\n{temp_dir_guard(str(fresh))}")
    assert done.returncode == 0, done.stderr
    assert fresh.stat().st_mode & 0o777 == 0o700
    loose = temp_root / "loose"
    loose.mkdir(mode=0o777)
    loose.chmod(0o777)
    assert _bash(temp_dir_guard(str(loose))).returncode == 0
    assert loose.stat().st_mode & 0o777 == 0o700


def test_symlinked_or_foreign_temp_dir_is_refused_in_one_line(temp_root):
    elsewhere = temp_root / "elsewhere"
    elsewhere.mkdir(mode=0o755)
    link = temp_root / "link"
    link.symlink_to(elsewhere)
    done = _bash(temp_dir_guard(str(link)))
    assert done.returncode == 2 and "is a symlink: refusing it" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert elsewhere.stat().st_mode & 0o777 == 0o755  # not tightened through the link
    if os.geteuid() == 0:
        foreign = temp_root / "foreign"
        foreign.mkdir(mode=0o755)
        os.chown(foreign, 65534, 65534)
    else:
        foreign = Path("/")  # root's: never ours, and not changeable by this user
    done = _bash(temp_dir_guard(str(foreign)))
    assert done.returncode == 2 and "belongs to uid" in done.stderr
    if os.geteuid() == 0:
        assert foreign.stat().st_mode & 0o777 == 0o755


@pytest.mark.timeout(60)
def test_start_refuses_a_symlinked_log_and_leaves_its_target_alone(tmp_path):
    spec = _fake_spec(tmp_path, nodes=1)
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    temp = Path(spec.temp_dir)
    try:
        (temp / "llamacluster-start-127.0.0.1.log").symlink_to(victim)
        with pytest.raises(RemoteError, match="is a symlink: refusing to write through it"):
            start_ray_node(LocalRunner(), spec, 0)
        assert victim.read_text() == "precious\n"
        (temp / "llamacluster-start-127.0.0.1.log").unlink()
        (temp / "llamacluster-127.0.0.1.sid").symlink_to(victim)
        with pytest.raises(RemoteError, match="is a symlink"):
            start_ray_node(LocalRunner(), spec, 0)
        assert victim.read_text() == "precious\n"
        (temp / "llamacluster-127.0.0.1.sid").unlink()
        status = temp / "llamacluster-supervisor-127.0.0.1.status"
        status.symlink_to(victim)
        done = _bash(start_supervised_command(spec, 0, timeout=5))
        assert done.returncode == 2 and "is a symlink" in done.stderr
        assert victim.read_text() == "precious\n" and status.is_symlink()
        status.unlink()
        handle = start_ray_node(LocalRunner(), spec, 0)  # nothing in the way: it starts
        assert temp.stat().st_mode & 0o777 == 0o700
        assert stop_ray_node(LocalRunner(), handle, grace_s=1).ok
    finally:
        subprocess.run(["rm", "-rf", spec.temp_dir], check=False)


def test_the_auth_probe_reports_whatever_answers_without_a_token():
    refused = '{"agents": {"http://10.0.0.1:52365/x": 401}, "gcs": "UNAUTHENTICATED"}'
    assert unauthenticated_access(refused) == []
    open_ = (
        '{"agents": {"http://10.0.0.1:52365/x": 200, "http://10.0.0.2:52365/x": 403}, "gcs": "OK"}'
    )
    problems = unauthenticated_access(open_)
    assert len(problems) == 2 and "10.0.0.1:52365/x answered 200" in problems[0]
    assert "GCS answered OK" in problems[1]
    assert unauthenticated_access("Traceback ...")[0].startswith("the probe printed no result")


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_real_ray_refuses_the_agent_and_the_gcs_without_a_token(make_ray_cluster):
    cluster = make_ray_cluster(nodes=1, slots_per_node=1)
    spec = replace(cluster.spec, python=sys.executable)
    done = LocalRunner().run(auth_probe_command(spec), env=cluster.env, timeout=120)
    assert done.ok, done.tail(10)
    assert unauthenticated_access(done.stdout) == [], done.stdout
    # The same probe against a closed agent port says so (it can fail).
    closed = replace(
        spec,
        nodes=tuple(
            replace(n, ports=replace(n.ports, dashboard_agent_listen=1)) for n in spec.nodes
        ),
    )
    started = time.monotonic()
    done = LocalRunner().run(auth_probe_command(closed, agent_wait_s=3), timeout=120)
    assert time.monotonic() - started >= 3  # a refused connection is tried again for a while
    assert "unreachable" in unauthenticated_access(done.stdout)[0]
