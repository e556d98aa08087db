"""Pipeline stages of a tp x pp layout: how the layers split (as vLLM splits them), what one
tensor-parallel rank of each stage stores, reads and computes (the numbers the memory and speed
models read), and the memory of one device of a stage."""

from __future__ import annotations

from dataclasses import dataclass, replace

from pydantic import BaseModel, Field

from cluster.errors import ConfigError
from cluster.planner.dtypes import GIB, WEIGHT_DTYPE_BYTES
from cluster.planner.engine_options import DraftCost
from cluster.planner.memory import _base_bytes, kv_bytes_per_token_per_layer, runtime_headroom_bytes
from cluster.planner.options import ClusterShape
from cluster.planner.params import (
    _norm_params,
    _router_params,
    attention_params_per_device,
    dense_mlp_params,
    expert_params,
    shared_expert_params,
)
from cluster.planner.shape import ModelShape


def pipeline_stage_layers(num_layers: int, pp: int) -> list[int]:
    """Layers per pipeline stage, split the way vLLM's get_pp_indices does (remainder layers go
    to the stages before the last, which also holds the final norm and LM head)."""
    if not 1 <= pp <= num_layers:
        raise ConfigError(f"pp={pp} must be between 1 and the {num_layers} layers")
    parts = [num_layers // pp] * pp
    for i in range(2, num_layers % pp + 2):
        parts[-i] += 1
    return parts


@dataclass(frozen=True)
class _Stage:
    """Per-device numbers of one pipeline stage (one tensor-parallel rank of it)."""

    index: int
    first_layer: int
    num_layers: int
    weight_bytes: float  # what the rank stores
    dense_read_bytes: float  # read every decode step, besides routed experts (no input embedding)
    expert_bytes: float  # one routed expert on this rank
    moe_layers: int
    dense_linear_params: float  # linear params per token besides routed experts (no LM head)
    expert_linear_params: float  # one routed expert on this rank
    lm_head_params: float
    attn_flops_per_pair: float  # attention FLOPs per (query token, context token) pair
    kv_bytes_per_token: int


def _build_stages(
    shape: ModelShape,
    *,
    tp: int,
    pp: int,
    weight_dtype: str,
    kv_dtype: str,
    draft: DraftCost | None = None,
) -> list[_Stage]:
    qbytes, bbytes = WEIGHT_DTYPE_BYTES[weight_dtype], _base_bytes(weight_dtype)
    embed_dev = shape.vocab_size * shape.hidden_size / tp
    attn = attention_params_per_device(shape, tp)
    if shape.mla is not None:
        qk = shape.mla.qk_nope_head_dim + shape.mla.qk_rope_head_dim
        pair_flops = 2 * (shape.num_heads / tp) * (qk + shape.mla.v_head_dim)
    else:
        pair_flops = 2 * (shape.num_heads / tp) * 2 * shape.head_dim  # QK^T and AV
    kv_layer = kv_bytes_per_token_per_layer(shape, kv_dtype, tp=tp)
    stages: list[_Stage] = []
    start = 0
    for index, count in enumerate(pipeline_stage_layers(shape.num_layers, pp)):
        first, last = index == 0, index == pp - 1
        dense_linear = float(attn) * count
        all_experts = 0.0
        moe_layers = 0
        small = _norm_params(shape) * count
        for layer in range(start, start + count):
            if shape.is_moe_layer(layer):
                assert shape.moe is not None
                moe_layers += 1
                dense_linear += shared_expert_params(shape) / tp
                all_experts += shape.moe.num_experts * expert_params(shape) / tp
                small += _router_params(shape)
            else:
                dense_linear += dense_mlp_params(shape) / tp
        # vLLM keeps the embedding on the first stage, and on the last too when the LM head is
        # tied to it; the last stage holds the LM head and the final norm.
        embed_copies = int(first) + int(last and shape.tied_embeddings and not first)
        lm_head = embed_dev if last else 0.0
        stored_lm_head = lm_head if (last and not shape.tied_embeddings) else 0.0
        if last:
            small += shape.hidden_size
        stored = (dense_linear + all_experts) * qbytes
        stored += (small + embed_copies * embed_dev + stored_lm_head) * bbytes
        read = dense_linear * qbytes + (small + lm_head) * bbytes
        stages.append(
            _Stage(
                index=index,
                first_layer=start,
                num_layers=count,
                weight_bytes=stored,
                dense_read_bytes=read,
                expert_bytes=expert_params(shape) / tp * qbytes,
                moe_layers=moe_layers,
                dense_linear_params=dense_linear,
                expert_linear_params=expert_params(shape) / tp,
                lm_head_params=lm_head,
                attn_flops_per_pair=pair_flops * count,
                kv_bytes_per_token=kv_layer * count,
            )
        )
        start += count
    if draft is not None:
        # vLLM runs the drafter on the last stage, sharded like the target; its KV cache shares
        # the target's block pool, so every cached token costs the draft's KV too.
        last = stages[-1]
        stages[-1] = replace(
            last,
            weight_bytes=last.weight_bytes + draft.weight_bytes(weight_dtype, tp=tp),
            kv_bytes_per_token=last.kv_bytes_per_token + draft.kv_bytes_per_token(kv_dtype, tp=tp),
        )
    return stages


class StageMemory(BaseModel):
    """Memory of one device (one tensor-parallel rank) of a pipeline stage."""

    stage: int = Field(description="Pipeline stage index.")
    layers: str = Field(description="Layer range of the stage, e.g. '0-39'.")
    device_gib: float = Field(description="Device memory.")
    budget_gib: float = Field(description="mem_fraction x device memory: what vLLM may use.")
    weights_gib: float = Field(description="Weights this device holds.")
    headroom_gib: float = Field(description="Runtime overhead and activation peak.")
    kv_cache_gib: float = Field(description="Left for the KV cache (budget - weights - headroom).")
    kv_bytes_per_token: int = Field(description="KV bytes one token needs on this device.")
    kv_tokens: int = Field(description="Tokens of KV cache this device holds.")


def _stage_memory(
    stage: _Stage,
    shape: ModelShape,
    cluster: ClusterShape,
    *,
    tp: int,
    weight_dtype: str,
    mem_fraction: float,
) -> StageMemory:
    budget = mem_fraction * cluster.device.memory_gib * GIB
    headroom = runtime_headroom_bytes(
        shape, cluster.device, tp=tp, act_bytes=_base_bytes(weight_dtype)
    )
    kv_space = budget - stage.weight_bytes - headroom
    return StageMemory(
        stage=stage.index,
        layers=f"{stage.first_layer}-{stage.first_layer + stage.num_layers - 1}",
        device_gib=cluster.device.memory_gib,
        budget_gib=budget / GIB,
        weights_gib=stage.weight_bytes / GIB,
        headroom_gib=headroom / GIB,
        kv_cache_gib=kv_space / GIB,
        kv_bytes_per_token=stage.kv_bytes_per_token,
        kv_tokens=max(0, int(kv_space // stage.kv_bytes_per_token)) if kv_space > 0 else 0,
    )
