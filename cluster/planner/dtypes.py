"""Dtype names and sizes: bytes per weight and per KV-cache element (int4 with its scales),
the accepted spellings of each dtype, and GiB."""

from __future__ import annotations

from typing import Any

from cluster.errors import ConfigError

GIB = 2**30

# Weight-only int4 (AWQ / GPTQ layout) stores, per group of 128 weights, one fp16 scale and one
# packed 4-bit zero point: (2 + 0.5) / 128 = 0.0195 extra bytes per weight (about 4 %).
INT4_GROUP_SIZE = 128
INT4_SCALE_OVERHEAD_BYTES = (2 + 0.5) / INT4_GROUP_SIZE

# Bytes per parameter of the *linear* layers (attention, MLP, experts). Embeddings, the LM head,
# norms and MoE routers stay in 16-bit (32-bit for fp32 models), as quantized checkpoints and
# vLLM keep them. fp8/int8 per-channel or per-tensor scales are negligible and not counted.
WEIGHT_DTYPE_BYTES: dict[str, float] = {
    "fp32": 4.0,
    "bf16": 2.0,
    "fp16": 2.0,
    "fp8": 1.0,
    "int8": 1.0,
    "int4": 0.5 + INT4_SCALE_OVERHEAD_BYTES,
}
KV_DTYPE_BYTES: dict[str, int] = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1}
QUANTIZED_DTYPES = frozenset({"fp8", "int8", "int4"})

_DTYPE_ALIASES = {
    "bfloat16": "bf16",
    "float16": "fp16",
    "half": "fp16",
    "float32": "fp32",
    "float": "fp32",
    "fp8_e4m3": "fp8",
    "fp8_e5m2": "fp8",
    "float8": "fp8",
    "awq": "int4",
    "gptq": "int4",
    "w4a16": "int4",
    "w8a8": "int8",
}


def normalize_dtype(name: str, *, allowed: dict[str, Any], what: str) -> str:
    """Canonical short name (bf16, fp16, fp8, int4...) for a dtype spelling, or a ConfigError."""
    key = name.strip().lower().replace("torch.", "")
    key = _DTYPE_ALIASES.get(key, key)
    if key not in allowed:
        raise ConfigError(
            f"unknown {what} {name!r}", hint=f"use one of: auto, {', '.join(allowed)}"
        )
    return key
