"""`llamacluster top` and the bench's cluster series: the arithmetic and the rows, without a cluster."""

from __future__ import annotations

import csv
import io
import math
import re

import pytest

from cluster import dashboards, series, top
from cluster.errors import LlamaclusterError
from tests.support.metrics_server import metrics_server

# The shape the real server's /metrics has (vLLM 0.32 names and labels, the gateway's counter).
METRICS_T0 = """\
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="m"} 1.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25
# TYPE vllm:generation_tokens counter
vllm:generation_tokens_total{engine="0",model_name="m"} 1000.0
# TYPE vllm:prompt_tokens counter
vllm:prompt_tokens_total{engine="0",model_name="m"} 5000.0
# TYPE vllm:request_success counter
vllm:request_success_total{engine="0",finished_reason="length",model_name="m"} 10.0
vllm:request_success_total{engine="0",finished_reason="stop",model_name="m"} 2.0
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.01",model_name="m"} 0.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.1",model_name="m"} 10.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="1.0",model_name="m"} 12.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="+Inf",model_name="m"} 12.0
vllm:time_to_first_token_seconds_count{engine="0",model_name="m"} 12.0
vllm:time_to_first_token_seconds_sum{engine="0",model_name="m"} 1.0
"""


def _later(text: str) -> str:
    """The same server 10 s later: 500 more output tokens, 20 more first tokens all in 10..100 ms."""
    return (
        text.replace("1000.0", "1500.0")
        .replace("5000.0", "7000.0")
        .replace('"length",model_name="m"} 10.0', '"length",model_name="m"} 30.0')
        .replace('le="0.1",model_name="m"} 10.0', 'le="0.1",model_name="m"} 30.0')
        .replace('le="1.0",model_name="m"} 12.0', 'le="1.0",model_name="m"} 32.0')
        .replace('le="+Inf",model_name="m"} 12.0', 'le="+Inf",model_name="m"} 32.0')
    )


def test_histogram_quantile_interpolates_like_prometheus():
    b = [(0.1, 50.0), (0.2, 100.0), (math.inf, 100.0)]
    assert top.histogram_quantile(0.5, b) == pytest.approx(0.1)
    assert top.histogram_quantile(0.75, b) == pytest.approx(0.15)
    assert top.histogram_quantile(0.25, b) == pytest.approx(0.05)
    # Beyond the last finite bound: that bound, as Prometheus answers.
    assert top.histogram_quantile(0.99, [(0.1, 1.0), (math.inf, 10.0)]) == pytest.approx(0.1)
    assert top.histogram_quantile(0.5, []) is None
    assert top.histogram_quantile(0.5, [(0.1, 0.0), (math.inf, 0.0)]) is None


def test_rate_handles_resets_and_missing_samples():
    assert top.rate(100.0, 160.0, 30.0) == pytest.approx(2.0)
    assert top.rate(100.0, 30.0, 10.0) == pytest.approx(3.0)  # counter reset: counts from 0
    assert top.rate(None, 5.0, 1.0) is None
    assert top.rate(1.0, 5.0, 0.0) is None


def test_engine_row_from_two_real_shaped_samples():
    old, new = top.parse_metrics(METRICS_T0), top.parse_metrics(_later(METRICS_T0))
    row = top.engine_row(old, new, 10.0)
    assert (row.running, row.waiting, row.kv_cache_percent) == (3.0, 1.0, 25.0)
    assert row.output_tokens_s == pytest.approx(50.0)
    assert row.input_tokens_s == pytest.approx(200.0)
    assert row.requests_s == pytest.approx(2.0)  # both finish reasons summed
    # Only the 20 new first tokens count (all in 10..100 ms): p50 is their median.
    assert row.ttft_p50_s == pytest.approx(0.055)
    assert 0.01 < row.ttft_p99_s <= 0.1
    assert row.itl_p50_s is None  # no inter-token histogram in this text
    # One sample only: gauges, no rates; quantiles over everything counted so far.
    first = top.engine_row(None, old, 0.0)
    assert first.output_tokens_s is None and first.running == 3.0
    assert first.ttft_p50_s == pytest.approx(0.01 + 0.09 * 6 / 10)  # rank 6 of 12


def test_rows_from_prometheus_results():
    engine = top.engine_from_prometheus(
        {"output_tokens_s": [{"metric": {}, "value": [1, "123.5"]}], "ttft_p99_s": []}
    )
    assert engine.output_tokens_s == 123.5 and engine.ttft_p99_s is None
    nodes = top.nodes_from_prometheus(
        {
            "cpu_percent": [
                {"metric": {"ip": "10.0.0.2"}, "value": [1, "40"]},
                {"metric": {"ip": "10.0.0.1"}, "value": [1, "90"]},
            ],
            "gpus": [{"metric": {"ip": "10.0.0.1"}, "value": [1, "8"]}],
            "gpu_percent": [{"metric": {"ip": "10.0.0.1"}, "value": [1, "NaN"]}],
        }
    )
    assert [n.ip for n in nodes] == ["10.0.0.1", "10.0.0.2"]
    assert (nodes[0].cpu_percent, nodes[0].gpus, nodes[0].gpu_percent) == (90.0, 8, None)
    assert dict(top.node_cells(nodes[1]))["GPU"] == "none"
    cells = dict(top.engine_cells(top.EngineRow(output_tokens_s=12.34, ttft_p50_s=0.0071)))
    assert (
        cells["out tok/s"] == "12.3" and cells["TTFT p50"] == "7.1 ms" and cells["running"] == "-"
    )


def test_metrics_url_and_a_refused_key():
    assert top.metrics_url("http://h:8000/v1") == "http://h:8000/metrics"
    assert top.metrics_url("http://h:8000/") == "http://h:8000/metrics"
    with metrics_server(METRICS_T0, token="right") as srv:
        good = top.MetricsSource(f"http://{srv.target}/metrics", api_key="right")
        frame = good.frame()
        assert frame.engine.running == 3.0 and frame.nodes == []
        bad = top.MetricsSource(f"http://{srv.target}/metrics", api_key="wrong")
        with pytest.raises(LlamaclusterError, match="refused the API key"):
            bad.frame()


def test_a_server_that_answers_late_is_one_line_once_and_the_last_frame_live(capsys):
    from cluster.cli.app import main

    with metrics_server(METRICS_T0, token="k") as srv:
        srv.delay_s = 2.0
        argv = ["top", "--once", "--base-url", f"http://{srv.target}/v1", "--api-key", "k",
                "--interval", "0.5", "--timeout", "0.5"]  # fmt: skip
        assert main(argv) == 5
        err = " ".join(capsys.readouterr().err.split())
        assert f"error: http://{srv.target}/metrics did not answer within 0.5 s" in err
        assert "raise --timeout" in err and "Traceback" not in err

        # Live: the frame before stays on screen, saying what failed; the next read replaces it.
        srv.delay_s = 0.0
        live = top.MetricsSource(f"http://{srv.target}/metrics", api_key="k", timeout_s=0.5)
        first = live.frame()
        srv.delay_s = 2.0
        kept = top.refreshed(live, first, clock=lambda: 0.0)
        assert kept.engine == first.engine and kept.source == first.source
        assert "did not answer within 0.5 s" in kept.note
        assert re.match(r"\d\d:\d\d:\d\d ", kept.note)  # when it failed, local time
        assert kept.note.endswith("; showing the last frame read")
        srv.delay_s = 0.0
        assert "did not answer" not in top.refreshed(live, kept).note
        live.close()
    # An error answer is one line too (here a path with no metrics: the server's 404).
    with metrics_server(METRICS_T0) as srv:
        wrong = top.MetricsSource(f"http://{srv.target}/nothing-here", timeout_s=5)
        with pytest.raises(LlamaclusterError, match="nothing-here answered 404: not found"):
            wrong.frame()
        wrong.close()
    # Nothing listens any more: one line naming the address.
    gone = top.MetricsSource(f"http://{srv.target}/metrics", timeout_s=0.5)
    with pytest.raises(LlamaclusterError, match=f"cannot read http://{srv.target}/metrics"):
        gone.frame()


def test_a_monitor_that_cannot_be_read_after_the_load_is_one_line(tmp_path):
    """bench warns with this line and keeps what it measured (cluster/cli/bench_cmd.py)."""
    with metrics_server(METRICS_T0) as srv:
        gone = f"http://{srv.target}"  # closed when the block ends: nothing listens there

    def open_prometheus():
        source = top.PrometheusSource(gone, timeout_s=2, label=f"prometheus {gone}")
        return source.query_range, source.close

    observer = series.MonitorSeries(open_prometheus, clock=lambda: 0.0)
    observer.phases.append(series.Phase("main", "c=1", 1.0, -10.0, -5.0))
    with pytest.raises(LlamaclusterError, match=f"cannot read prometheus {gone}"):
        observer.write(tmp_path)
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_cluster_series_csv_and_per_phase_figures():
    phases = [
        series.Phase("main", "c=1", 1.0, 100.0, 110.0),
        series.Phase("main", "c=8", 8.0, 120.0, 130.0),
    ]
    result = [
        {"metric": {}, "values": [[105, "10"], [108, "20"], [115, "99"], [125, "80"], [126, "NaN"]]}
    ]
    points = series.points_from_matrix("kv_cache_percent", result)
    assert len(points) == 4  # NaN dropped
    means = series.per_phase(points, phases, "kv_cache_percent")
    assert [(ph.offered, v) for ph, v in means] == [(1.0, 15.0), (8.0, 80.0)]
    rows = list(csv.DictReader(io.StringIO(series.series_csv(points, phases))))
    assert [r["phase"] for r in rows] == ["c=1", "c=1", "", "c=8"]
    assert rows[3]["offered_load"] == "8" and rows[0]["series"] == "kv_cache_percent"
    png = series.load_plot(points, phases)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_dashboards_ship_every_chart_and_only_known_metric_families():
    files = dashboards.files()
    assert set(files) == {
        "consoles/index.html",
        "consoles/nodes.html",
        "console_libraries/llamacluster.lib",
    }
    for chart in dashboards.SERVING_CHARTS:
        assert f'lcGraph("{chart}"' in files["consoles/index.html"]
    for chart in dashboards.NODE_CHARTS:
        assert f'lcGraph("{chart}"' in files["consoles/nodes.html"]
    # No asset from the internet: every script and stylesheet is Prometheus's own.
    lib = files["console_libraries/llamacluster.lib"]
    assert "http://" not in lib and "https://" not in lib
