"""LoRA adapters: the ``--lora NAME=SOURCE`` flag, adapter_config.json, and the checks that
refuse an adapter the engine could not load before anything starts."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from cluster.errors import ConfigError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
#: What a served adapter name may look like (it travels as the request's `model`).
LORA_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$"
# Projections whose input is the model's hidden state: their lora_A is (rank, hidden_size).
_HIDDEN_INPUT_MODULES = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
_LAYER_INDEX = re.compile(r"\.layers\.(\d+)\.")
FLAG_FORMAT_HINT = "write NAME=REPO_OR_PATH, e.g. --lora sql=org/llama-sql-lora"


class LoraAdapter(BaseModel):
    """One LoRA adapter the server loads at start and serves under its own name."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(
        pattern=LORA_NAME_PATTERN,
        description="Name clients send as `model` to get the base model with this adapter.",
    )
    path: str = Field(
        min_length=1,
        description="Adapter directory (adapter_config.json + adapter_model.safetensors), the "
        "same path on every node.",
    )


def parse_lora_spec(text: str) -> tuple[str, str]:
    """``NAME=SOURCE`` -> (name, source); a ValueError that says how to write it otherwise."""
    name, sep, source = text.partition("=")
    name, source = name.strip(), source.strip()
    if not sep:
        raise ValueError(f"{text!r} has no '=': {FLAG_FORMAT_HINT}")
    if not name or not source:
        raise ValueError(f"{text!r} has an empty name or source: {FLAG_FORMAT_HINT}")
    if not re.match(LORA_NAME_PATTERN, name):
        raise ValueError(
            f"adapter name {name!r} may hold only letters, digits and _.:- (starting with a "
            f"letter or digit): {FLAG_FORMAT_HINT}"
        )
    return name, source


def check_lora_names(names: Sequence[str], served_names: Sequence[str]) -> None:
    """Adapter names must be unique and differ from the base model's served names."""
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise ValueError(
                f"adapter name {name!r} is given twice: give each adapter its own name"
            )
        if name in served_names:
            raise ValueError(
                f"adapter name {name!r} is also a served name of the base model: rename the adapter"
            )
        seen.add(name)


def read_adapter_config(path: str | Path, *, name: str) -> dict[str, Any]:
    """The adapter's adapter_config.json; ConfigError naming the adapter when it is missing,
    unreadable or not a LoRA adapter."""
    where = Path(path).expanduser() / ADAPTER_CONFIG
    try:
        data = json.loads(where.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(
            f"LoRA adapter {name!r}: {where} does not exist",
            hint="point --lora at a PEFT LoRA adapter directory (adapter_config.json and "
            "adapter_model.safetensors) on the shared dir; `up --lora NAME=ORG/REPO` downloads "
            "one from the hub",
        ) from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"LoRA adapter {name!r}: cannot read {where}: {exc}") from None
    if not isinstance(data, dict) or str(data.get("peft_type", "LORA")).upper() != "LORA":
        raise ConfigError(
            f"LoRA adapter {name!r}: {where} is not a LoRA adapter config "
            f"(peft_type {data.get('peft_type') if isinstance(data, dict) else None!r})",
            hint="vLLM serves PEFT LoRA adapters only",
        )
    rank = data.get("r")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ConfigError(f"LoRA adapter {name!r}: {where} has no positive integer rank `r`")
    return data


def max_lora_rank(ranks: Sequence[int], allowed: Sequence[int]) -> int:
    """vLLM's ``max_lora_rank`` for adapters of ``ranks``: the smallest value vLLM accepts
    (``allowed``) that holds the largest rank. ValueError when even vLLM's largest is too small."""
    largest = max(ranks)
    fitting = [r for r in sorted(allowed) if r >= largest]
    if not fitting:
        raise ValueError(
            f"LoRA rank {largest} is above the largest rank vLLM serves ({max(allowed)}): "
            "use an adapter of a lower rank"
        )
    return fitting[0]


def adapter_tensor_shapes(path: str | Path) -> dict[str, list[int]]:
    """Tensor names and shapes of the adapter's safetensors file (read from its header only)."""
    from safetensors import safe_open

    shapes: dict[str, list[int]] = {}
    with safe_open(str(Path(path).expanduser() / ADAPTER_WEIGHTS), framework="numpy") as fh:
        for key in fh.keys():  # noqa: SIM118 (safe_open is not a mapping)
            shapes[key] = list(fh.get_slice(key).get_shape())
    return shapes


def shape_mismatch(
    shapes: dict[str, list[int]], *, hidden_size: int, num_layers: int
) -> str | None:
    """Why the adapter's tensors cannot belong to a model of ``hidden_size`` with
    ``num_layers`` layers, or None when they fit."""
    for key, shape in shapes.items():
        match = _LAYER_INDEX.search(key)
        if match and int(match.group(1)) >= num_layers:
            return f"{key} is for layer {match.group(1)}, the model has {num_layers} layers"
        module = key.split(".lora_A")[0].rsplit(".", 1)[-1] if ".lora_A" in key else None
        if module in _HIDDEN_INPUT_MODULES and len(shape) == 2 and shape[1] != hidden_size:
            return (
                f"{key} takes inputs of width {shape[1]}, the model's hidden size is {hidden_size}"
            )
    return None


def base_name_mismatch(adapter_base: str | None, model_repo: str | None) -> bool:
    """True when both the adapter's base and the served model are hub repo ids and differ."""

    def is_repo_id(text: str | None) -> bool:
        return bool(text) and re.fullmatch(r"[\w.-]+/[\w.-]+", str(text)) is not None

    if not (is_repo_id(adapter_base) and is_repo_id(model_repo)):
        return False
    return str(adapter_base).lower() != str(model_repo).lower()


def check_adapter(
    adapter: LoraAdapter, *, model_dir: str | Path | None, model_repo: str | None
) -> dict[str, Any]:
    """Refuse, in one line, an adapter the engine could not serve on this model: no
    adapter_config.json or weights, trained for another base (by its hub id, or by tensor
    shapes against the model's config.json). Returns its adapter_config.json."""
    config = read_adapter_config(adapter.path, name=adapter.name)
    base = config.get("base_model_name_or_path")
    if base_name_mismatch(base, model_repo):
        raise ConfigError(
            f"LoRA adapter {adapter.name!r} was trained on {base}, but the model is {model_repo}",
            hint="serve the adapter with its own base model, or drop it",
        )
    weights = Path(adapter.path).expanduser() / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise ConfigError(
            f"LoRA adapter {adapter.name!r}: {weights} does not exist",
            hint="vLLM loads adapters saved as safetensors (PEFT's default)",
        )
    if model_dir is None:
        return config  # the model is not here yet (a hub model before its download)
    model_config = Path(model_dir).expanduser() / "config.json"
    try:
        text = json.loads(model_config.read_text(encoding="utf-8"))
        text = text.get("text_config", text)
        hidden, layers = int(text["hidden_size"]), int(text["num_hidden_layers"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return config  # no readable model config here: vLLM checks when it loads the adapter
    why = shape_mismatch(adapter_tensor_shapes(adapter.path), hidden_size=hidden, num_layers=layers)
    if why is not None:
        raise ConfigError(
            f"LoRA adapter {adapter.name!r} does not fit the model {model_dir}: {why}",
            hint="serve the adapter with the base model it was trained on, or drop it",
        )
    return config


def check_adapters(
    adapters: Sequence[LoraAdapter],
    *,
    model_dir: str | Path | None,
    model_repo: str | None,
    allowed_ranks: Sequence[int] | None,
) -> int | None:
    """Check every adapter (see check_adapter) and return vLLM's ``max_lora_rank`` for them
    (None without adapters, or without vLLM to ask for its ranks)."""
    ranks = []
    for adapter in adapters:
        rank = int(check_adapter(adapter, model_dir=model_dir, model_repo=model_repo)["r"])
        if allowed_ranks is not None:
            try:
                max_lora_rank([rank], allowed_ranks)
            except ValueError as exc:
                raise ConfigError(f"LoRA adapter {adapter.name!r}: {exc}") from None
        ranks.append(rank)
    if not ranks or allowed_ranks is None:
        return None
    return max_lora_rank(ranks, allowed_ranks)
