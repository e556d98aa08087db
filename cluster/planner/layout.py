"""Layout search: the tp x pp layouts vLLM accepts and the cluster allows, the per-device
memory of each, and the smallest that fits (choose_parallelism), else an error with the numbers."""

from __future__ import annotations

import math

from pydantic import BaseModel

from cluster.errors import ConfigError
from cluster.planner.dtypes import GIB
from cluster.planner.engine_options import plan_weight_dtype
from cluster.planner.memory import (
    kv_bytes_per_token,
    resolve_kv_dtype,
    weight_bytes,
)
from cluster.planner.options import ClusterShape, PlanOptions
from cluster.planner.shape import ModelShape
from cluster.planner.stages import StageMemory, _build_stages, _Stage, _stage_memory


def tp_violation(shape: ModelShape, tp: int) -> str | None:
    """Why vLLM would refuse tensor-parallel size ``tp`` for this model, or None if it accepts it.

    vLLM's rules (vllm/config/model.py, vllm/model_executor/layers/linear.py): the attention heads
    must divide evenly; KV heads must divide evenly by tp, or, when tp exceeds them, tp must be a
    multiple of their number (each KV head is then replicated tp / kv_heads times).
    """
    if shape.num_heads % tp:
        return f"{shape.num_heads} attention heads are not divisible by tp={tp}"
    if shape.mla is None:
        kv = shape.num_kv_heads
        if tp <= kv and kv % tp:
            return f"{kv} KV heads are not divisible by tp={tp}"
        if tp > kv and tp % kv:
            return f"tp={tp} is not a multiple of the {kv} KV heads (needed to replicate them)"
    return None


class _Layout(BaseModel):
    tp: int
    pp: int
    stages: list[StageMemory]
    kv_tokens: int


def _candidate_layouts(
    shape: ModelShape, cluster: ClusterShape, options: PlanOptions
) -> list[tuple[int, int]]:
    """Every (tp, pp) allowed, smallest device count first, then the larger tp (fewer stages).

    tp is a power of two that vLLM accepts, inside one node. Pipeline stages are added only once
    tp fills what a node allows (or tp is forced): tensor parallelism wants the fast in-node link,
    pipeline hops cost little and may cross the network. Stages are spread over the nodes
    (devices_per_node // tp per node) and never outnumber the layers.
    """
    tps = []
    tp = 1
    while tp <= cluster.devices_per_node:
        if tp_violation(shape, tp) is None:
            tps.append(tp)
        tp *= 2
    widest = max(tps)
    out = []
    for tp in tps:
        if options.tp not in (None, tp):
            continue
        max_pp = min(shape.num_layers, cluster.nodes * (cluster.devices_per_node // tp))
        if tp != widest and options.tp is None and options.pp is None:
            max_pp = 1
        out.extend((tp, pp) for pp in range(1, max_pp + 1) if options.pp in (None, pp))
    return sorted(out, key=lambda layout: (layout[0] * layout[1], -layout[0]))


def _check_forced_layout(shape: ModelShape, cluster: ClusterShape, options: PlanOptions) -> None:
    if options.tp is not None:
        why = tp_violation(shape, options.tp)
        if why is None and options.tp > cluster.devices_per_node:
            why = f"tp={options.tp} exceeds the {cluster.devices_per_node} devices of one node"
        if why is None and options.tp & (options.tp - 1):
            why = f"tp={options.tp} is not a power of two"
        if why:
            raise ConfigError(
                f"cannot use --tp {options.tp}: {why}", hint="pick another --tp or leave it out"
            )
    if options.pp is not None and options.pp > shape.num_layers:
        raise ConfigError(f"--pp {options.pp} exceeds the model's {shape.num_layers} layers")
    tp = options.tp or 1
    if options.pp is not None and options.pp * tp > cluster.total_devices:
        raise ConfigError(
            f"tp={tp} x pp={options.pp} needs {tp * options.pp} devices; the cluster has "
            f"{cluster.total_devices}",
            hint="lower --tp/--pp or add nodes",
        )


def _evaluate(
    shape: ModelShape,
    cluster: ClusterShape,
    options: PlanOptions,
    *,
    tp: int,
    pp: int,
    weight_dtype: str,
    kv_dtype: str,
) -> tuple[_Layout, list[_Stage]]:
    stages = _build_stages(
        shape, tp=tp, pp=pp, weight_dtype=weight_dtype, kv_dtype=kv_dtype, draft=options.draft
    )
    memory = [
        _stage_memory(
            s, shape, cluster, tp=tp, weight_dtype=weight_dtype, mem_fraction=options.mem_fraction
        )
        for s in stages
    ]
    return _Layout(tp=tp, pp=pp, stages=memory, kv_tokens=min(m.kv_tokens for m in memory)), stages


def _max_model_len(shape: ModelShape, options: PlanOptions) -> int:
    if options.max_model_len is not None:
        return options.max_model_len
    if shape.max_position_embeddings is None:
        raise ConfigError(
            "config.json does not say the model's context length", hint="pass --max-model-len"
        )
    return shape.max_position_embeddings


def _describe_cluster(cluster: ClusterShape) -> str:
    return (
        f"{cluster.nodes} node{'s' if cluster.nodes > 1 else ''} x {cluster.devices_per_node} "
        f"{cluster.device.name} ({cluster.device.memory_gib:g} GiB)"
    )


def _no_fit_error(
    shape: ModelShape,
    cluster: ClusterShape,
    options: PlanOptions,
    layouts: list[tuple[int, int]],
    *,
    weight_dtype: str,
    kv_dtype: str,
    max_len: int,
) -> ConfigError:
    tp, pp = max(layouts, key=lambda layout: (layout[0] * layout[1], layout[0]))
    layout, _ = _evaluate(
        shape, cluster, options, tp=tp, pp=pp, weight_dtype=weight_dtype, kv_dtype=kv_dtype
    )

    def shortfall(m: StageMemory) -> float:
        return m.weights_gib + m.headroom_gib + m.kv_bytes_per_token * max_len / GIB - m.budget_gib

    worst = max(layout.stages, key=shortfall)
    need_kv = worst.kv_bytes_per_token * max_len / GIB
    need = worst.weights_gib + worst.headroom_gib + need_kv
    # Devices needed if memory split perfectly: all weights + one sequence of KV over the
    # per-device budget left after headroom.
    total_need = (
        weight_bytes(shape, weight_dtype) / GIB
        + kv_bytes_per_token(shape, kv_dtype) * max_len / GIB
    )
    per_device = worst.budget_gib - worst.headroom_gib
    devices = math.ceil(total_need / per_device) if per_device > 0 else None
    int4 = weight_bytes(shape, "int4") / GIB
    name = shape.name or shape.model_type or "the model"
    more = f"about {devices} or more devices" if devices else "devices with more memory"
    return ConfigError(
        f"{name} ({weight_bytes(shape, weight_dtype) / GIB:.1f} GiB of {weight_dtype} weights) does "
        f"not fit on {_describe_cluster(cluster)}: at the largest layout (tp={tp}, pp={pp}) the "
        f"fullest device needs {need:.1f} GiB ({worst.weights_gib:.1f} GiB weights + "
        f"{worst.headroom_gib:.1f} GiB runtime headroom + {need_kv:.2f} GiB KV cache for one "
        f"{max_len}-token "
        f"sequence) but may use {worst.budget_gib:.1f} GiB ({options.mem_fraction:g} x "
        f"{worst.device_gib:g} GiB)",
        hint=f"use {more}, smaller weights (--dtype int4: {int4:.1f} GiB), a shorter "
        "--max-model-len, --kv-dtype fp8, or a higher --mem-fraction",
    )


def choose_parallelism(
    shape: ModelShape, cluster: ClusterShape, *, options: PlanOptions | None = None
) -> tuple[int, int]:
    """The smallest tp x pp that fits: tp inside a node (power of two vLLM accepts), pp across
    nodes, each device's weights + runtime headroom + one max_model_len sequence of KV cache
    within mem_fraction of its memory (vLLM refuses to start otherwise).

    Raises ConfigError with the numbers when no layout fits.
    """
    options = options or PlanOptions()
    _check_forced_layout(shape, cluster, options)
    weight_dtype = plan_weight_dtype(shape, options.dtype, options.quantization)
    kv_dtype = resolve_kv_dtype(options.kv_dtype, weight_dtype)
    max_len = _max_model_len(shape, options)
    layouts = _candidate_layouts(shape, cluster, options)
    if not layouts:
        raise ConfigError(
            f"no tensor/pipeline layout of {_describe_cluster(cluster)} suits this model",
            hint="check --tp/--pp against the devices per node and the model's heads",
        )
    for tp, pp in layouts:
        layout, _ = _evaluate(
            shape, cluster, options, tp=tp, pp=pp, weight_dtype=weight_dtype, kv_dtype=kv_dtype
        )
        if layout.kv_tokens >= max_len:
            return tp, pp
    raise _no_fit_error(
        shape,
        cluster,
        options,
        layouts,
        weight_dtype=weight_dtype,
        kv_dtype=kv_dtype,
        max_len=max_len,
    )
