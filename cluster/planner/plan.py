"""The plan: everything `llamacluster plan` reports (Plan and its parts, cost included) and
plan_deployment, which puts layout, memory, speed, traffic and cost together."""

from __future__ import annotations

import math

from pydantic import BaseModel, Field, computed_field

from cluster.planner.dtypes import GIB
from cluster.planner.efficiency import IDEAL, StepEfficiency, expected_efficiency
from cluster.planner.engine_options import DraftCost, plan_weight_dtype
from cluster.planner.layout import _evaluate, _max_model_len, choose_parallelism
from cluster.planner.memory import (
    _base_bytes,
    kv_bytes_per_token,
    max_num_batched_tokens,
    resolve_kv_dtype,
    weight_bytes,
)
from cluster.planner.options import ClusterShape, PlanOptions
from cluster.planner.params import ParamCount, count_parameters
from cluster.planner.replicas import ReplicaChoice, choose_replicas
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


class Figures(BaseModel):
    """Speed of the deployment at one set of efficiencies (ideal, or expected)."""

    efficiency: str = Field(description="Where the efficiencies come from.")
    decode_batch1: StepTime = Field(description="One sequence: time per output token.")
    decode_at_concurrency: StepTime = Field(description="Time per output token of each sequence.")
    throughput_tokens_per_s: float = Field(
        description="Output tokens/s of the deployment at the effective concurrency."
    )
    prefill: StepTime = Field(description="One prompt of prompt_len tokens in one step.")
    ttft_ms: float = Field(
        description="Time to first token of one prompt: its prefill in chunks of vLLM's "
        "max_num_batched_tokens, each chunk reading the weights again."
    )


class Performance(BaseModel):
    """Speed: the ideal bound (efficiency 1.0) and the expected figure (fitted efficiency)."""

    context_tokens: int = Field(
        description="Context each decoding sequence has (the prompt length)."
    )
    concurrency: int = Field(description="Requested concurrent sequences.")
    effective_concurrency: int = Field(
        description="Concurrency the KV cache holds at this context."
    )
    ideal: Figures = Field(description="Roofline at datasheet rates (efficiency 1.0).")
    expected: Figures = Field(description="At the efficiencies a real engine reaches.")

    @property
    def decode_batch1(self) -> StepTime:
        """The ideal batch-1 decode step."""
        return self.ideal.decode_batch1

    @property
    def decode_at_concurrency(self) -> StepTime:
        """The ideal decode step at the effective concurrency."""
        return self.ideal.decode_at_concurrency

    @property
    def prefill(self) -> StepTime:
        """The ideal prefill step."""
        return self.ideal.prefill

    @property
    def throughput_tokens_per_s(self) -> float:
        """The ideal throughput."""
        return self.ideal.throughput_tokens_per_s


def _figures(
    shape: ModelShape,
    cluster: ClusterShape,
    stages: list,
    efficiency: StepEfficiency,
    *,
    tp: int,
    act_bytes: int,
    context: int,
    effective: int,
    chunk_tokens: int,
) -> Figures:
    """Decode, throughput, prefill and TTFT of one layout at one set of efficiencies."""
    pp = len(stages)
    step = dict(tp=tp, act_bytes=act_bytes)
    # With pp > 1 vLLM keeps pp micro-batches in flight; each stage works on concurrency / pp.
    micro = max(1, math.ceil(effective / pp))
    batch1 = _step_time(
        shape, cluster, stages, efficiency, seqs=1, new_tokens=1, past_tokens=context, **step
    )
    at_conc = _step_time(
        shape, cluster, stages, efficiency, seqs=micro, new_tokens=1, past_tokens=context, **step
    )
    prefill = _step_time(
        shape, cluster, stages, efficiency, seqs=1, new_tokens=context, past_tokens=0, **step
    )
    ttft = 0.0
    for start in range(0, context, chunk_tokens):
        size = min(chunk_tokens, context - start)
        ttft += _step_time(
            shape, cluster, stages, efficiency, seqs=1, new_tokens=size, past_tokens=start, **step
        ).total_ms
    return Figures(
        efficiency=efficiency.label,
        decode_batch1=batch1,
        decode_at_concurrency=at_conc,
        throughput_tokens_per_s=effective / (at_conc.total_ms / 1e3),
        prefill=prefill,
        ttft_ms=ttft,
    )


class KVOffload(BaseModel):
    """vLLM's CPU KV offload: a host-memory cache of computed KV blocks (a prefix cache).

    Decoding sequences keep their KV on the device, so it does not raise the concurrency; a
    prompt whose prefix is found there is loaded back over the host link instead of recomputed.
    """

    host_gib: float = Field(description="Host memory it takes, all tensor-parallel ranks.")
    tokens: int = Field(description="Tokens of KV it holds.")
    host_link_gbs: float = Field(description="Device-host link it travels over, GB/s.")
    prompt_load_ms: float = Field(
        description="Time to load the KV of one prompt of prompt_len tokens back to the device."
    )
    prompt_recompute_ms: float = Field(description="Expected TTFT of the same prompt without it.")


class Cost(BaseModel):
    """Price of the output tokens at the expected throughput."""

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
    kv_offload: KVOffload | None = Field(default=None, description="With --kv-offload-gb.")
    speculative: DraftCost | None = Field(
        default=None, description="The draft's memory, with --speculative-config."
    )
    cost: Cost | None = None
    replicas: ReplicaChoice = Field(
        description="How many tp x pp replicas the cluster holds (`up --replicas auto`); the "
        "speed and cost figures are for one replica."
    )
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
    weight_dtype = plan_weight_dtype(shape, options.dtype, options.quantization)
    kv_dtype = resolve_kv_dtype(options.kv_dtype, weight_dtype)
    act_bytes = _base_bytes(weight_dtype)
    max_len = _max_model_len(shape, options)
    layout, stages = _evaluate(
        shape, cluster, options, tp=tp, pp=pp, weight_dtype=weight_dtype, kv_dtype=kv_dtype
    )
    context = options.prompt_len
    fit_at_context = max(1, layout.kv_tokens // (context + 1))
    effective = min(options.concurrency, fit_at_context)
    figures = dict(
        tp=tp,
        act_bytes=act_bytes,
        context=context,
        effective=effective,
        chunk_tokens=max_num_batched_tokens(cluster.device),
    )
    ideal = _figures(shape, cluster, stages, IDEAL, **figures)
    efficiency = expected_efficiency(
        cluster.device,
        bandwidth_efficiency=options.bandwidth_efficiency,
        flops_efficiency=options.flops_efficiency,
    )
    expected = _figures(shape, cluster, stages, efficiency, **figures)
    throughput = expected.throughput_tokens_per_s
    notes = [f"expected speeds: {efficiency.label}"]
    if effective < options.concurrency:
        notes.append(
            f"the KV cache holds only {fit_at_context} sequences of {context + 1} tokens; "
            f"throughput is for {effective}, not {options.concurrency}"
        )
    if context > max_len:
        notes.append(f"prompt length {context} exceeds max_model_len {max_len}")
    offload = None
    if options.kv_offload_gib is not None:
        per_rank = max(st.kv_bytes_per_token for st in stages)
        link = cluster.device.host_link_gbs * 1e9
        offload = KVOffload(
            host_gib=options.kv_offload_gib,
            tokens=int(options.kv_offload_gib * GIB / (per_rank * tp)),
            host_link_gbs=cluster.device.host_link_gbs,
            prompt_load_ms=context * per_rank / link * 1e3,
            prompt_recompute_ms=expected.ttft_ms,
        )
        notes.append(
            f"KV offload: {offload.tokens:,} tokens in {offload.host_gib:g} GiB of host memory "
            f"(a prefix cache: decode concurrency is unchanged); a cached {context}-token prompt "
            f"loads in {offload.prompt_load_ms:.2f} ms instead of a {expected.ttft_ms:.2f} ms "
            "prefill"
            + (
                "; on CPU nodes the device memory is host memory already"
                if cluster.device.is_cpu
                else ""
            )
        )
    if options.draft is not None:
        notes.append(
            f"speculative decoding ({options.draft.method}, "
            f"{options.draft.num_speculative_tokens} tokens): memory counted on the last stage "
            f"({options.draft.source}); its speed-up depends on the acceptance rate and is not "
            "in the figures"
        )
    if options.quantization is not None:
        notes.append(
            f"--quantization {options.quantization}: {weight_dtype} weights; reads shrink with "
            "them (on the efficiency curve at the smaller layer size), compute stays at the "
            "bf16 peak"
        )
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
            concurrency=options.concurrency,
            effective_concurrency=effective,
            ideal=ideal,
            expected=expected,
        ),
        communication=communication(shape, cluster, tp=tp, pp=pp, act_bytes=act_bytes),
        kv_offload=offload,
        speculative=options.draft,
        cost=cost,
        replicas=choose_replicas([cluster.devices_per_node] * cluster.nodes, tp=tp, pp=pp),
        notes=notes,
    )
