"""The plan: everything `llamacluster plan` reports (Plan and its parts, cost included) and
plan_deployment, which puts layout, memory, speed, traffic and cost together."""

from __future__ import annotations

import math

from pydantic import BaseModel, Field, computed_field

from cluster.planner.dtypes import GIB
from cluster.planner.layout import _evaluate, _max_model_len, choose_parallelism
from cluster.planner.memory import (
    _base_bytes,
    kv_bytes_per_token,
    resolve_kv_dtype,
    resolve_weight_dtype,
    weight_bytes,
)
from cluster.planner.options import ClusterShape, PlanOptions
from cluster.planner.params import ParamCount, count_parameters
from cluster.planner.shape import ModelShape
from cluster.planner.speed import Communication, StepTime, _step_time, communication
from cluster.planner.stages import StageMemory


class ModelSummary(BaseModel):
    """What the planner read from the config."""

    name: str
    model_type: str
    layers: int
    hidden_size: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab_size: int
    tied_embeddings: bool
    num_experts: int | None = None
    experts_per_token: int | None = None
    latent_attention: bool = False
    params: ParamCount
    weight_gib_by_dtype: dict[str, float] = Field(description="All weights in each dtype, GiB.")
    kv_bytes_per_token: int = Field(description="Whole model, at the plan's KV dtype.")


class Performance(BaseModel):
    """Ideal-bound speed estimates (divide by efficiency < 1 for realistic numbers)."""

    context_tokens: int = Field(
        description="Context each decoding sequence has (the prompt length)."
    )
    decode_batch1: StepTime = Field(description="One sequence: time per output token.")
    concurrency: int = Field(description="Requested concurrent sequences.")
    effective_concurrency: int = Field(
        description="Concurrency the KV cache holds at this context."
    )
    decode_at_concurrency: StepTime = Field(description="Time per output token of each sequence.")
    throughput_tokens_per_s: float = Field(
        description="Output tokens/s of the deployment at that concurrency."
    )
    prefill: StepTime = Field(
        description="One prompt of prompt_len tokens (time to first token floor)."
    )


class Cost(BaseModel):
    """Price of the output tokens at the estimated throughput."""

    cost_per_hour: float = Field(description="Whole cluster, dollars per hour.")
    dollars_per_million_tokens: float
    tokens_per_cent: float


class Plan(BaseModel):
    """Everything `llamacluster plan` reports; `up` reads tp and pp from it."""

    model: ModelSummary
    cluster: ClusterShape
    options: PlanOptions
    weight_dtype: str
    kv_dtype: str
    max_model_len: int
    tp: int
    pp: int
    memory: list[StageMemory] = Field(description="Per device of each pipeline stage.")
    kv_tokens: int = Field(description="KV-cache tokens the deployment holds (smallest stage).")
    sequences_fit: int = Field(description="Sequences of max_model_len tokens that fit at once.")
    performance: Performance
    communication: Communication
    cost: Cost | None = None
    notes: list[str] = Field(default_factory=list)

    @computed_field(description="tp x pp.")
    @property
    def devices_used(self) -> int:
        return self.tp * self.pp


def plan_deployment(
    model_shape: ModelShape, cluster_shape: ClusterShape, options: PlanOptions | None = None
) -> Plan:
    """Size a deployment: layout (tp x pp), per-device memory, speed bounds, traffic and cost.

    Used by `llamacluster plan` and by `up` for its tp x pp defaults; raises ConfigError (with
    the numbers) when nothing fits.
    """
    options = options or PlanOptions()
    shape, cluster = model_shape, cluster_shape
    tp, pp = choose_parallelism(shape, cluster, options=options)
    weight_dtype = resolve_weight_dtype(shape, options.dtype)
    kv_dtype = resolve_kv_dtype(options.kv_dtype, weight_dtype)
    act_bytes = _base_bytes(weight_dtype)
    max_len = _max_model_len(shape, options)
    layout, stages = _evaluate(
        shape, cluster, options, tp=tp, pp=pp, weight_dtype=weight_dtype, kv_dtype=kv_dtype
    )
    step = dict(tp=tp, act_bytes=act_bytes)
    context = options.prompt_len
    fit_at_context = max(1, layout.kv_tokens // (context + 1))
    effective = min(options.concurrency, fit_at_context)
    # With pp > 1 vLLM keeps pp micro-batches in flight; each stage works on concurrency / pp.
    micro = max(1, math.ceil(effective / pp))
    batch1 = _step_time(
        shape, cluster, stages, options, seqs=1, new_tokens=1, past_tokens=context, **step
    )
    at_conc = _step_time(
        shape, cluster, stages, options, seqs=micro, new_tokens=1, past_tokens=context, **step
    )
    prefill = _step_time(
        shape, cluster, stages, options, seqs=1, new_tokens=context, past_tokens=0, **step
    )
    throughput = effective / (at_conc.total_ms / 1e3)
    notes = [
        "speeds are ideal bounds (efficiency 1.0) unless --flops-efficiency/--bandwidth-efficiency "
        "say otherwise"
        if options.flops_efficiency == 1.0 and options.bandwidth_efficiency == 1.0
        else f"speeds use flops efficiency {options.flops_efficiency:g} and bandwidth efficiency "
        f"{options.bandwidth_efficiency:g}",
    ]
    if effective < options.concurrency:
        notes.append(
            f"the KV cache holds only {fit_at_context} sequences of {context + 1} tokens; "
            f"throughput is for {effective}, not {options.concurrency}"
        )
    if context > max_len:
        notes.append(f"prompt length {context} exceeds max_model_len {max_len}")
    cost = None
    if options.cost_per_hour is not None:
        per_hour = throughput * 3600
        cost = Cost(
            cost_per_hour=options.cost_per_hour,
            dollars_per_million_tokens=options.cost_per_hour / per_hour * 1e6,
            tokens_per_cent=per_hour / (options.cost_per_hour * 100),
        )
    counts = count_parameters(shape)
    return Plan(
        model=ModelSummary(
            name=shape.name,
            model_type=shape.model_type,
            layers=shape.num_layers,
            hidden_size=shape.hidden_size,
            heads=shape.num_heads,
            kv_heads=shape.num_kv_heads,
            head_dim=shape.head_dim,
            vocab_size=shape.vocab_size,
            tied_embeddings=shape.tied_embeddings,
            num_experts=shape.moe.num_experts if shape.moe else None,
            experts_per_token=shape.moe.experts_per_token if shape.moe else None,
            latent_attention=shape.mla is not None,
            params=counts,
            weight_gib_by_dtype={d: weight_bytes(shape, d) / GIB for d in ("bf16", "fp8", "int4")},
            kv_bytes_per_token=kv_bytes_per_token(shape, kv_dtype),
        ),
        cluster=cluster,
        options=options,
        weight_dtype=weight_dtype,
        kv_dtype=kv_dtype,
        max_model_len=max_len,
        tp=tp,
        pp=pp,
        memory=layout.stages,
        kv_tokens=layout.kv_tokens,
        sequences_fit=layout.kv_tokens // max_len,
        performance=Performance(
            context_tokens=context,
            decode_batch1=batch1,
            concurrency=options.concurrency,
            effective_concurrency=effective,
            decode_at_concurrency=at_conc,
            throughput_tokens_per_s=throughput,
            prefill=prefill,
        ),
        communication=communication(shape, cluster, tp=tp, pp=pp, act_bytes=act_bytes),
        cost=cost,
        notes=notes,
    )
