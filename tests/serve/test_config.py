"""ServeConfig validation, API key sources, placement bundles and the device-slot check."""

from __future__ import annotations

import pytest

from cluster.errors import ConfigError, NotReadyError
from serve.config import (
    API_KEY_ENV,
    DEVICE_RESOURCE,
    HEAD_RESOURCE,
    NodeSlots,
    ServeConfig,
    check_device_slots,
    load_config,
    placement_bundles,
)


@pytest.fixture(autouse=True)
def _no_env_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(API_KEY_ENV, raising=False)


def test_world_size_and_served_name_defaults(tmp_path) -> None:
    model_dir = tmp_path / "my-model"
    model_dir.mkdir()
    config = load_config(model=str(model_dir), tp=2, pp=3, api_keys=["k1"])
    assert config.world_size == 6
    assert config.served_model_name == ["my-model"] and config.main_name == "my-model"
    assert load_config(model="org/name", api_keys=["k"]).served_model_name == ["org/name"]
    assert load_config(model="org/name", served_model_name="x", api_keys=["k"]).main_name == "x"
    aliases = load_config(model="org/name", served_model_name=["a", "b", "a"], api_keys=["k"])
    assert aliases.served_model_name == ["a", "b"] and aliases.main_name == "a"


@pytest.mark.parametrize(
    ("values", "needle"),
    [
        ({"tp": 0}, "--tp: "),
        ({"pp": -1}, "pp"),
        ({"gpu_memory_utilization": 1.5}, "--gpu-memory-utilization: "),
        ({"dtype": "int3"}, "--dtype: "),
        ({"port": 70000}, "port"),
        ({"cpu_kvcache_space_gb": -2, "device": "cpu"}, "--kv-cache-gb: "),
        ({"cpu_kvcache_space_gb": 2}, "set device=cpu"),
        ({"port": 9000, "proxy_port": 9000}, "two different ports"),
        ({"api_keys": [" spaced "]}, "surrounding spaces"),
        ({"no_auth": True}, "pick one"),
        ({"engine_argz": {}}, "--engine-argz: "),
        ({"app_name": "has space"}, "--app-name: "),
        ({"stall_timeout_s": -1}, "--stall-timeout: "),
        ({"restart_max_attempts": -1}, "--restart-attempts: "),
        ({"restart_backoff_s": 10, "restart_backoff_max_s": 5}, "the cap must be at least"),
    ],
)
def test_bad_values_say_what_to_fix(values: dict, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(**{"model": "org/m", "api_keys": ["k"], **values})
    assert needle in err.value.one_line()
    assert err.value.one_line().count("\n") == 0


def test_no_key_needs_explicit_no_auth() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(model="org/m")
    assert "--no-auth" in err.value.one_line()
    assert load_config(model="org/m", no_auth=True).resolved_api_keys() == []


def test_key_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(API_KEY_ENV, "from-env")
    assert load_config(model="org/m").resolved_api_keys() == ["from-env"]


def test_key_file_must_be_private(tmp_path) -> None:
    key_file = tmp_path / "keys"
    key_file.write_text("# team keys\nkey-one\n\nkey-two\n")
    key_file.chmod(0o644)
    with pytest.raises(ConfigError) as err:
        load_config(model="org/m", api_key_file=key_file)
    assert f"chmod 600 {key_file}" in err.value.one_line()
    assert "key-one" not in err.value.one_line()
    key_file.chmod(0o600)
    config = load_config(model="org/m", api_key_file=key_file, api_keys=["flag-key"])
    assert config.resolved_api_keys() == ["flag-key", "key-one", "key-two"]


def test_missing_or_empty_key_file(tmp_path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(model="org/m", api_key_file=tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.write_text("\n# nothing\n")
    empty.chmod(0o600)
    with pytest.raises(ConfigError, match="holds no key"):
        load_config(model="org/m", api_key_file=empty)


def test_keys_do_not_show_in_repr() -> None:
    config = load_config(model="org/m", api_keys=["super-secret-key"])
    assert "super-secret-key" not in repr(config)
    assert "super-secret-key" not in config.model_dump_json()


def test_bundles_pin_engine_to_head_and_add_one_device_bundle_per_worker() -> None:
    config = ServeConfig(model="org/m", tp=2, pp=2, engine_cpus=0.5, api_keys=["k"])
    bundles = placement_bundles(config)
    assert bundles[0] == {"CPU": 0.5, HEAD_RESOURCE: pytest.approx(0.01)}
    assert bundles[1:] == [{DEVICE_RESOURCE: 1.0}] * 4
    assert len(placement_bundles(ServeConfig(model="m", api_keys=["k"]))) == 2
    # Degraded serving: the engine's devices go in a group the replica places itself.
    degraded = config.model_copy(update={"degraded_layout": (2, 1)})
    assert placement_bundles(degraded) == [bundles[0]]


def _node(address: str, total: float, free: float, *, head: bool = False) -> NodeSlots:
    return NodeSlots(address=address, device_total=total, device_free=free, is_head=head)


def test_slot_check_passes_when_enough_are_free() -> None:
    config = ServeConfig(model="m", tp=2, pp=2, api_keys=["k"])
    check_device_slots([_node("10.0.0.1", 2, 2, head=True), _node("10.0.0.2", 2, 2)], config)


def test_slot_check_says_how_many_are_missing_and_where() -> None:
    config = ServeConfig(model="m", tp=2, pp=2, api_keys=["k"])
    nodes = [_node("10.0.0.1", 2, 2, head=True), _node("10.0.0.2", 2, 1)]
    with pytest.raises(NotReadyError) as err:
        check_device_slots(nodes, config)
    line = err.value.one_line()
    assert "needs 4" in line and "has 3 free" in line and "1 missing" in line
    assert "10.0.0.1 (head): 2 free of 2" in line and "10.0.0.2: 1 free of 2" in line


def test_slot_check_needs_the_head_resource() -> None:
    config = ServeConfig(model="m", api_keys=["k"])
    with pytest.raises(NotReadyError, match=HEAD_RESOURCE):
        check_device_slots([_node("10.0.0.1", 4, 4)], config)


def test_no_plaintext_key_reaches_the_replica() -> None:
    """Ray stores a deployment's constructor arguments: only key digests may be among them."""
    import pickle

    from serve.api import key_digest
    from serve.app import build_application

    config = load_config(model="org/m", api_keys=["sk-secret-flag-key"])
    app = build_application(config, config.resolved_api_keys())
    bound = app._bound_deployment
    blob = pickle.dumps((bound.init_args, bound.init_kwargs))
    assert b"sk-secret-flag-key" not in blob
    assert bound.init_args[1] == [key_digest("sk-secret-flag-key")]
    assert bound.init_args[0].api_keys == [] and bound.init_args[0].api_key_file is None


def test_a_deploy_names_the_version_its_replicas_run() -> None:
    """Serve keeps the replicas of the version it is deployed as and restarts the others: the
    version given reaches the deployment Serve builds, and without one each build is new."""
    from ray.serve._private.build_app import build_app

    from serve.app import build_application

    config = load_config(model="org/m", api_keys=["k"])
    keys = config.resolved_api_keys()

    def built(version: str | None) -> str | None:
        app = build_app(build_application(config, keys, version), name=config.app_name)
        (deployment,) = app.deployments
        return deployment.version

    assert built("3f2a9c01") == "3f2a9c01"
    fresh = {built(None) for _ in range(3)}
    assert len(fresh) == 3 and None not in fresh
