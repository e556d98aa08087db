"""Speed model: the roofline time of one forward step (per stage the larger of the memory and
the compute bound) and the tensor- and pipeline-parallel traffic per token."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, Field

from cluster.planner.efficiency import StepEfficiency
from cluster.planner.options import ClusterShape
from cluster.planner.shape import ModelShape
from cluster.planner.stages import _Stage

# Runtime constants (documented in docs/PLANNER.md).

# vLLM's Llama-style models pass both hidden_states and residual between pipeline stages.
PP_TENSORS_PER_HOP = 2
# Tensor parallelism: one all-reduce after attention and one after the MLP, per layer.
TP_ALLREDUCES_PER_LAYER = 2


def experts_touched(num_experts: int, experts_per_token: int, tokens: float) -> float:
    """Expected distinct experts a batch of ``tokens`` routes to (uniform routing): each must be
    read from memory once per step, so MoE decode reads more than the active weights at batch > 1."""
    if tokens <= 0:
        return 0.0
    return num_experts * (1 - (1 - experts_per_token / num_experts) ** tokens)


class StepTime(BaseModel):
    """One forward step on the whole pipeline, split into its bounds."""

    total_ms: float = Field(
        description="Step time: sum over stages of max(memory, compute) + communication."
    )
    memory_ms: float = Field(
        description="Time to read weights and KV cache at the given bandwidth."
    )
    compute_ms: float = Field(description="Time for the FLOPs at the given peak.")
    tp_comm_ms: float = Field(description="Tensor-parallel all-reduces.")
    pp_comm_ms: float = Field(description="Pipeline stage hops.")
    layer_overhead_ms: float = Field(
        default=0.0,
        description="Fixed cost of the layers' kernel calls (measured devices; in total_ms).",
    )
    bound: Literal["memory", "compute"] = Field(description="Which bound dominates the stages.")


@dataclass(frozen=True)
class StageWork:
    """What one pipeline stage (one tensor-parallel rank) moves and computes in one step."""

    layers: int
    weight_bytes: float  # weights read: dense parts, LM head, routed experts touched
    kv_bytes: float  # KV cache read (context) and written (new tokens)
    flops: float  # linear layers, attention and the logits


def stage_work(
    shape: ModelShape, stages: list[_Stage], *, seqs: int, new_tokens: int, past_tokens: int
) -> list[StageWork]:
    """Bytes and FLOPs of one step of ``seqs`` sequences each adding ``new_tokens`` after
    ``past_tokens``, per stage (pure arithmetic; the speed models divide it by device rates)."""
    tokens = seqs * new_tokens
    # Causal attention: each new token attends to the past and to the new tokens before it.
    pairs = seqs * (new_tokens * past_tokens + new_tokens * (new_tokens + 1) / 2)
    kv_tokens = seqs * (past_tokens + new_tokens)
    work = []
    for s in stages:
        touched = 0.0
        if s.moe_layers and shape.moe is not None:
            touched = experts_touched(shape.moe.num_experts, shape.moe.experts_per_token, tokens)
        linear = s.dense_linear_params + (
            s.moe_layers * shape.moe.experts_per_token * s.expert_linear_params
            if shape.moe
            else 0.0
        )
        # vLLM computes logits only for the last token of each sequence.
        flop = 2 * linear * tokens + 2 * s.lm_head_params * seqs + s.attn_flops_per_pair * pairs
        work.append(
            StageWork(
                layers=s.num_layers,
                weight_bytes=s.dense_read_bytes + s.moe_layers * touched * s.expert_bytes,
                kv_bytes=kv_tokens * s.kv_bytes_per_token,
                flops=flop,
            )
        )
    return work


def _step_time(
    shape: ModelShape,
    cluster: ClusterShape,
    stages: list[_Stage],
    efficiency: StepEfficiency,
    *,
    tp: int,
    act_bytes: int,
    seqs: int,
    new_tokens: int,
    past_tokens: int,
) -> StepTime:
    """Time of one step of ``seqs`` sequences each adding ``new_tokens`` after ``past_tokens``,
    each stage's bytes and FLOPs at the device's rates times ``efficiency``."""
    dev = cluster.device
    bandwidth = dev.bandwidth_gbs * 1e9
    flops = dev.bf16_tflops * 1e12
    mem_total = compute_total = busy = fixed = 0.0
    memory_bound_time = 0.0
    work = stage_work(shape, stages, seqs=seqs, new_tokens=new_tokens, past_tokens=past_tokens)
    for w in work:
        layers = max(1, w.layers)
        weight_eff = efficiency.weights(w.weight_bytes / layers)
        mem_t = w.weight_bytes / (bandwidth * weight_eff)
        mem_t += w.kv_bytes / (bandwidth * efficiency.kv)
        comp_t = w.flops / (flops * efficiency.compute(w.flops / layers))
        mem_total += mem_t
        compute_total += comp_t
        busy += max(mem_t, comp_t)
        # Paid by every step whatever its size: kernel launches, small kernels (measured).
        fixed += w.layers * efficiency.layer_ms / 1e3
        memory_bound_time += mem_t if mem_t >= comp_t else 0.0
    comm = communication(shape, cluster, tp=tp, pp=len(stages), act_bytes=act_bytes)
    tokens = seqs * new_tokens
    tp_ms = comm.tp_ms_per_token * tokens
    pp_ms = comm.pp_ms_per_token * tokens
    return StepTime(
        total_ms=(busy + fixed) * 1e3 + tp_ms + pp_ms,
        memory_ms=mem_total * 1e3,
        compute_ms=compute_total * 1e3,
        tp_comm_ms=tp_ms,
        pp_comm_ms=pp_ms,
        layer_overhead_ms=fixed * 1e3,
        bound="memory" if memory_bound_time >= busy / 2 else "compute",
    )


class Communication(BaseModel):
    """Bytes the layout moves per token and the time that adds at the given link speeds."""

    tp_allreduce_bytes_per_token_per_layer: float = Field(
        description="Bytes each rank sends per token per layer: 2 all-reduces x hidden x act bytes x 2(tp-1)/tp (ring)."
    )
    tp_link_gbs: float = Field(description="Link the all-reduces use (inside a node), GB/s.")
    tp_ms_per_token: float = Field(description="All-reduce time per token over all layers.")
    pp_hop_bytes_per_token: float = Field(
        description="Bytes per token per stage hop: hidden_states + residual, hidden x act bytes each."
    )
    pp_hops: int = Field(description="Stage boundaries (pp - 1).")
    pp_hops_across_nodes: int = Field(description="Boundaries that cross the network.")
    network_gbs: float = Field(description="Inter-node link (--link-gbps / 8), GB/s.")
    pp_ms_per_token: float = Field(description="Hop time per token over all boundaries.")


def communication(
    shape: ModelShape, cluster: ClusterShape, *, tp: int, pp: int, act_bytes: int
) -> Communication:
    """Tensor- and pipeline-parallel traffic per token (bandwidth terms; per-message latency,
    5-20 us per all-reduce in practice, is not modelled)."""
    intra = cluster.device.interconnect_gbs * 1e9
    network = cluster.link_gbps / 8 * 1e9
    ring = 2 * (tp - 1) / tp
    ar_bytes = TP_ALLREDUCES_PER_LAYER * shape.hidden_size * act_bytes * ring
    hop_bytes = PP_TENSORS_PER_HOP * shape.hidden_size * act_bytes
    stages_per_node = max(1, cluster.devices_per_node // tp)
    across = sum(1 for i in range(pp - 1) if i // stages_per_node != (i + 1) // stages_per_node)
    pp_s = across * hop_bytes / network + (pp - 1 - across) * hop_bytes / intra
    return Communication(
        tp_allreduce_bytes_per_token_per_layer=ar_bytes,
        tp_link_gbs=cluster.device.interconnect_gbs,
        tp_ms_per_token=ar_bytes * shape.num_layers / intra * 1e3,
        pp_hop_bytes_per_token=hop_bytes,
        pp_hops=pp - 1,
        pp_hops_across_nodes=across,
        network_gbs=cluster.link_gbps / 8,
        pp_ms_per_token=pp_s * 1e3,
    )
