"""Several replicas behind one endpoint: settings, ports, placement, replica table, /ready?all=1."""

from __future__ import annotations

import asyncio
import json
import os
import stat

import pytest
from ray.serve._private.common import ReplicaState

from cluster.errors import ConfigError, NotReadyError
from serve.app import (
    CONTROL_LOOP_ENV,
    DRAIN_ENV,
    HAPROXY_ENV,
    PORT_MAX_ENV,
    PORT_MIN_ENV,
    controller_env,
    replica_env,
)
from serve.balancer import (
    FILE_ENVS,
    MAX_DIR_CHARS,
    all_ready_app,
    all_ready_verdict,
    balancer_env,
    haproxy_threads,
    private_dir,
    private_dir_path,
    replica_lines,
    replicas_from_details,
    wants_all_replicas,
)
from serve.config import (
    HEAD_RESOURCE,
    NodeSlots,
    balancer_side_ports,
    check_device_slots,
    load_config,
    placement_bundles,
)


def _config(**kw):
    return load_config(model="/m", no_auth=True, device="cpu", port=9000, proxy_port=9002, **kw)


def test_one_replica_keeps_direct_ingress_on_the_endpoint_port():
    cfg = _config()
    env = controller_env(cfg)
    assert (env[PORT_MIN_ENV], env[PORT_MAX_ENV]) == ("9000", "9001")
    assert HAPROXY_ENV not in env and HAPROXY_ENV not in replica_env(cfg)
    assert placement_bundles(cfg)[0][HEAD_RESOURCE] > 0  # the endpoint is on the head
    # Nothing in front to deregister it from: a stopping replica stops at once.
    assert env[DRAIN_ENV] == replica_env(cfg)[DRAIN_ENV] == "0"


def test_the_controller_turns_its_loop_every_half_second_in_both_modes(tmp_path):
    # Serve's default is 0.1 s: each turn calls Ray's GCS and raylet, CPU the engine shares.
    one, several = controller_env(_config()), controller_env(_config(num_replicas=2), str(tmp_path))
    assert one[CONTROL_LOOP_ENV] == several[CONTROL_LOOP_ENV] == "0.5"
    assert CONTROL_LOOP_ENV not in replica_env(_config())  # a controller setting only


def test_replicas_put_haproxy_on_the_endpoint_and_replicas_on_their_own_ports(tmp_path):
    cfg = _config(num_replicas=3)
    env = controller_env(cfg, str(tmp_path))
    assert env[HAPROXY_ENV] == "1" and replica_env(cfg)[HAPROXY_ENV] == "1"
    # A stopping replica stays reachable until HAProxy has reloaded without it.
    assert float(replica_env(cfg)[DRAIN_ENV]) >= 2
    # Replicas take 2N + 2 ports from port + 10 (Serve's maximum is exclusive); Serve's proxy
    # is the fallback.
    assert (env[PORT_MIN_ENV], env[PORT_MAX_ENV]) == ("9010", "9018")
    assert env["RAY_SERVE_FALLBACK_PROXY_HTTP_PORT"] == "9002"
    assert (env["RAY_SERVE_HAPROXY_STATS_PORT"], env["RAY_SERVE_HAPROXY_METRICS_PORT"]) == (
        "9003",
        "9004",
    )
    assert env["RAY_SERVE_HAPROXY_BALANCE_ALGORITHM"] == "leastconn"
    assert "503" in env["RAY_SERVE_HAPROXY_RETRY_ON"].split()
    # Every HAProxy file (the world-writable admin socket included) is inside the private dir.
    assert all(env[name].startswith(f"{tmp_path}/") for name in FILE_ENVS)
    # Replicas are not pinned to the head: they go where their group fits.
    assert placement_bundles(cfg) == [{"CPU": 1.0}, {"GPU": 1.0}]


def test_balancer_env_is_the_controller_env_minus_direct_ingress_basics():
    cfg = _config(num_replicas=2, replica_port_min=20000)
    env = balancer_env(cfg, "/d")
    assert (env[PORT_MIN_ENV], env[PORT_MAX_ENV]) == ("20000", "20006")
    assert cfg.replica_ports == list(range(20000, 20006))
    # HAProxy's threads: half this machine's cores, 1 to 4 (this machine: 2 or more cores).
    assert 1 <= int(env["RAY_SERVE_HAPROXY_NBTHREAD"]) <= 4
    assert [haproxy_threads(n) for n in (1, 2, 3, 8, 64)] == [1, 1, 1, 4, 4]


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        ({"replica_port_min": 9002}, "ports overlap"),  # a replica on the proxy's port
        ({"replica_port_min": 8999}, "ports overlap"),  # ... on the endpoint's
        ({"replica_port_min": 65535}, "65535"),
    ],
)
def test_overlapping_replica_ports_are_refused_in_one_line(extra, words):
    with pytest.raises(ConfigError) as err:
        _config(num_replicas=2, **extra)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_tls_with_several_replicas_reaches_the_balancer(tmp_path):
    from cluster.tls import self_signed
    from serve.haproxy_hooks import TLS_CERT_ENV, TLS_KEY_ENV

    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    self_signed(["127.0.0.1"], cert_path=cert, key_path=key)
    config = _config(num_replicas=2, tls_certfile=cert, tls_keyfile=key)
    env = balancer_env(config, str(tmp_path))
    assert (env[TLS_CERT_ENV], env[TLS_KEY_ENV]) == (str(cert), str(key))
    assert TLS_CERT_ENV not in balancer_env(_config(num_replicas=2), str(tmp_path))
    # Ray's routing step reaches the router in plain HTTP: refused in one line.
    with pytest.raises(ConfigError, match="prefix routing cannot be combined with TLS") as err:
        _config(num_replicas=2, tls_certfile=cert, tls_keyfile=key, routing="prefix")
    assert "\n" not in str(err.value)


def test_side_ports_follow_the_endpoint_port():
    assert balancer_side_ports(_config(num_replicas=2)) == (9003, 9004)


def test_slot_check_counts_every_replica():
    head = NodeSlots(address="10.0.0.1", device_total=2, device_free=2, is_head=True)
    check_device_slots([head], _config(num_replicas=2))
    with pytest.raises(NotReadyError, match="3 replicas of tp=1 × pp=1 needs 3 GPU slots"):
        check_device_slots([head], _config(num_replicas=3))


def test_private_dir_is_short_owned_and_0700():
    path = private_dir_path("app-test", 1)
    assert len(str(path)) <= MAX_DIR_CHARS
    assert private_dir_path("app-test", 1) != private_dir_path("app-test", 2)
    made = private_dir("app-test", 1)
    try:
        for folder in (os.path.dirname(made), made):
            info = os.lstat(folder)
            assert stat.S_IMODE(info.st_mode) == 0o700 and info.st_uid == os.getuid()
        os.chmod(made, 0o755)  # loosened by someone: tightened again
        private_dir("app-test", 1)
        assert stat.S_IMODE(os.lstat(made).st_mode) == 0o700
    finally:
        os.rmdir(made)


def test_private_dir_refuses_a_file_in_its_place():
    path = private_dir_path("app-test-file", 1)
    path.parent.mkdir(mode=0o700, exist_ok=True)
    path.write_text("not a directory")
    try:
        with pytest.raises(ConfigError, match="is not a directory of this user"):
            private_dir("app-test-file", 1)
    finally:
        path.unlink()


def test_replica_table_from_serve_details():
    details = {
        "applications": {
            "llamacluster": {
                "deployments": {
                    "LlamaclusterServer": {
                        "replicas": [
                            {
                                "replica_id": "b",
                                "state": "RUNNING",
                                "node_ip": "10.0.0.2",
                                "pid": 7,
                            },
                            {
                                "replica_id": "a",
                                "state": ReplicaState.STARTING,
                                "node_ip": "10.0.0.1",
                            },
                        ]
                    }
                }
            },
            "other": {"deployments": {"X": {"replicas": [{"replica_id": "z"}]}}},
        }
    }
    rows = replicas_from_details(details, "llamacluster")
    assert [(r.replica_id, r.state, r.pid) for r in rows] == [
        ("a", "STARTING", None),
        ("b", "RUNNING", 7),
    ]
    assert replica_lines([r.__dict__ for r in rows]) == [
        "replica 1 on 10.0.0.1: STARTING",
        "replica 2 on 10.0.0.2 (pid 7): RUNNING",
    ]
    assert replicas_from_details({}, "llamacluster") == []


@pytest.mark.parametrize(
    ("method", "path", "query", "wanted"),
    [
        ("GET", "/ready", b"all=1", True),
        ("HEAD", "/ready", b"x=2&all=true", True),
        ("GET", "/ready", b"", False),
        ("GET", "/ready", b"all=0", False),
        ("POST", "/ready", b"all=1", False),
        ("GET", "/health", b"all=1", False),
    ],
)
def test_which_requests_ask_every_replica(method, path, query, wanted):
    scope = {"type": "http", "method": method, "path": path, "query_string": query}
    assert wants_all_replicas(scope) is wanted


def test_all_ready_verdict():
    assert all_ready_verdict([200, 200], 2) == (True, "all 2 replicas ready")
    assert all_ready_verdict([200, 503, None], 3) == (False, "1 of 3 replicas ready")
    # A replica Serve has not started yet is not ready either.
    assert all_ready_verdict([200], 2) == (False, "1 of 2 replicas ready")


async def _call(app, scope):
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    await app(scope, receive, send)
    return sent


def test_all_ready_app_passes_other_requests_and_answers_503_without_a_controller():
    seen = []

    async def gateway(scope, receive, send):
        seen.append(scope["path"])
        await send({"type": "http.response.start", "status": 204, "headers": []})

    app = all_ready_app(gateway, _config(num_replicas=2))
    plain = {"type": "http", "method": "GET", "path": "/v1/models", "query_string": b""}
    assert asyncio.run(_call(app, plain))[0]["status"] == 204 and seen == ["/v1/models"]
    # No Ray here: the replica table is unavailable, so not known to be ready.
    every = {"type": "http", "method": "GET", "path": "/ready", "query_string": b"all=1"}
    start, body = asyncio.run(_call(app, every))
    assert start["status"] == 503 and (b"retry-after", b"1") in start["headers"]
    assert "replica table is unavailable" in json.loads(body["body"])["error"]["message"]
    assert seen == ["/v1/models"]


def test_up_names_the_layout_with_its_replicas():
    from cluster.stages.serve import layout_text

    assert layout_text(2, 1, 1) == "tp=2 × pp=1"
    assert layout_text(2, 1, 3) == "3 replicas of tp=2 × pp=1"
