"""Parameter counts from a model shape: attention, MLP, routed and shared experts, norms and
routers, per layer and per tensor-parallel rank; the model's total and active counts."""

from __future__ import annotations

from pydantic import BaseModel, Field

from cluster.planner.shape import ModelShape


def _kv_heads_per_device(shape: ModelShape, tp: int) -> int:
    # vLLM replicates KV heads when tp exceeds their number, so each device keeps at least one.
    return max(1, shape.num_kv_heads // tp)


def attention_params_per_device(shape: ModelShape, tp: int = 1) -> float:
    """Attention projection weights one tensor-parallel rank holds (tp=1: the whole layer's)."""
    h, heads = shape.hidden_size, shape.num_heads / tp
    if shape.mla is not None:
        m = shape.mla
        qk = m.qk_nope_head_dim + m.qk_rope_head_dim
        # The down-projections (q_a, kv_a) are replicated on every rank; the rest is split.
        q_in = m.q_lora_rank or 0
        q = h * q_in + q_in * heads * qk if q_in else h * heads * qk
        kv = h * (m.kv_lora_rank + m.qk_rope_head_dim)
        kv += m.kv_lora_rank * heads * (m.qk_nope_head_dim + m.v_head_dim)
        return q + kv + heads * m.v_head_dim * h
    d = shape.head_dim
    kv = _kv_heads_per_device(shape, tp)
    return h * d * (heads + 2 * kv) + heads * d * h


def dense_mlp_params(shape: ModelShape) -> int:
    """Weights of one dense MLP (gate/up/down or up/down)."""
    return (3 if shape.gated_mlp else 2) * shape.hidden_size * shape.intermediate_size


def expert_params(shape: ModelShape) -> int:
    """Weights of one routed expert (always a gated MLP); 0 for dense models."""
    return 0 if shape.moe is None else 3 * shape.hidden_size * shape.moe.expert_intermediate_size


def shared_expert_params(shape: ModelShape) -> int:
    """Weights of the always-on shared expert(s) of one MoE layer."""
    return 0 if shape.moe is None else 3 * shape.hidden_size * shape.moe.shared_intermediate_size


def _norm_params(shape: ModelShape) -> int:
    extra = 0
    if shape.mla is not None:
        extra = (shape.mla.q_lora_rank or 0) + shape.mla.kv_lora_rank
    return 2 * shape.hidden_size + extra


def _router_params(shape: ModelShape) -> int:
    return 0 if shape.moe is None else shape.hidden_size * shape.moe.num_experts


class ParamCount(BaseModel):
    """Parameter counts; ``active`` is what one token touches (MoE: top-k experts + shared)."""

    total: int = Field(description="All parameters (tied embeddings counted once).")
    active: int = Field(description="Parameters used per token (equals total for dense models).")
    embedding: int = Field(description="Input embedding.")
    lm_head: int = Field(description="Output projection (0 when tied to the embedding).")
    attention: int = Field(description="Attention projections, all layers.")
    mlp: int = Field(description="MLPs, experts and shared experts, all layers.")
    other: int = Field(description="Norms and MoE routers.")


def count_parameters(shape: ModelShape) -> ParamCount:
    """Total and active parameter counts from the shape (biases are left out: < 0.1 %)."""
    embed = shape.vocab_size * shape.hidden_size
    lm_head = 0 if shape.tied_embeddings else embed
    attn = int(attention_params_per_device(shape)) * shape.num_layers
    other = shape.num_layers * _norm_params(shape) + shape.hidden_size
    mlp = active_mlp = 0
    for i in range(shape.num_layers):
        if shape.is_moe_layer(i):
            assert shape.moe is not None
            base = shared_expert_params(shape)
            mlp += base + shape.moe.num_experts * expert_params(shape)
            active_mlp += base + shape.moe.experts_per_token * expert_params(shape)
            other += _router_params(shape)
        else:
            mlp += dense_mlp_params(shape)
            active_mlp += dense_mlp_params(shape)
    total = embed + lm_head + attn + mlp + other
    return ParamCount(
        total=total,
        active=total - mlp + active_mlp,
        embedding=embed,
        lm_head=lm_head,
        attention=attn,
        mlp=mlp,
        other=other,
    )
