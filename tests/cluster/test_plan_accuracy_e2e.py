"""The planner's expected decode speed against the real server on this machine
(benchmarks/bench_plan_accuracy.py's own code path: `up --local` with its measure stage, `plan`
on what it recorded, `llamacluster bench` at c=1). To fit the CI budget the model is smaller
than the benchmark's 1 GB and served without vLLM's compile (minutes on a fresh machine), so
the bound is looser than its 25 %: the engine's fixed per-step cost, which the plan leaves out,
is a larger share of a smaller, uncompiled step."""

from __future__ import annotations

import pytest

from benchmarks.bench_plan_accuracy import parse_args, run

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1500)]

SIZE_MB = 600
# The plan is the fast end: it leaves out the engine's per-step work (scheduling, sampling, the
# Ray hop, the stream) and the Python between the kernels of an uncompiled step. Measured -29 %
# compiled and -47 % eager on a 2-core AVX2 machine serving fp32 (the slowest seen).
SLOWER_AT_MOST = 0.6
FASTER_AT_MOST = 0.1


def test_plan_predicts_the_servers_decode_speed_at_c1(tmp_path, monkeypatch):
    # run() points LLAMACLUSTER_HOME at its own home; monkeypatch puts the old value back.
    monkeypatch.setenv("LLAMACLUSTER_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    row = run(parse_args(["--size-mb", str(SIZE_MB), "--eager", "--requests", "8"]), tmp_path)
    print(
        f"\nplan {row['expected_decode_ms']:.2f} ms/token, measured TPOT p50 "
        f"{row['measured_tpot_p50_ms']:.2f} ms ({row['relative_error']:+.1%}); on the plain "
        f"read {row['expected_decode_ms_from_read']:.2f} ms ({row['relative_error_from_read']:+.1%})"
        f"; up {row['up_s']} s"
    )
    assert row["completed"] == 8
    # The measured per-layer cost is part of the expected figure.
    assert row["layer_overhead_ms"] > 0
    assert -SLOWER_AT_MOST <= row["relative_error"] <= FASTER_AT_MOST, row
