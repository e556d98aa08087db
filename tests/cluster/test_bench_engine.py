"""The throughput client against the real server on the tiny model: a short sweep, every output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cluster.bench import BenchConfig, Endpoint, LoadConfig, WorkloadConfig, run_benchmark
from cluster.bench.report import write_reports

pytestmark = pytest.mark.engine


@pytest.mark.timeout(900)
def test_short_sweep_against_the_real_server(api_server, tmp_path: Path) -> None:
    from matplotlib.image import imread

    cfg = BenchConfig(
        endpoints=[Endpoint(name="tiny", base_url=api_server.base_url, api_key=api_server.api_key)],
        # the bound of the shared server is small: stay below it (warm-up included)
        workload=WorkloadConfig(api="chat", input_len=32, output_len=16),
        load=LoadConfig(concurrency=[1, 2], num_requests=6, warmup_requests=1),
    )
    result = run_benchmark(cfg)
    info = result.endpoints[0]
    assert info.model == api_server.model and info.usage == "server"
    assert info.ignore_eos == "accepted"
    for p in result.points:
        assert p.completed == 6, p.errors
        assert p.token_sources == {"usage": 6} and p.output_tokens == 6 * 16
        assert p.full_length_fraction == 1.0
        assert 0 < p.ttft_ms.p50 < p.e2e_ms.p50 and p.tpot_ms.p50 > 0
        assert 1.0 <= p.tokens_per_chunk < 1.5
    files = write_reports(result, tmp_path)
    data = json.loads(files["json"].read_text())
    assert [p["point"] for p in data["points"]] == ["c=1", "c=2"]
    assert api_server.api_key not in files["json"].read_text()
    assert len(files["csv"].read_text().splitlines()) == 3
    for key in ("throughput_png", "latency_png"):
        img = imread(files[key])
        assert img.shape[0] > 300 and img.shape[1] > 800
