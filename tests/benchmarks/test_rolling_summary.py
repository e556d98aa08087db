"""The rolling-update benchmark's arithmetic over saved requests."""

from __future__ import annotations

from benchmarks.bench_rolling import gaps


def _rec(start: float, e2e: float, ok: bool = True, status: int | None = 200, kind=None) -> dict:
    return {"started_at": start, "e2e_s": e2e, "ok": ok, "status": status, "error_kind": kind}


def test_gaps_counts_failures_and_the_longest_time_between_successes():
    records = [
        _rec(0.0, 1.0),  # done at 1.0
        _rec(0.5, 1.0),  # 1.5
        _rec(1.0, 0.2, ok=False, status=503),
        _rec(2.0, 0.1, ok=False, status=None, kind="connect"),
        _rec(5.0, 2.0),  # 7.0: the gap 1.5 -> 7.0
        _rec(7.5, 0.5),  # 8.0
    ]
    got = gaps(records)
    assert got["requests"] == 6
    assert got["failed"] == 2
    assert got["failed_by_kind"] == {"503": 1, "connect": 1}
    assert abs(got["longest_gap_s"] - 5.5) < 1e-9


def test_gaps_of_nothing_or_one_success():
    assert gaps([])["longest_gap_s"] == 0.0
    assert gaps([_rec(0, 1)]) == {
        "requests": 1,
        "failed": 0,
        "failed_by_kind": {},
        "longest_gap_s": 0.0,
    }
