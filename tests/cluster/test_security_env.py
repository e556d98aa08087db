"""The code nodes run: src/ and env/ on the shared dir are ours and closed to others, and an
env whose Ray predates the pinned floor is refused (real bash, a real venv)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.version import Version
from rich.console import Console

from cluster.errors import ConfigError
from cluster.inventory import parse_inventory, with_local
from cluster.runner import LocalRunner
from cluster.stages.base import Reporter, UpContext
from cluster.stages.config import UpConfig
from cluster.stages.env import (
    SharedEnv,
    check_ray_version,
    project_root,
    ray_floor,
    shared_dirs_guard,
)
from cluster.state import ClusterState


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMACLUSTER_HOME", str(tmp_path / "home"))


def _guard(shared: Path, *, create: bool) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-c", shared_dirs_guard(str(shared), create=create)],
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_missing_dirs_are_made_0755_and_ours_pass(tmp_path):
    assert _guard(tmp_path, create=False).returncode == 0
    assert not (tmp_path / "env").exists()
    done = subprocess.run(
        ["bash", "-c", f"umask 000\n{shared_dirs_guard(str(tmp_path), create=True)}"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    for d in ("src", "env"):
        assert (tmp_path / d).stat().st_mode & 0o777 == 0o755
    assert _guard(tmp_path, create=False).returncode == 0


@pytest.mark.parametrize("mode", [0o775, 0o757, 0o777])
def test_dirs_others_may_write_are_refused(tmp_path, mode):
    (tmp_path / "env").mkdir()
    (tmp_path / "env").chmod(mode)
    done = _guard(tmp_path, create=True)
    assert done.returncode == 2 and "writable by others" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert (tmp_path / "env").stat().st_mode & 0o777 == mode


def test_symlinked_or_foreign_dirs_are_refused(tmp_path):
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "src").symlink_to(tmp_path / "elsewhere")
    done = _guard(tmp_path, create=True)
    assert done.returncode == 2 and "is a symlink" in done.stderr
    if os.geteuid() != 0:
        pytest.skip("making a directory of another user needs root")
    (tmp_path / "src").unlink()
    (tmp_path / "src").mkdir(mode=0o755)
    os.chown(tmp_path / "src", 65534, 65534)
    done = _guard(tmp_path, create=True)
    assert done.returncode == 2 and "belongs to uid 65534" in done.stderr


def _ctx(tmp_path: Path, config: UpConfig) -> UpContext:
    cluster = with_local(parse_inventory("127.0.0.1\n127.0.0.2\n"))
    state = ClusterState(name="t", shared_dir=str(tmp_path / "shared"))
    return UpContext(
        config=config,
        cluster=cluster,
        state=state,
        runners=[LocalRunner(n) for n in cluster],
        reporter=Reporter(Console(file=io.StringIO())),
    )


def test_env_stage_runs_nothing_from_a_shared_dir_others_may_write(tmp_path):
    inv = tmp_path / "ips.txt"
    inv.write_text("127.0.0.1\n127.0.0.2\n")
    ctx = _ctx(tmp_path, UpConfig(inventory=inv, shared_dir=tmp_path / "shared"))
    (tmp_path / "shared" / "env").mkdir(parents=True)
    (tmp_path / "shared" / "env").chmod(0o777)
    with pytest.raises(ConfigError, match="writable by others"):
        SharedEnv().run(ctx)
    src = tmp_path / "shared" / "src"
    assert not src.exists() or not list(src.iterdir())  # nothing copied, nothing bootstrapped


def test_ray_floor_is_the_pinned_one_and_older_rays_are_refused():
    floor = ray_floor()
    assert floor is not None and floor >= Version("2.60")
    check_ray_version("/e", str(floor), floor)
    for old in ("2.9.3", "2.59.1", "nonsense"):
        with pytest.raises(ConfigError, match=f"has Ray {old}, older than {floor}"):
            check_ray_version("/e", old, floor)


def test_env_with_an_old_ray_is_refused_in_one_line(tmp_path):
    env = tmp_path / "oldenv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True)
    site = next((env / "lib").glob("python3*/site-packages"))
    (site / "llamacluster-src.pth").write_text(str(project_root()) + "\n")
    for name, version in (("ray", "2.9.3"), ("vllm", "0.32.0")):
        (site / name).mkdir()
        (site / name / "__init__.py").write_text(f"__version__ = {version!r}\n")
    inv = tmp_path / "ips.txt"
    inv.write_text("127.0.0.1\n127.0.0.2\n")
    ctx = _ctx(tmp_path, UpConfig(inventory=inv, env=env, shared_dir=tmp_path / "shared"))
    with pytest.raises(ConfigError) as err:
        SharedEnv().run(ctx)
    line = err.value.one_line()
    assert f"the env {env} has Ray 2.9.3, older than" in line and "\n" not in line
