"""LoRA adapters without an engine: the --lora flag, the demo adapter, the checks that refuse a
bad adapter in one line before anything starts, and the vLLM arguments they become."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from cluster.demo_lora import (
    DEMO_LORA_RANK,
    adapter_config,
    build_demo_lora,
    lora_tensor_shapes,
)
from cluster.demo_model import DEMO_MODEL_REPO_ID, TINY_SPEC
from cluster.errors import ConfigError, validation_error
from cluster.stages.config import UpConfig
from cluster.stages.download import lora_targets
from serve.api import normalize_error_body
from serve.config import load_config
from serve.lora import (
    adapter_tensor_shapes,
    base_name_mismatch,
    max_lora_rank,
    parse_lora_spec,
    shape_mismatch,
)
from serve.vllm_glue import parse_vllm_args, vllm_lora_ranks

CLI = [sys.executable, "-c", "from cluster.cli.app import run; run()"]


@pytest.fixture(scope="module")
def adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo adapter (rank 8 on q_proj and v_proj), built once for this module."""
    return build_demo_lora(tmp_path_factory.mktemp("lora") / "demo-lora")


def serve_values(model: Path | str, *lora: str, **more) -> dict:
    return {"model": str(model), "device": "cpu", "no_auth": True, "lora_modules": list(lora)}


def one_line(exc: BaseException, model=UpConfig) -> str:
    """The line the CLI would print for ``exc``."""
    if isinstance(exc, ValidationError):
        exc = validation_error(exc, model)
    assert isinstance(exc, ConfigError)
    line = exc.one_line()
    assert "\n" not in line
    return line


# -- the flag ------------------------------------------------------------------------------------


def test_lora_spec_is_name_equals_source() -> None:
    assert parse_lora_spec("sql=org/llama-sql-lora") == ("sql", "org/llama-sql-lora")
    assert parse_lora_spec(" a = /shared/x=y ") == ("a", "/shared/x=y")
    for bad, why in [
        ("org/llama-sql-lora", "has no '='"),
        ("=org/x", "empty name or source"),
        ("sql=", "empty name or source"),
        ("has space=org/x", "may hold only"),
    ]:
        with pytest.raises(ValueError, match=why):
            parse_lora_spec(bad)


def test_up_refuses_a_lora_without_equals_naming_the_flag() -> None:
    with pytest.raises(ValidationError) as caught:
        UpConfig(local=True, lora=["org/llama-sql-lora"])
    line = one_line(caught.value)
    assert line.startswith("--lora: 'org/llama-sql-lora' has no '='")
    assert "NAME=REPO_OR_PATH" in line


def test_up_refuses_duplicate_names_and_a_served_name() -> None:
    with pytest.raises(ValidationError, match="'a' is given twice"):
        UpConfig(local=True, lora=["a=org/x", "a=org/y"])
    with pytest.raises(ValidationError, match="'main' is also a served name"):
        UpConfig(local=True, served_model_name=["main"], lora=["main=org/x"])


def test_up_reads_a_local_adapter_before_anything_starts(tmp_path: Path, adapter: Path) -> None:
    empty = tmp_path / "not-an-adapter"
    empty.mkdir()
    with pytest.raises(ConfigError) as caught:
        UpConfig(local=True, lora=[f"bad={empty}"])
    line = one_line(caught.value)
    assert f"LoRA adapter 'bad': {empty}/adapter_config.json does not exist" in line
    assert UpConfig(local=True, lora=[f"good={adapter}"]).lora == [f"good={adapter}"]


def test_adapter_targets_sit_beside_the_models(tmp_path: Path) -> None:
    local, hub = lora_targets([f"a={tmp_path}", "b=org/sql-lora"], "/shared")
    assert (local.name, local.repo_id, local.dir) == ("a", None, str(tmp_path))
    assert (hub.name, hub.repo_id, hub.dir) == ("b", "org/sql-lora", "/shared/models/org--sql-lora")


def test_up_dry_run_downloads_only_hub_adapters(
    tmp_path: Path, demo_model_dir: Path, adapter: Path
) -> None:
    done = subprocess.run(
        [*CLI, "up", "--local", "--model", str(demo_model_dir), "--dry-run",
         "--lora", f"demo={adapter}", "--lora", "sql=org/sql-lora"],
        capture_output=True,
        text=True,
        env={"LLAMACLUSTER_HOME": str(tmp_path / "home"), "PATH": "/usr/bin:/bin"},
        timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    fetch = [line for line in done.stdout.splitlines() if "cluster.download.node" in line]
    assert len(fetch) == 1, fetch  # the model and the demo adapter are directories
    assert "org/sql-lora ->" in fetch[0] and fetch[0].rstrip().endswith("/models/org--sql-lora")


@pytest.mark.parametrize("command", ["up", "serve"])
def test_cli_prints_one_line_and_exits_3_for_a_bad_lora(tmp_path: Path, command: str) -> None:
    args = ["--local", "--dry-run"] if command == "up" else ["--model", str(tmp_path), "--no-auth"]
    done = subprocess.run(
        [*CLI, command, *args, "--lora", "just-a-name"],
        capture_output=True,
        text=True,
        env={"LLAMACLUSTER_HOME": str(tmp_path / "home"), "PATH": "/usr/bin:/bin"},
        timeout=120,
    )
    assert done.returncode == 3, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "--lora" in lines[0] and "has no '='" in lines[0], lines


# -- the adapter checks of the server --------------------------------------------------------


def test_serve_refuses_a_path_without_adapter_config(tmp_path: Path, demo_model_dir: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(**serve_values(demo_model_dir, f"x={tmp_path}"))
    assert f"LoRA adapter 'x': {tmp_path}/adapter_config.json does not exist" in one_line(
        caught.value
    )


def test_serve_refuses_a_rank_vllm_cannot_serve(tmp_path: Path, demo_model_dir: Path) -> None:
    allowed = vllm_lora_ranks()
    assert allowed is not None and 8 in allowed  # read from the installed vLLM
    big = build_demo_lora(tmp_path / "big", rank=max(allowed) * 2)
    with pytest.raises(ConfigError) as caught:
        load_config(**serve_values(demo_model_dir, f"big={big}"))
    line = one_line(caught.value)
    assert f"LoRA adapter 'big': LoRA rank {max(allowed) * 2} is above the largest rank" in line


def test_serve_refuses_an_adapter_of_another_shape(tmp_path: Path, adapter: Path) -> None:
    wider = tmp_path / "wider-model"
    wider.mkdir()
    (wider / "config.json").write_text(json.dumps({"hidden_size": 512, "num_hidden_layers": 4}))
    with pytest.raises(ConfigError) as caught:
        load_config(**serve_values(wider, f"demo={adapter}"))
    line = one_line(caught.value)
    assert "LoRA adapter 'demo' does not fit the model" in line
    assert "takes inputs of width 256, the model's hidden size is 512" in line
    shallow = tmp_path / "shallow-model"
    shallow.mkdir()
    (shallow / "config.json").write_text(json.dumps({"hidden_size": 256, "num_hidden_layers": 2}))
    with pytest.raises(ConfigError, match="layer 2, the model has 2 layers"):
        load_config(**serve_values(shallow, f"demo={adapter}"))


def test_serve_refuses_an_adapter_trained_on_another_hub_model(adapter: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(**serve_values("org/another-model", f"demo={adapter}"))
    assert (
        f"LoRA adapter 'demo' was trained on {DEMO_MODEL_REPO_ID}, but the model is "
        "org/another-model" in one_line(caught.value)
    )
    assert base_name_mismatch("Org/Model", "org/model") is False
    assert base_name_mismatch("/home/me/llama", "org/model") is False  # a path: shapes decide
    assert base_name_mismatch("org/a", "org/b") is True


def test_max_lora_rank_is_the_smallest_vllm_value_that_holds_every_adapter() -> None:
    allowed = (1, 8, 16, 32, 64)
    assert max_lora_rank([4], allowed) == 8
    assert max_lora_rank([8, 16], allowed) == 16
    assert max_lora_rank([1], allowed) == 1
    with pytest.raises(ValueError, match="above the largest rank vLLM serves"):
        max_lora_rank([65], allowed)


def test_adapters_become_vllms_own_lora_arguments(
    tmp_path: Path, demo_model_dir: Path, adapter: Path
) -> None:
    small = build_demo_lora(tmp_path / "r4", rank=4, seed=1)
    config = load_config(
        **serve_values(demo_model_dir, f"demo={adapter}", f"four={small}"),
        served_model_name=["tiny", "alias"],
    )
    args = parse_vllm_args(config)
    assert args.enable_lora is True and args.max_loras == 2 and args.max_lora_rank == 8
    assert [(m.name, m.path, m.base_model_name) for m in args.lora_modules] == [
        ("demo", str(adapter), "tiny"),
        ("four", str(small), "tiny"),
    ]
    assert not parse_vllm_args(load_config(**serve_values(demo_model_dir))).enable_lora


def test_vllms_not_found_becomes_the_gateways_error_type() -> None:
    body = {"error": {"message": "The model `x` does not exist.", "type": "NotFoundError"}}
    fixed = json.loads(normalize_error_body(404, json.dumps(body).encode()))["error"]
    assert fixed["type"] == "not_found_error" and fixed["message"] == body["error"]["message"]


# -- the demo adapter --------------------------------------------------------------------------


def test_demo_adapter_is_deterministic_and_changes_something(tmp_path: Path, adapter: Path) -> None:
    import numpy as np
    from safetensors.numpy import load_file

    again = build_demo_lora(tmp_path / "again")
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (again / name).read_bytes() == (adapter / name).read_bytes()
    assert build_demo_lora(adapter) == adapter  # an identical build is kept
    other = build_demo_lora(tmp_path / "seed1", seed=1)
    assert (other / "adapter_model.safetensors").read_bytes() != (
        adapter / "adapter_model.safetensors"
    ).read_bytes()
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config == adapter_config() and config["r"] == DEMO_LORA_RANK
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    assert {k: list(v.shape) for k, v in tensors.items()} == {
        k: list(s) for k, s in lora_tensor_shapes(TINY_SPEC)
    }
    assert all(np.abs(v).max() > 0 for k, v in tensors.items() if "lora_B" in k)
    assert adapter_tensor_shapes(adapter) == {k: list(v.shape) for k, v in tensors.items()}
    assert shape_mismatch(adapter_tensor_shapes(adapter), hidden_size=256, num_layers=4) is None


def test_demo_adapter_refuses_to_overwrite_another(tmp_path: Path, adapter: Path) -> None:
    with pytest.raises(ConfigError, match="holds other files"):
        build_demo_lora(adapter, rank=16)
    with pytest.raises(ConfigError, match="holds other files"):
        build_demo_lora(adapter, seed=1)
    (tmp_path / "mine.txt").write_text("not an adapter")
    with pytest.raises(ConfigError, match="holds other files"):
        build_demo_lora(tmp_path)
