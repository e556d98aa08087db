"""Builds a deterministic LoRA adapter for the demo model, laid out as PEFT writes one."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from cluster.demo_model import (
    DEMO_MODEL_REPO_ID,
    GIBBERISH_NOTICE,
    TINY_SPEC,
    DemoModelSpec,
    _fsync_dir,
    _fsync_file,
    _write_json,
    _write_text,
)
from cluster.errors import ConfigError

#: Repository id the demo adapter goes by (loopback hub, tests).
DEMO_LORA_REPO_ID = "llamacluster/demo-tiny-llama-lora"
#: Rank of the demo adapter (vLLM accepts 1, 8, 16, 32, ...).
DEMO_LORA_RANK = 8
#: Layers the demo adapter changes.
DEMO_LORA_TARGETS = ("q_proj", "v_proj")
# Large enough that greedy answers with and without the adapter differ on the random model.
_LORA_STD = 0.2


def lora_tensor_shapes(
    spec: DemoModelSpec, *, rank: int = DEMO_LORA_RANK
) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor of the adapter with its shape, PEFT's names: A is (rank, in), B (out, rank)."""
    outputs = {
        "q_proj": spec.num_attention_heads * spec.head_dim,
        "v_proj": spec.num_key_value_heads * spec.head_dim,
    }
    shapes: list[tuple[str, tuple[int, ...]]] = []
    for n in range(spec.num_hidden_layers):
        for module in DEMO_LORA_TARGETS:
            prefix = f"base_model.model.model.layers.{n}.self_attn.{module}"
            shapes.append((f"{prefix}.lora_A.weight", (rank, spec.hidden_size)))
            shapes.append((f"{prefix}.lora_B.weight", (outputs[module], rank)))
    return shapes


def adapter_config(*, rank: int = DEMO_LORA_RANK, base: str = DEMO_MODEL_REPO_ID) -> dict:
    """The adapter_config.json of the demo adapter (PEFT's LoRA fields)."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": rank,
        "lora_alpha": 2 * rank,
        "lora_dropout": 0.0,
        "target_modules": list(DEMO_LORA_TARGETS),
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
    }


def build_demo_lora(
    path: str | os.PathLike[str],
    *,
    seed: int = 0,
    rank: int = DEMO_LORA_RANK,
    base: str = DEMO_MODEL_REPO_ID,
) -> Path:
    """Write a LoRA adapter for the default demo model to ``path``; the bytes depend only on the
    arguments. A and B are both non-zero (B is zero in a fresh PEFT adapter, which changes
    nothing), so the adapter visibly changes the model's answers. Written in a temporary
    directory next to ``path`` and renamed into place; an identical build there is kept."""
    import numpy as np
    from safetensors.numpy import save_file

    target = Path(path).expanduser().absolute()
    config = adapter_config(rank=rank, base=base)
    card = (
        f"# {DEMO_LORA_REPO_ID}\n\nA random LoRA adapter (rank {rank}, seed {seed}) for the "
        f"{GIBBERISH_NOTICE}. It changes the answers, it teaches nothing.\n"
    )
    if target.exists() and any(target.iterdir()):
        if _same_build(target, config, card):
            return target
        raise ConfigError(
            f"{target} holds other files (another adapter?); refusing to overwrite it",
            hint="pass an empty or new directory",
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.building-", dir=target.parent))
    try:
        tensors = {}
        for index, (name, shape) in enumerate(lora_tensor_shapes(TINY_SPEC, rank=rank)):
            rng = np.random.default_rng([seed, 1000 + index])
            values = rng.standard_normal(shape, dtype=np.float32) * np.float32(_LORA_STD)
            tensors[name] = np.ascontiguousarray(values)
        save_file(tensors, str(work / "adapter_model.safetensors"), metadata={"format": "pt"})
        _fsync_file(work / "adapter_model.safetensors")
        _write_json(work / "adapter_config.json", config)
        _write_text(work / "README.md", card)
        _fsync_dir(work)
        if target.exists() and not any(target.iterdir()):
            target.rmdir()
        os.rename(work, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _fsync_dir(target.parent)
    return target


def _same_build(target: Path, config: dict, card: str) -> bool:
    """True when ``target`` holds a finished demo adapter built with the same arguments (the
    card names the seed and rank, the config the rest)."""
    try:
        return (
            json.loads((target / "adapter_config.json").read_text(encoding="utf-8")) == config
            and (target / "README.md").read_text(encoding="utf-8") == card
            and (target / "adapter_model.safetensors").is_file()
        )
    except (OSError, ValueError):
        return False
