"""Cluster state on the controller: round trip, permissions, names, secrets."""

from __future__ import annotations

import stat

import pytest

from cluster import state as st
from cluster.errors import ConfigError


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMACLUSTER_HOME", str(tmp_path / "home"))


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_round_trip_and_permissions():
    s = st.ClusterState(name="demo-1", access=st.Access(local=True), shared_dir="/tmp/x")
    s.nodes.append(st.NodeState(name="head", label="127.0.0.2", host="127.0.0.2"))
    s.ray.nodes["head"] = st.RayNode(session=1234, temp_dir="/tmp/lc-x")
    s.ports = st.Ports(ray_gcs=6379, dashboard=8265, api=8000)
    s.stages["preflight"] = st.StageResult(status="done", message="2 nodes", seconds=1.5)
    path = s.save()
    assert _mode(path) == 0o600
    assert _mode(path.parent) == 0o700
    back = st.load_state("demo-1")
    assert back.model_dump(exclude={"updated_at"}) == s.model_dump(exclude={"updated_at"})
    assert back.ray.node("head").session == 1234 and back.local
    assert back.format == st.STATE_FORMAT
    assert st.list_clusters() == ["demo-1"]
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temp left over
    st.remove_state("demo-1")
    assert st.find_state("demo-1") is None


def test_missing_and_corrupt_state_are_config_errors():
    with pytest.raises(ConfigError, match="no cluster named 'nope'"):
        st.load_state("nope")
    d = st.ensure_private_dir(st.cluster_dir("broken"))
    (d / st.STATE_FILE).write_text("{not json")
    with pytest.raises(ConfigError, match="unreadable"):
        st.load_state("broken")


def test_bad_names_are_refused():
    for bad in ("", "../x", "a b", "-x", "x" * 64):
        with pytest.raises(ConfigError):
            st.check_cluster_name(bad)


def test_default_names(tmp_path):
    assert st.default_cluster_name(None) == "local"
    a = st.default_cluster_name(tmp_path / "proj" / "deploy" / "ips.txt")
    b = st.default_cluster_name(tmp_path / "other" / "proj" / "deploy" / "ips.txt")
    assert a.startswith("proj-") and b.startswith("proj-") and a != b
    assert st.default_cluster_name(tmp_path / "gpus.txt").startswith("gpus-")
    assert st.check_cluster_name(a) == a


def test_secrets_are_created_once_0600():
    path = st.cluster_dir("c") / st.API_KEY_FILE
    created_path, created = st.ensure_secret(path, prefix="sk-")
    assert created and _mode(created_path) == 0o600
    value = path.read_text()
    assert value.startswith("sk-") and len(value.strip()) == 3 + 64
    _, again = st.ensure_secret(path, prefix="sk-")
    assert not again and path.read_text() == value


def test_config_hash_is_stable_and_sensitive():
    assert st.config_hash({"a": 1, "b": [1, 2]}) == st.config_hash({"b": [1, 2], "a": 1})
    assert st.config_hash({"a": 1}) != st.config_hash({"a": 2})
