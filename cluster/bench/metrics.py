"""Pure arithmetic: per-request records to aggregate figures (percentiles, rates, goodput, cost)."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from cluster.bench.client import RequestRecord
from cluster.bench.config import Slo

PERCENTILES = (50, 90, 99)


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default method); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@dataclass(frozen=True)
class Stats:
    """Summary of one latency distribution, in milliseconds."""

    n: int
    mean: float
    p50: float
    p90: float
    p99: float
    min: float
    max: float

    @classmethod
    def of_seconds(cls, values: Sequence[float]) -> Stats:
        """Stats of ``values`` given in seconds, reported in milliseconds."""
        ms = [v * 1000.0 for v in values]
        if not ms:
            nan = math.nan
            return cls(0, nan, nan, nan, nan, nan, nan)
        p50, p90, p99 = (percentile(ms, q) for q in PERCENTILES)
        return cls(len(ms), sum(ms) / len(ms), p50, p90, p99, min(ms), max(ms))


@dataclass(frozen=True)
class Cost:
    """What the output tokens cost at a given hourly price of the serving hardware."""

    cost_per_hour: float
    tokens_per_dollar: float
    tokens_per_cent: float
    dollars_per_million_tokens: float


def cost_figures(output_tokens_per_s: float, cost_per_hour: float) -> Cost:
    """Tokens per dollar and per cent, and dollars per million output tokens, at full load."""
    per_dollar = output_tokens_per_s * 3600.0 / cost_per_hour
    per_million = 1e6 / per_dollar if per_dollar > 0 else math.inf
    return Cost(cost_per_hour, per_dollar, per_dollar / 100.0, per_million)


def meets_slo(record: RequestRecord, slo: Slo) -> bool:
    """True when a successful request is within every bound of the SLO."""
    if not record.ok:
        return False
    checks = (
        (slo.ttft_ms, record.ttft_s),
        (slo.tpot_ms, record.tpot_s or 0.0),  # a one-token answer has no per-token time
        (slo.e2e_ms, record.e2e_s),
    )
    return all(bound is None or (v is not None and v * 1000.0 <= bound) for bound, v in checks)


@dataclass
class PointMetrics:
    """Every aggregate figure of one endpoint at one sweep point."""

    endpoint: str
    point: str
    x: float
    mode: str
    requests: int
    completed: int
    failed: int
    errors: dict[str, int]
    duration_s: float
    input_tokens: int
    output_tokens: int
    request_throughput: float
    output_throughput: float
    total_token_throughput: float
    ttft_ms: Stats
    tpot_ms: Stats
    itl_ms: Stats
    e2e_ms: Stats
    tokens_per_chunk: float
    max_tokens_per_chunk: float
    token_sources: dict[str, int]
    prompt_sources: dict[str, int]
    full_length_fraction: float
    goodput: float | None = None
    slo_attainment: float | None = None
    cost: Cost | None = None
    # Columns other code attaches (e.g. network kB per token per node); shown in every output.
    extra: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready figures."""
        return asdict(self)

    def flat(self) -> dict[str, Any]:
        """One flat row (for CSV): nested stats become ttft_ms_p50 and so on."""
        row: dict[str, Any] = {}
        for key, value in self.to_dict().items():
            if key in ("extra", "cost") and value is not None:
                row.update(value)
            elif isinstance(value, dict) and key in ("errors", "token_sources", "prompt_sources"):
                row[key] = ";".join(f"{k}:{v}" for k, v in sorted(value.items()))
            elif isinstance(value, dict):
                for sub, v in value.items():
                    row[f"{key}_{sub}"] = v
            elif key == "cost":
                continue
            else:
                row[key] = value
        return row


def aggregate(
    records: Sequence[RequestRecord],
    *,
    endpoint: str,
    point: str,
    x: float,
    mode: str,
    duration_s: float,
    slo: Slo,
    cost_per_hour: float | None = None,
) -> PointMetrics:
    """Figures of one point from its measured records and the time they took (rounds summed)."""
    ok = [r for r in records if r.ok]
    errors = Counter(r.error_kind or "unknown" for r in records if not r.ok)
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens or 0 for r in ok)
    dur = duration_s if duration_s > 0 else math.nan
    chunks = sum(r.token_chunks for r in ok)
    per_req_tpc = [r.output_tokens / r.token_chunks for r in ok if r.token_chunks]
    out_tps = out_tokens / dur
    metrics = PointMetrics(
        endpoint=endpoint,
        point=point,
        x=x,
        mode=mode,
        requests=len(records),
        completed=len(ok),
        failed=len(records) - len(ok),
        errors=dict(sorted(errors.items())),
        duration_s=duration_s,
        input_tokens=in_tokens,
        output_tokens=out_tokens,
        request_throughput=len(ok) / dur,
        output_throughput=out_tps,
        total_token_throughput=(in_tokens + out_tokens) / dur,
        ttft_ms=Stats.of_seconds([r.ttft_s for r in ok if r.ttft_s is not None]),
        tpot_ms=Stats.of_seconds([t for r in ok if (t := r.tpot_s) is not None]),
        itl_ms=Stats.of_seconds([g for r in ok for g in r.itls]),
        e2e_ms=Stats.of_seconds([r.e2e_s for r in ok if r.e2e_s is not None]),
        tokens_per_chunk=out_tokens / chunks if chunks else math.nan,
        max_tokens_per_chunk=max(per_req_tpc, default=math.nan),
        token_sources=dict(Counter(r.token_source or "none" for r in ok)),
        prompt_sources=dict(Counter(r.prompt_source or "none" for r in ok)),
        full_length_fraction=_full_length_fraction(ok),
    )
    if not slo.is_empty():
        good = sum(meets_slo(r, slo) for r in ok)
        metrics.goodput = good / dur
        metrics.slo_attainment = good / len(records) if records else math.nan
    if cost_per_hour:
        metrics.cost = cost_figures(out_tps, cost_per_hour)
    return metrics


def _full_length_fraction(ok: Sequence[RequestRecord]) -> float:
    """Share of answers that reached max_tokens, judged on server-counted tokens only."""
    counted = [r for r in ok if r.token_source == "usage"]
    if not counted:
        return math.nan
    return sum(r.output_tokens >= r.max_tokens for r in counted) / len(counted)


RATIO_METRICS: dict[str, tuple[str, str | None]] = {
    # name in the ratio table: (attribute, stats field or None)
    "output_tok/s": ("output_throughput", None),
    "total_tok/s": ("total_token_throughput", None),
    "req/s": ("request_throughput", None),
    "ttft_p50": ("ttft_ms", "p50"),
    "ttft_p99": ("ttft_ms", "p99"),
    "tpot_p50": ("tpot_ms", "p50"),
    "tpot_p99": ("tpot_ms", "p99"),
    "itl_p50": ("itl_ms", "p50"),
    "e2e_p50": ("e2e_ms", "p50"),
    "e2e_p99": ("e2e_ms", "p99"),
}


def metric_value(m: PointMetrics, name: str) -> float:
    """One named figure of RATIO_METRICS from a point."""
    attr, sub = RATIO_METRICS[name]
    value = getattr(m, attr)
    return float(getattr(value, sub) if sub else value)


def ratios(candidate: PointMetrics, baseline: PointMetrics) -> dict[str, float]:
    """candidate / baseline for every figure of RATIO_METRICS (NaN where the baseline is 0)."""
    out = {}
    for name in RATIO_METRICS:
        a, b = metric_value(candidate, name), metric_value(baseline, name)
        out[name] = a / b if b and not math.isnan(b) else math.nan
    return out
