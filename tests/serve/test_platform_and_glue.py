"""The CPU platform plugin as vLLM loads it, and the vLLM version pin / argument mapping."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import entry_points

import pytest

from cluster.errors import ConfigError
from serve.config import ServeConfig

# vLLM resolves its platform once per process, so each check runs in a fresh interpreter.
PLATFORM_SNIPPET = (
    "from vllm.platforms import current_platform as p; "
    "print(type(p).__module__ + '.' + type(p).__name__, p.ray_device_key or '-', p.device_type)"
)


def _platform_in_child(**env: str) -> list[str]:
    import os

    out = subprocess.run(
        [sys.executable, "-c", PLATFORM_SNIPPET],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return out.stdout.strip().splitlines()[-1].split()


def test_entry_point_is_registered() -> None:
    names = {ep.name: ep.value for ep in entry_points(group="vllm.platform_plugins")}
    assert names.get("llamacluster_cpu") == "serve.platform:activate"


def test_activate_picks_the_ray_cpu_platform_on_this_cpu_host(monkeypatch) -> None:
    from serve import platform

    monkeypatch.delenv(platform.DISABLE_ENV, raising=False)
    assert platform.activate() == "serve.platform.RayCpuPlatform"
    monkeypatch.setenv(platform.DISABLE_ENV, "0")
    assert platform.activate() is None


# Slow (a fresh interpreter imports vLLM twice), so it runs with the engine tier.
@pytest.mark.engine
@pytest.mark.timeout(300)
def test_vllm_uses_the_plugin_and_it_can_be_switched_off() -> None:
    name, ray_key, device = _platform_in_child()
    assert (name, ray_key, device) == ("serve.platform.RayCpuPlatform", "GPU", "cpu")
    name, ray_key, _ = _platform_in_child(LLAMACLUSTER_CPU_PLATFORM="0")
    assert name == "vllm.platforms.cpu.CpuPlatform" and ray_key == "-"


def test_vllm_version_pin() -> None:
    from serve.vllm_glue import check_vllm_version, installed_vllm_version

    assert check_vllm_version().startswith("0.32.")
    assert installed_vllm_version() == check_vllm_version()
    assert check_vllm_version("0.32.7") == "0.32.7"
    for wrong in ("0.31.2", "0.33.0", "0.320.1"):
        with pytest.raises(ConfigError, match=r"needs vLLM 0\.32\.x"):
            check_vllm_version(wrong)


def test_config_maps_to_vllm_flags() -> None:
    from serve.vllm_glue import parse_vllm_args, vllm_cli_args

    config = ServeConfig(
        model="/models/m",
        tp=2,
        pp=2,
        max_model_len=512,
        api_keys=["k"],
        engine_args={"enforce_eager": True, "seed": 3, "disable_log_stats": False},
    )
    flags = vllm_cli_args(config)
    assert flags[flags.index("--tensor-parallel-size") + 1] == "2"
    assert "--enforce-eager" in flags and "--disable-log-stats" not in flags
    args = parse_vllm_args(config)
    assert (args.tensor_parallel_size, args.pipeline_parallel_size) == (2, 2)
    assert args.distributed_executor_backend == "ray"
    assert args.served_model_name == ["m"] and args.enforce_eager and args.seed == 3
    assert args.api_key is None  # our gateway owns auth


def test_unknown_engine_arg_is_a_config_error() -> None:
    from serve.vllm_glue import parse_vllm_args

    with pytest.raises(ConfigError, match="engine argument"):
        parse_vllm_args(ServeConfig(model="m", api_keys=["k"], engine_args={"no_such_flag": 1}))
