"""Memory arithmetic: the weight and KV-cache dtypes a plan uses, the bytes of all weights, the
KV-cache bytes per token, and the per-device runtime headroom vLLM needs besides both."""

from __future__ import annotations

from cluster.device_specs import DeviceSpec
from cluster.planner.dtypes import GIB, KV_DTYPE_BYTES, WEIGHT_DTYPE_BYTES, normalize_dtype
from cluster.planner.params import _kv_heads_per_device, count_parameters
from cluster.planner.shape import ModelShape

# Runtime constants (documented in docs/PLANNER.md).

# Memory vLLM needs on each device besides weights and KV cache: the CUDA context, NCCL and
# custom all-reduce buffers, CUDA graphs. Measured values are 0.5-1.5 GiB per GPU.
RUNTIME_OVERHEAD_GIB = 1.0
# vLLM profiles the peak activation memory with one batch of max_num_batched_tokens; its OpenAI
# server defaults to 8192 tokens on >= 70 GiB devices and 2048 on smaller ones.
LARGE_DEVICE_GIB = 70
ACTIVATION_TOKENS_LARGE = 8192
ACTIVATION_TOKENS_SMALL = 2048
# Logits are computed in fp32 for at most max_num_seqs sequences per step (vLLM default 256).
LOGITS_SEQS = 256


def resolve_weight_dtype(shape: ModelShape, dtype: str = "auto") -> str:
    """The weight dtype to plan with: the given one, else the checkpoint's quantization, else its
    dtype (an fp32 checkpoint is served in bf16, as vLLM's "auto" does)."""
    if dtype == "auto":
        if shape.quantization:
            return shape.quantization
        return "bf16" if shape.config_dtype == "fp32" else shape.config_dtype
    return normalize_dtype(dtype, allowed=WEIGHT_DTYPE_BYTES, what="weight dtype")


def _base_bytes(weight_dtype: str) -> int:
    """Bytes of the unquantized parts (embeddings, norms, routers) and of activations."""
    return 4 if weight_dtype == "fp32" else 2


def resolve_kv_dtype(kv_dtype: str, weight_dtype: str) -> str:
    """KV-cache dtype: "auto" follows the model's compute dtype (16-bit, or fp32)."""
    if kv_dtype == "auto":
        return {"fp32": "fp32", "fp16": "fp16"}.get(weight_dtype, "bf16")
    return normalize_dtype(kv_dtype, allowed=KV_DTYPE_BYTES, what="KV-cache dtype")


def weight_bytes(shape: ModelShape, dtype: str = "bf16") -> float:
    """Bytes of all weights in ``dtype`` (quantized dtypes apply to the linear layers only)."""
    dtype = resolve_weight_dtype(shape, dtype)
    p = count_parameters(shape)
    linear = p.attention + p.mlp
    return linear * WEIGHT_DTYPE_BYTES[dtype] + (p.total - linear) * _base_bytes(dtype)


def kv_bytes_per_token_per_layer(shape: ModelShape, kv_dtype: str = "bf16", *, tp: int = 1) -> int:
    """KV-cache bytes one token adds to one layer on one tensor-parallel rank.

    Standard/GQA attention: K and V for each KV head the rank holds (at least one: vLLM
    replicates KV heads when tp exceeds their number). Latent attention (MLA): one compressed
    latent plus the RoPE key, replicated on every rank.
    """
    nbytes = KV_DTYPE_BYTES[normalize_dtype(kv_dtype, allowed=KV_DTYPE_BYTES, what="KV dtype")]
    if shape.mla is not None:
        return (shape.mla.kv_lora_rank + shape.mla.qk_rope_head_dim) * nbytes
    kv = _kv_heads_per_device(shape, tp)
    return 2 * kv * shape.head_dim * nbytes


def kv_bytes_per_token(shape: ModelShape, kv_dtype: str = "bf16") -> int:
    """KV-cache bytes per token for the whole model: 2 x layers x kv_heads x head_dim x bytes."""
    return shape.num_layers * kv_bytes_per_token_per_layer(shape, kv_dtype)


def max_num_batched_tokens(device: DeviceSpec) -> int:
    """vLLM's default tokens per scheduler step (the prefill chunk and the activation peak)."""
    return (
        ACTIVATION_TOKENS_LARGE
        if device.memory_gib >= LARGE_DEVICE_GIB
        else ACTIVATION_TOKENS_SMALL
    )


def runtime_headroom_bytes(
    shape: ModelShape, device: DeviceSpec, *, tp: int, act_bytes: int
) -> float:
    """Per-device memory for everything but weights and KV cache (see RUNTIME_OVERHEAD_GIB).

    Fixed runtime overhead + the activation peak of one batch of vLLM's default
    max_num_batched_tokens (residual, norm output, QKV, gate/up output) + fp32 logits for the
    default max_num_seqs.
    """
    tokens = max_num_batched_tokens(device)
    ffn = shape.intermediate_size
    if shape.moe is not None:
        moe = shape.moe
        ffn = max(
            ffn, moe.experts_per_token * moe.expert_intermediate_size + moe.shared_intermediate_size
        )
    qkv = (shape.num_heads / tp + 2 * _kv_heads_per_device(shape, tp)) * shape.head_dim
    per_token = (4 * shape.hidden_size + 2 * ffn / tp + qkv) * act_bytes
    logits = LOGITS_SEQS * shape.vocab_size / tp * 4
    return RUNTIME_OVERHEAD_GIB * GIB + tokens * per_token + logits
