"""vLLM engine options the planner counts: --quantization (the weight dtype it means),
--speculative-config (the draft's memory) and --kv-offload-gb (host-memory KV cache)."""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from cluster.errors import ConfigError
from cluster.planner.dtypes import WEIGHT_DTYPE_BYTES
from cluster.planner.memory import _base_bytes, kv_bytes_per_token_per_layer
from cluster.planner.params import count_parameters
from cluster.planner.shape import ModelShape

# vLLM --quantization methods and the weight dtype each stores. fp8 methods quantize a 16-bit
# checkpoint at load time (or read an fp8 one); the 4-bit ones need a checkpoint quantized so.
QUANTIZATION_WEIGHT_DTYPE = {
    "fp8": "fp8",
    "fbgemm_fp8": "fp8",
    "modelopt": "fp8",
    "ptpc_fp8": "fp8",
    "awq": "int4",
    "awq_marlin": "int4",
    "gptq": "int4",
    "gptq_marlin": "int4",
    "bitsandbytes": "int4",
    "experts_int8": "int8",
}
# Methods whose width depends on the checkpoint: the planner reads it from quantization_config.
CHECKPOINT_QUANTIZATION = frozenset({"compressed-tensors", "gguf"})
# Speculative methods whose draft is a few decoder layers riding on the target's embedding and
# LM head (EAGLE heads, multi-token-prediction layers), and the input projection each adds
# (EAGLE: fc over [embedding, hidden] = 2h x h; EAGLE-3: three fused hidden states = 3h x h).
LAYER_DRAFT_FC = {"eagle": 2, "eagle3": 3, "mtp": 2, "deepseek_mtp": 2, "qwen3_next_mtp": 2}
NO_DRAFT_METHODS = frozenset({"ngram", "suffix"})


def quantization_weight_dtype(method: str, shape: ModelShape) -> str:
    """The planner's weight dtype for a vLLM --quantization method, or a ConfigError."""
    key = method.strip().lower()
    if key in QUANTIZATION_WEIGHT_DTYPE:
        return QUANTIZATION_WEIGHT_DTYPE[key]
    if key in CHECKPOINT_QUANTIZATION:
        if shape.quantization is None:
            raise ConfigError(
                f"--quantization {method} needs a quantized checkpoint, and the config has no "
                "quantization_config",
                hint="pass a quantized model, or --quantization fp8 to quantize at load time",
            )
        return shape.quantization
    known = ", ".join([*QUANTIZATION_WEIGHT_DTYPE, *sorted(CHECKPOINT_QUANTIZATION)])
    raise ConfigError(f"unknown --quantization {method!r}", hint=f"use one of: {known}")


def parse_speculative_config(text: str) -> dict[str, Any]:
    """The JSON object of --speculative-config, or a ConfigError saying what is wrong."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"--speculative-config is not JSON ({exc.msg} at character {exc.pos})",
            hint='e.g. --speculative-config \'{"method": "ngram", "num_speculative_tokens": 4, '
            '"prompt_lookup_max": 4}\'',
        ) from None
    if not isinstance(value, dict):
        raise ConfigError(
            "--speculative-config must be a JSON object",
            hint='e.g. \'{"method": "eagle", "model": "<draft repo>", "num_speculative_tokens": 3}\'',
        )
    return value


class DraftCost(BaseModel):
    """Memory the speculative draft adds on the device(s) that run it (the last stage)."""

    model_config = ConfigDict(frozen=True)

    method: str = Field(description="Speculative method (ngram, eagle, eagle3, mtp, draft_model).")
    num_speculative_tokens: int = Field(description="Tokens proposed per step.")
    linear_params: float = Field(description="Draft linear-layer weights (at the weight dtype).")
    other_params: float = Field(description="Draft embeddings, norms, projections (16-bit).")
    kv_shape: ModelShape | None = Field(
        default=None, description="Shape whose KV cache the draft adds (None: no cache)."
    )
    source: str = Field(description="How the draft was sized.")

    def weight_bytes(self, weight_dtype: str, *, tp: int) -> float:
        """Draft weights on one tensor-parallel rank (vLLM shards the draft like the target)."""
        stored = self.linear_params * WEIGHT_DTYPE_BYTES[weight_dtype]
        return (stored + self.other_params * _base_bytes(weight_dtype)) / tp

    def kv_bytes_per_token(self, kv_dtype: str, *, tp: int) -> int:
        """KV-cache bytes the draft adds per token on one rank (vLLM keeps both in one pool)."""
        if self.kv_shape is None:
            return 0
        per_layer = kv_bytes_per_token_per_layer(self.kv_shape, kv_dtype, tp=tp)
        return per_layer * self.kv_shape.num_layers


def draft_cost(
    config: dict[str, Any], target: ModelShape, *, draft_shape: ModelShape | None = None
) -> DraftCost:
    """What the draft of a --speculative-config costs in memory.

    n-gram / suffix: nothing. EAGLE/MTP: ``num_hidden_layers`` (default 1) decoder layers of the
    target's shape plus their input projection, sharing the target's embedding and LM head
    (``draft_shape``, the draft's own config when given, sets the layer shape). A separate draft
    model (method draft_model, or a ``model`` with no layer method): all of ``draft_shape``.
    """
    method = str(config.get("method") or ("draft_model" if config.get("model") else "")).lower()
    tokens = int(config.get("num_speculative_tokens", 1))
    if not method:
        raise ConfigError(
            "--speculative-config names no method",
            hint='add "method": ngram, eagle, eagle3, mtp or draft_model (with "model")',
        )
    if method in NO_DRAFT_METHODS:
        return DraftCost(
            method=method,
            num_speculative_tokens=tokens,
            linear_params=0,
            other_params=0,
            source=f"{method}: proposes from the prompt, no draft weights",
        )
    if method in LAYER_DRAFT_FC:
        base = draft_shape or target
        layers = int(
            config.get("num_hidden_layers") or (draft_shape.num_layers if draft_shape else 1)
        )
        layer_shape = base.model_copy(update={"num_layers": layers, "moe": None})
        counts = count_parameters(layer_shape)
        fc = LAYER_DRAFT_FC[method] * base.hidden_size * base.hidden_size
        return DraftCost(
            method=method,
            num_speculative_tokens=tokens,
            linear_params=counts.attention + counts.mlp,
            other_params=counts.other + fc,
            kv_shape=layer_shape,
            source=f"{method}: {layers} decoder layer(s) of "
            f"{'the draft config' if draft_shape else 'the target shape'} + a "
            f"{LAYER_DRAFT_FC[method]}h x h projection, embedding and LM head shared",
        )
    if draft_shape is None:
        raise ConfigError(
            f"speculative method {method!r} needs the draft model's config to size it",
            hint='give "model" as a local directory or hub repo id in --speculative-config',
        )
    counts = count_parameters(draft_shape)
    return DraftCost(
        method=method,
        num_speculative_tokens=tokens,
        linear_params=counts.attention + counts.mlp,
        other_params=counts.total - counts.attention - counts.mlp,
        kv_shape=draft_shape,
        source=f"draft model {draft_shape.name or config.get('model')}: "
        f"{counts.total / 1e9:.2f} B parameters",
    )


def plan_weight_dtype(shape: ModelShape, dtype: str, quantization: str | None) -> str:
    """The weight dtype of a plan: --dtype, else the --quantization method's, else the
    checkpoint's; a --dtype that contradicts --quantization is a ConfigError."""
    from cluster.planner.memory import resolve_weight_dtype

    if quantization is None:
        return resolve_weight_dtype(shape, dtype)
    quantized = quantization_weight_dtype(quantization, shape)
    if dtype != "auto" and resolve_weight_dtype(shape, dtype) != quantized:
        raise ConfigError(
            f"--dtype {dtype} contradicts --quantization {quantization} ({quantized} weights)",
            hint="drop --dtype when you pass --quantization",
        )
    return quantized
