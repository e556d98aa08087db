"""`llamacluster up` end to end: --local (tp=1; key changes applied without a redeploy) and over
SSH to two loopback nodes (tp=2 × pp=2, two engine workers on each node)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster.demo_model import DEMO_MODEL_REPO_ID
from cluster.keys import read_api_key
from tests.support.server import seconds_until_status

pytestmark = pytest.mark.e2e

VENV = Path(sys.prefix)
CLI = [sys.executable, "-c", "from cluster.cli.app import run; run()"]


def llamacluster(
    *args: str, env: dict[str, str], timeout: float = 900
) -> subprocess.CompletedProcess:
    """Run the real CLI in a child process (as a person would) and return what it printed."""
    return subprocess.run(
        [*CLI, *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def _ok(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 0, (
        f"exit {done.returncode}\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    )
    return done.stdout


def _state(home: Path, name: str) -> dict:
    return json.loads((home / "clusters" / name / "state.json").read_text())


def _session_processes(session_ids: list[int]) -> list[str]:
    """Live processes of the given sessions (zombies awaiting their reaper do not count)."""
    out = subprocess.run(["ps", "-eo", "sid=,stat=,pid=,args="], capture_output=True, text=True)
    return [
        line
        for line in out.stdout.splitlines()
        if line.split()
        and int(line.split()[0]) in session_ids
        and not line.split()[1].startswith("Z")
    ]


def _sessions(state: dict) -> list[int]:
    """The Ray session ids `up` recorded, head first."""
    return [r["session"] for r in state["ray"]["nodes"].values() if r.get("session")]


def _chat_stream(state: dict, model: str | None = None) -> str:
    from openai import OpenAI

    key = Path(state["secrets"]["api_key_file"]).read_text().strip()
    client = OpenAI(base_url=state["server"]["endpoint"] + "/v1", api_key=key, timeout=120)
    stream = client.chat.completions.create(
        model=model or state["server"]["served_name"],
        messages=[{"role": "user", "content": "Hello"}],
        max_tokens=12,
        stream=True,
    )
    chunks = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert len(chunks) >= 2, chunks
    return "".join(chunks)


# Where each vLLM worker actor runs (node address), from Ray's state API on the head's dashboard
# (bound to 127.0.0.1 there; the loopback nodes share this machine's loopback).
WORKER_NODES_SNIPPET = """
import json, sys
from ray.util.state import list_actors, list_nodes
url = sys.argv[1]
nodes = {n.node_id: n.node_ip for n in list_nodes(address=url)}
workers = [a for a in list_actors(address=url, filters=[("state", "=", "ALIVE")], limit=1000)
           if "Worker" in a.class_name and "ServeReplica" not in a.class_name]
print(json.dumps(sorted(nodes.get(a.node_id, "?") for a in workers)))
"""


def _worker_nodes(state: dict) -> list[str]:
    """The node address of every live vLLM worker actor of the cluster, sorted."""
    env = {**os.environ, "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN_PATH": state["secrets"]["ray_token"]}  # fmt: skip
    url = f"http://127.0.0.1:{state['ports']['dashboard']}"
    done = subprocess.run([sys.executable, "-c", WORKER_NODES_SNIPPET, url], env=env,
                          capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _model_ids(state: dict) -> list[str]:
    from openai import OpenAI

    key = Path(state["secrets"]["api_key_file"]).read_text().strip()
    client = OpenAI(base_url=state["server"]["endpoint"] + "/v1", api_key=key, timeout=60)
    return [m.id for m in client.models.list().data]


def _bring_down_and_check(home: Path, name: str, env: dict[str, str]) -> None:
    sessions = _sessions(_state(home, name))
    monitor = _state(home, name)["monitoring"].get("pid")
    sessions += [monitor] if monitor else []  # the monitor's Prometheus: its own session
    if not sessions:
        return  # already down
    try:
        down = _ok(llamacluster("down", "--name", name, env=env, timeout=300))
        assert "is down" in down
        assert _session_processes(sessions) == []
        assert _sessions(_state(home, name)) == []
        assert _state(home, name)["monitoring"].get("pid") is None
    finally:
        _kill_sessions(sessions)  # whatever `down` left of the sessions this test started


def _kill_sessions(session_ids: list[int]) -> None:
    """KILL the live processes of the given Ray sessions (only those this test started)."""
    for line in _session_processes(session_ids):
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(line.split()[2]), signal.SIGKILL)


@pytest.fixture
def cli_env(tmp_path) -> dict[str, str]:
    env = dict(os.environ)
    env["LLAMACLUSTER_HOME"] = str(tmp_path / "home")
    env["VLLM_CPU_KVCACHE_SPACE"] = "1"
    return env


def _wait_for_status(endpoint: str, key: str, status: int, *, limit_s: float = 10) -> float:
    """Seconds until GET /v1/models with ``key`` answers ``status``."""
    return seconds_until_status(f"{endpoint}/v1", key, status, limit_s=limit_s, poll_s=0.1)


def _keys_reach_the_server_without_a_redeploy(home: Path, args: list[str], env: dict) -> None:
    """A hand-edited key file and a second `up`, then `llamacluster keys add/revoke`, each
    applied to the running server without a redeploy."""
    state = _state(home, "local")
    endpoint, key_file = state["server"]["endpoint"], Path(state["secrets"]["api_key_file"])
    first = read_api_key(key_file)
    assert _wait_for_status(endpoint, first, 200) < 1

    key_file.write_text("sk-by-hand-0123456789\n")
    again = _ok(llamacluster("up", *args, env=env))
    assert "API keys updated (1 accepted, no redeploy)" in again, again
    assert "redeployed" not in again
    assert _wait_for_status(endpoint, first, 401, limit_s=5) < 5
    assert _wait_for_status(endpoint, "sk-by-hand-0123456789", 200, limit_s=5) < 5

    added = llamacluster("keys", "add", "ci", "--local", env=env)
    secret = _ok(added).strip()
    assert "applied" in added.stderr and secret not in added.stderr
    assert _wait_for_status(endpoint, secret, 200, limit_s=5) < 5
    _ok(llamacluster("keys", "revoke", "ci", "--local", env=env))
    assert _wait_for_status(endpoint, secret, 401, limit_s=5) < 5
    assert _wait_for_status(endpoint, "sk-by-hand-0123456789", 200, limit_s=1) < 1

    listed = _ok(llamacluster("keys", "list", "--local", env=env))
    assert "key-1" in listed and "sk-by-hand" not in listed
    assert "nothing changed" in _ok(llamacluster("up", *args, env=env))


@pytest.mark.timeout(1200)
def test_up_local_serves_and_is_idempotent(tmp_path, cli_env, demo_model_dir):
    home = Path(cli_env["LLAMACLUSTER_HOME"])
    common = ["--local", "--model", str(demo_model_dir), "--tp", "1", "--pp", "1"]
    ports = ["--ray-port", "0", "--dashboard-port", "0", "--api-port", "0", "--cpu-kvcache-gb", "1"]
    ports += ["--monitor-port", "0"]
    try:
        first = _ok(llamacluster("up", *common, *ports, env=cli_env))
        assert "skipped" in first and "--local" in first  # storage/cache said so
        assert "ready" in first and "API key" in first
        state = _state(home, "local")
        # The monitor's Prometheus scrapes Ray and the server (through the key file).
        assert state["monitoring"]["pid"] and "monitor:  Prometheus http://127.0.0.1:" in first
        # A local directory is served under the directory's name.
        assert state["server"]["served_name"] == demo_model_dir.name
        assert _model_ids(state) == [demo_model_dir.name]
        assert _chat_stream(state)
        second = _ok(llamacluster("up", *common, *ports, env=cli_env))
        assert "nothing changed" in second, second
        status = _ok(llamacluster("status", "--local", env=cli_env, timeout=300))
        assert "ready" in status and "running" in status
        assert "monitor:  ok prometheus" in status, status
        # `up` does not wait for the first scrapes; `status` shows them within an interval.
        deadline = time.monotonic() + 60
        while not ("server 1/1" in status and "prometheus 1/1" in status):
            assert time.monotonic() < deadline, status
            time.sleep(3)
            status = _ok(llamacluster("status", "--local", env=cli_env, timeout=300))
        _keys_reach_the_server_without_a_redeploy(home, [*common, *ports], cli_env)
        sessions = _sessions(_state(home, "local"))
        # A changed serving config redeploys the server only: Ray keeps its sessions.
        # Aliases: vLLM's spelling of the flag, repeated; the first name is the main one.
        names = ["--served-model-name", "tiny", "--served-model-name", "tiny-alias"]
        third = _ok(
            llamacluster("up", *common, *ports, "--max-model-len", "512", *names, env=cli_env)
        )
        assert "redeployed" in third and "changed: serve" in third, third
        assert _sessions(_state(home, "local")) == sessions
        state = _state(home, "local")
        assert (state["server"]["served_name"], state["server"]["aliases"]) == (
            "tiny",
            ["tiny-alias"],
        )
        assert sorted(_model_ids(state)) == ["tiny", "tiny-alias"]
        assert _chat_stream(state)
        assert _chat_stream(state, model="tiny-alias")
        logs = _ok(llamacluster("logs", "--local", "-n", "5", env=cli_env, timeout=120))
        assert logs.strip()
        tunnel = _ok(llamacluster("tunnel", "--local", env=cli_env))
        assert (
            "no tunnel needed" in tunnel
            and Path(state["secrets"]["api_key_file"]).read_text().strip() not in tunnel
        )
    finally:
        if (home / "clusters" / "local" / "state.json").exists():
            _bring_down_and_check(home, "local", cli_env)


@pytest.mark.timeout(1800)
def test_up_over_ssh_two_loopback_nodes_tp2_pp2(tmp_path, cli_env, sshd, hub_server):
    home = Path(cli_env["LLAMACLUSTER_HOME"])
    cli_env.update(hub_server.env())
    inventory = tmp_path / "ips.txt"
    inventory.write_text(
        f"{sshd.user}@127.0.0.2:{sshd.port}   # head\n{sshd.user}@127.0.0.3:{sshd.port}\n"
    )
    shared = tmp_path / "shared"
    root = tmp_path / "sysroot"
    (root / "etc").mkdir(parents=True)
    fstab = f"nfs.example:/export {shared} nfs4 rw,hard 0 0\n"
    (root / "etc" / "fstab").write_text(fstab)
    name = "e2e-ssh"
    args = [
        "--ips", str(inventory), "--name", name, "--ssh-key", str(sshd.client_key),
        "--known-hosts", str(tmp_path / "known_hosts"), "--model", DEMO_MODEL_REPO_ID,
        "--shared-dir", str(shared), "--env", str(VENV), "--system-root", str(root),
        "--tp", "2", "--pp", "2", "--cpu-slots", "2", "--cpu-kvcache-gb", "1",
        "--ray-port", "0", "--dashboard-port", "0", "--api-port", "0", "--monitor-port", "0",
    ]  # fmt: skip
    try:
        first = _ok(llamacluster("up", *args, env=cli_env, timeout=1500))
        assert "already shared" in first  # the storage stage on a local path
        assert "fsc" in (root / "etc" / "fstab").read_text()  # cache stage, temp-root mode
        state = _state(home, name)
        # A hub model is served under its repo id, the name every OpenAI client sends.
        assert state["server"]["served_name"] == DEMO_MODEL_REPO_ID
        assert _model_ids(state) == [DEMO_MODEL_REPO_ID]
        assert [n["private_ip"] for n in state["nodes"]] == ["127.0.0.2", "127.0.0.3"]
        assert (state["server"]["tp"], state["server"]["pp"]) == (2, 2)
        assert _chat_stream(state)
        # Four engine workers, two on each node: the pipeline spans the nodes.
        assert _worker_nodes(state) == ["127.0.0.2"] * 2 + ["127.0.0.3"] * 2
        second = _ok(llamacluster("up", *args, env=cli_env, timeout=900))
        assert "nothing changed" in second, second
        status = _ok(llamacluster("status", "--name", name, env=cli_env, timeout=300))
        assert status.count("ray running") == 2
        ran = _ok(
            llamacluster(
                "exec", "--name", name, "--", "echo", "hi-from-$SSH_CONNECTION", env=cli_env
            )
        )
        assert "[127.0.0.2" in ran and "[127.0.0.3" in ran
        _bring_down_and_check(home, name, cli_env)
        purged = _ok(llamacluster("down", "--name", name, "--purge", env=cli_env, timeout=300))
        assert "purged" in purged
        assert (root / "etc" / "fstab").read_text() == fstab  # restored from the backup
        assert not (home / "clusters" / name).exists()
    finally:
        if (home / "clusters" / name / "state.json").exists():
            _bring_down_and_check(home, name, cli_env)


@pytest.mark.timeout(2400)
def test_up_installs_the_shared_env_from_the_project(tmp_path, cli_env, sshd, demo_model_dir):
    """Without --env, `up` copies the project to <shared>/src and runs its bootstrap.sh into
    <shared>/env once from the head; every node then imports vLLM and Ray from there."""
    inventory = tmp_path / "ips.txt"
    inventory.write_text(
        f"{sshd.user}@127.0.0.2:{sshd.port}   # head\n{sshd.user}@127.0.0.3:{sshd.port}\n"
    )
    shared = tmp_path / "shared"
    name = "e2e-env"
    args = [
        "--ips", str(inventory), "--name", name, "--ssh-key", str(sshd.client_key),
        "--known-hosts", str(tmp_path / "known_hosts"), "--model", str(demo_model_dir),
        "--shared-dir", str(shared), "--device", "cpu", "--cpu-slots", "1",
        "--skip", "cache", "--skip", "download", "--skip", "ray", "--skip", "serve",
        "--skip", "ready",
    ]  # fmt: skip
    try:
        _up_installs_then_changes_nothing(args, shared, cli_env)
    finally:
        shutil.rmtree(shared, ignore_errors=True)  # a few GB: not left for pytest to keep


def _up_installs_then_changes_nothing(args: list[str], shared: Path, cli_env: dict) -> None:
    first = _ok(llamacluster("up", *args, env=cli_env, timeout=2200))
    assert f"installed: {shared}/env" in first, first
    assert (shared / "src" / "pyproject.toml").read_bytes() == (
        Path(__file__).resolve().parents[2] / "pyproject.toml"
    ).read_bytes()
    assert first.count("vllm 0.32") >= 2  # both nodes import it from the shared env
    versions = subprocess.run(
        [str(shared / "env" / "bin" / "python"), "-c", "import vllm, ray; print(vllm.__file__)"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert versions.startswith(str(shared / "env"))
    second = _ok(llamacluster("up", *args, env=cli_env, timeout=900))
    assert f"up to date: {shared}/env" in second and "nothing changed" in second, second
