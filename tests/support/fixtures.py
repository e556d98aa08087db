"""The test bed's pytest fixtures: each starts a real part from tests/support and stops it.

The support modules themselves do not import pytest, so the benchmarks (benchmarks/*.py) use them
in an environment set up by the plain `./bootstrap.sh`, without the test tools.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cluster.demo_model import DEMO_MODEL_REPO_ID, build_demo_model
from tests.support.hub import GATED_REPO_ID, LoopbackHub
from tests.support.netns import NetnsHosts, start_netns_hosts
from tests.support.ray_cluster import LoopbackRayCluster, start_loopback_ray_cluster
from tests.support.server import SHARED_MAX_ONGOING, ApiServer, running_server
from tests.support.sshd import SSHD_BIN, SSHServer, start_sshd, stop_process_tree

# -- the CLI as a person runs it ------------------------------------------------------------------


@pytest.fixture
def cli_env(tmp_path: Path) -> dict[str, str]:
    """The environment a `llamacluster` child process gets in an end-to-end test: a home of
    its own, a small CPU KV cache, wide lines (status tables are read by regex). Modules with
    other needs define their own."""
    env = dict(os.environ)
    env["LLAMACLUSTER_HOME"] = str(tmp_path / "home")
    env["VLLM_CPU_KVCACHE_SPACE"] = "1"
    env["COLUMNS"] = "250"
    return env


# -- hub ---------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def demo_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default tiny demo model (seed 0, 4 shards), built once per test session. Read-only."""
    return build_demo_model(tmp_path_factory.mktemp("demo-model") / "demo-tiny-llama")


@pytest.fixture
def bare_model_dir(tmp_path: Path) -> Path:
    """A directory `up --local` takes for a model (it has a config.json), for runs that never
    load it (dry runs, refusals)."""
    path = tmp_path / "bare-model"
    path.mkdir()
    (path / "config.json").write_text("{}")
    return path


@pytest.fixture(scope="session")
def hub_server(demo_model_dir: Path) -> Iterator[LoopbackHub]:
    """One loopback hub per session serving the demo model and its gated copy."""
    hub = LoopbackHub()
    hub.add_repo(DEMO_MODEL_REPO_ID, demo_model_dir)
    hub.add_repo(GATED_REPO_ID, demo_model_dir, gated=True)
    with hub:
        yield hub


@pytest.fixture
def hub(hub_server: LoopbackHub, monkeypatch: pytest.MonkeyPatch) -> Iterator[LoopbackHub]:
    """The session hub with faults and log cleared, and HF_ENDPOINT pointing at it for this test."""
    from huggingface_hub import constants, hf_api

    hub_server.faults.reset()
    hub_server.clear_log()
    for key, value in hub_server.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    # huggingface_hub reads HF_ENDPOINT once at import: point its module-level defaults here too.
    monkeypatch.setattr(constants, "ENDPOINT", hub_server.url)
    monkeypatch.setattr(
        constants,
        "HUGGINGFACE_CO_URL_TEMPLATE",
        hub_server.url + "/{repo_id}/resolve/{revision}/{filename}",
    )
    monkeypatch.setattr(hf_api.api, "endpoint", hub_server.url)
    yield hub_server
    hub_server.faults.reset()


# -- ray_cluster -------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def ray_cluster_1node() -> Iterator[LoopbackRayCluster]:
    """One loopback Ray node with 2 worker slots, shared by the whole session (API tests)."""
    cluster = start_loopback_ray_cluster(nodes=1, slots_per_node=2)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def make_ray_cluster() -> Iterator[Callable[..., LoopbackRayCluster]]:
    """Factory: ``make_ray_cluster(nodes=2, slots_per_node=2, **kw)`` starts a loopback cluster;
    every cluster it made is stopped when the test ends, passed or failed."""
    made: list[LoopbackRayCluster] = []

    def make(**kwargs) -> LoopbackRayCluster:
        cluster = start_loopback_ray_cluster(**kwargs)
        made.append(cluster)
        return cluster

    try:
        yield make
    finally:
        errors = []
        for cluster in reversed(made):
            try:
                cluster.stop()
            except Exception as exc:  # stop the others anyway, then report
                errors.append(exc)
        if errors:
            raise errors[0]


# -- server ------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def api_server(ray_cluster_1node: Any, demo_model_dir: Path) -> Iterator[ApiServer]:
    """One server per session (tp=1, one replica on the 1-node loopback Ray cluster)."""
    with running_server(
        ray_cluster_1node, demo_model_dir, max_ongoing_requests=SHARED_MAX_ONGOING
    ) as server:
        yield server


# -- netns -------------------------------------------------------------------------------------


def _require_netns() -> None:
    missing = []
    if os.geteuid() != 0:
        missing.append("root (network namespaces and a bridge)")
    if shutil.which("ip") is None:
        missing.append("iproute2 (`apt-get install -y iproute2`)")
    if not SSHD_BIN.exists():
        missing.append(f"{SSHD_BIN} (`apt-get install -y openssh-server`)")
    if not missing:
        return
    reason = "namespace test hosts need " + ", ".join(missing)
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(reason + " (CI must run these tests)")
    pytest.skip(reason)


@pytest.fixture
def netns_hosts() -> Iterator[Callable[..., NetnsHosts]]:
    """Factory: ``netns_hosts(count=2)`` starts namespace nodes; all are removed after the test."""
    _require_netns()
    made: list[NetnsHosts] = []

    def make(count: int = 2) -> NetnsHosts:
        made.append(start_netns_hosts(count))
        return made[-1]

    try:
        yield make
    finally:
        for hosts in made:
            hosts.stop()


# -- sshd --------------------------------------------------------------------------------------


def _require_sshd() -> None:
    if SSHD_BIN.exists():
        return
    reason = f"{SSHD_BIN} not found: install it with `apt-get install -y openssh-server`"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(reason + " (CI must run the SSH tests)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def sshd() -> Iterator[SSHServer]:
    """A real sshd on 127.0.0.2 and 127.0.0.3 (same free port), key-only, for this session."""
    _require_sshd()
    workdir = Path(tempfile.mkdtemp(prefix="lc-sshd-"))
    server = start_sshd(workdir)
    try:
        yield server
    finally:
        stop_process_tree(server.process)
        shutil.rmtree(workdir, ignore_errors=True)
