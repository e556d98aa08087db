"""The throughput client: seeded workloads, closed/open-loop load, chunk-level timing, reports."""

from cluster.bench.config import BenchConfig, Endpoint, LoadConfig, LoadPoint, Slo, WorkloadConfig
from cluster.bench.metrics import PointMetrics, Stats
from cluster.bench.runner import (
    BenchResult,
    EndpointInfo,
    PointObserver,
    run_benchmark,
    run_benchmark_async,
)

__all__ = [
    "BenchConfig",
    "BenchResult",
    "Endpoint",
    "EndpointInfo",
    "LoadConfig",
    "LoadPoint",
    "PointMetrics",
    "PointObserver",
    "Slo",
    "Stats",
    "WorkloadConfig",
    "run_benchmark",
    "run_benchmark_async",
]
