"""When a new config rolls out over the running app, and what `up` records for a rollback."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster.stages.serve import deploy_timeout_s, rolling_update
from cluster.state import ServerSection
from serve.config import ServeConfig
from serve.rollout import failure_reason, first_line, front_digest, front_of


def _config(**changes) -> ServeConfig:
    return ServeConfig(model="/models/a", no_auth=True, port=8000, proxy_port=8002).model_copy(
        update=changes
    )


@pytest.mark.parametrize(
    "changes",
    [
        {"model": "/models/b"},
        {"served_model_name": ["chat"]},
        {"tp": 2, "pp": 2},
        {"max_model_len": 4096},
        {"engine_args": {"enable_prefix_caching": False}},
        {"retry_after_s": 9},
    ],
)
def test_engine_and_gateway_changes_keep_the_front(changes):
    assert front_digest(_config(**changes)) == front_digest(_config())


@pytest.mark.parametrize(
    "changes",
    [
        {"port": 9000},
        {"proxy_port": 9002},
        {"host": "127.0.0.1"},
        {"tls_certfile": Path("/c.pem"), "tls_keyfile": Path("/k.pem")},
        {"num_replicas": 2},
    ],
)
def test_endpoint_changes_change_the_front(changes):
    assert front_digest(_config(**changes)) != front_digest(_config())


def test_with_replicas_the_retry_after_of_haproxy_s_own_503_is_in_the_front():
    # HAProxy's error page is written when its manager starts: a new Retry-After needs Serve
    # restarted. With one replica the gateway alone says it, and a rolling update applies it.
    assert front_digest(_config(num_replicas=2, retry_after_s=9)) != front_digest(
        _config(num_replicas=2)
    )


def test_replica_count_changes_the_port_range_in_the_front():
    two, three = _config(num_replicas=2), _config(num_replicas=3)
    assert front_of(two)["env"] != front_of(three)["env"]
    assert front_digest(two) != front_digest(three)


def test_rolling_update_needs_the_same_front_and_the_previous_config():
    front = front_digest(_config())
    deployed = {"model": "/models/a"}
    assert rolling_update(
        ServerSection(config_digest="x", front_digest=front, deployed=deployed), front
    )
    # A state from before rolling updates (no front or no deployed config): stop and deploy.
    assert not rolling_update(ServerSection(config_digest="x", deployed=deployed), front)
    assert not rolling_update(ServerSection(config_digest="x", front_digest=front), front)
    assert not rolling_update(ServerSection(front_digest=front, deployed=deployed), front)
    assert not rolling_update(
        ServerSection(config_digest="x", front_digest="other", deployed=deployed), front
    )


def test_deploy_timeout_grows_with_replicas_started_one_after_another():
    assert deploy_timeout_s(300, 1) == 600
    assert deploy_timeout_s(600, 1) == 720
    assert deploy_timeout_s(600, 3) == 1920


def test_first_line_picks_the_exception_out_of_serve_s_message():
    message = (
        "Deploying application llamacluster failed: Failed to update the deployments "
        "['LlamaclusterServer'].\n\nTraceback (most recent call last):\n  File \"x.py\", line 1\n"
        "    raise ValueError(...)\nRuntimeError: the engine did not start: "
        "SafetensorError: Error while deserializing header: incomplete metadata\n"
    )
    assert first_line(message).startswith("RuntimeError: the engine did not start: Safetensor")
    assert first_line("plain reason") == "plain reason"
    assert first_line("") == ""
    assert len(first_line("x" * 1000 + "Error")) == 300


def test_failure_reason_without_a_cluster_is_serve_s_own_sentence():
    exc = RuntimeError(
        "Deploying application llamacluster failed: Failed to update the deployments "
        "['LlamaclusterServer']."
    )
    assert failure_reason(exc) == str(exc)
    with_trace = RuntimeError("failed:\nTraceback (most recent call last):\nValueError: bad shard")
    assert failure_reason(with_trace) == "ValueError: bad shard"
