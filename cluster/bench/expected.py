"""What `plan` expected for a bench run against a llamacluster cluster: the recorded model,
layout and devices planned at the run's shape, and the measured / expected ratios."""

from __future__ import annotations

from dataclasses import dataclass

from rich.table import Table

from cluster.bench.metrics import PointMetrics
from cluster.bench.runner import BenchResult
from cluster.errors import ConfigError


@dataclass(frozen=True)
class Expected:
    """The planner's expected figures for one concurrency."""

    concurrency: int
    tpot_ms: float
    ttft_ms: float
    output_tokens_per_s: float


def cluster_expectations(
    name: str, *, input_len: int, output_len: int, concurrencies: list[int]
) -> tuple[list[Expected], str]:
    """Plan the recorded cluster ``name`` (its model, tp x pp and devices) at each concurrency,
    prompt ``input_len``; returns the figures and a line saying what was planned."""
    from cluster.device_specs import device_for_gpu_name, get_device
    from cluster.planner import ClusterShape, PlanOptions, load_model_shape, plan_deployment
    from cluster.recorded import RecordedCluster
    from cluster.stages.measure import measured_cpu_spec, measured_gpu_spec

    state = RecordedCluster.load(name).state
    if not state.model.dir or not state.server.tp or not state.nodes:
        raise ConfigError(f"cluster {name!r} records no served model and layout")
    shape = load_model_shape(state.model.dir)
    head = state.nodes[0]
    if head.device_kind == "gpu":
        gpu = head.device_info.get("gpu", "")
        device = (
            measured_gpu_spec(state.nodes, state.measure)
            or device_for_gpu_name(gpu)
            or get_device("h100-sxm")
        )
    else:
        device = measured_cpu_spec(state.nodes, state.measure) or get_device("cpu")
    cluster = ClusterShape(
        nodes=len(state.nodes),
        devices_per_node=max(1, min(n.devices for n in state.nodes)),
        device=device,
    )
    out = []
    plan = None
    for c in concurrencies:
        options = PlanOptions(
            tp=state.server.tp,
            pp=state.server.pp or 1,
            prompt_len=input_len,
            concurrency=c,
            max_model_len=input_len + output_len,
            mem_fraction=1.0,
        )
        plan = plan_deployment(shape, cluster, options)
        e = plan.performance.expected
        out.append(
            Expected(
                concurrency=c,
                tpot_ms=e.decode_at_concurrency.total_ms,
                ttft_ms=e.ttft_ms,
                output_tokens_per_s=e.throughput_tokens_per_s,
            )
        )
    assert plan is not None
    what = (
        f"expected: plan of {shape.name} tp={plan.tp} x pp={plan.pp} on {device.name} "
        f"({device.source}); {plan.performance.expected.efficiency}"
    )
    return out, what


def _ratio(measured: float, expected: float) -> str:
    return f"{measured / expected:.2f}" if expected > 0 and measured == measured else "-"


def expected_table(result: BenchResult, expected: list[Expected]) -> Table | None:
    """Measured next to expected per concurrency point of the main endpoint, with the ratios
    measured / expected (above 1: slower than planned for latencies, faster for tokens/s)."""
    by_c = {e.concurrency: e for e in expected}
    points: list[tuple[PointMetrics, Expected]] = [
        (p, by_c[int(p.x)])
        for p in result.points
        if p.mode == "closed" and int(p.x) in by_c and p.endpoint == result.points[0].endpoint
    ]
    if not points:
        return None
    table = Table(title="measured vs plan's expected", header_style="bold")
    for col in ("load", "TPOT p50 ms", "expected", "ratio", "TTFT p50 ms", "expected", "ratio",
                "out tok/s", "expected", "ratio"):  # fmt: skip
        table.add_column(col, justify="right")
    for p, e in points:
        table.add_row(
            p.point,
            f"{p.tpot_ms.p50:.2f}",
            f"{e.tpot_ms:.2f}",
            _ratio(p.tpot_ms.p50, e.tpot_ms),
            f"{p.ttft_ms.p50:.1f}",
            f"{e.ttft_ms:.1f}",
            _ratio(p.ttft_ms.p50, e.ttft_ms),
            f"{p.output_throughput:,.1f}",
            f"{e.output_tokens_per_s:,.1f}",
            _ratio(p.output_throughput, e.output_tokens_per_s),
        )
    return table
