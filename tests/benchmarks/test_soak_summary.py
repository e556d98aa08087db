"""The soak benchmark's summaries: 5xx count, TTFT windows and drift, memory growth."""

from __future__ import annotations

from benchmarks.bench_faults import Sample
from benchmarks.bench_soak import drift_pct, percentile, rss_growth, summarize


def sample(started: float, *, ttft: float | None = 0.1, ok: bool = True, status: int = 200):
    return Sample(
        started=started,
        finished=started + 1.0,
        ok=ok,
        kind=None if ok else f"http_{status}",
        tokens=32 if ok else 0,
        max_gap_s=0.1,
        ttft_s=ttft if ok else None,
        status=status,
    )


def test_percentile_and_drift() -> None:
    assert percentile([], 99) is None
    assert percentile([3.0], 99) == 3.0
    assert percentile([float(i) for i in range(1, 101)], 50) == 50.5
    assert round(percentile([float(i) for i in range(1, 101)], 99), 2) == 99.01
    assert drift_pct(0.2, 0.25) == 25.0
    assert drift_pct(None, 1.0) is None and drift_pct(0.0, 1.0) is None


def test_summary_counts_5xx_and_compares_the_first_and_last_window() -> None:
    samples = [sample(t, ttft=0.1) for t in range(0, 300, 3)]  # first 5 minutes
    samples += [sample(t, ttft=0.2) for t in range(300, 600, 3)]  # later: slower first tokens
    samples += [sample(120.0, ok=False, status=503), sample(130.0, ok=False, status=429)]
    out = summarize(samples, t0=0.0, t_end=600.0, window_s=300.0)
    assert out["requests"] == 202 and out["failed"] == 2
    assert out["http_5xx"] == 1
    assert out["failed_by_kind"] == {"http_503": 1, "http_429": 1}
    assert out["ttft_first_window"]["p99_s"] == 0.1
    assert out["ttft_last_window"]["p99_s"] == 0.2
    assert out["ttft_p99_drift_pct"] == 100.0


def test_rss_growth_per_process_kind() -> None:
    growth = rss_growth({"replica": 1000, "engine_core": 2000}, {"replica": 1030, "ray_worker": 5})
    assert growth == {"engine_core": None, "ray_worker": None, "replica": 3.0}
