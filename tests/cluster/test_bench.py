"""The throughput client against a deterministic loopback SSE server: timing, counting, outputs."""

from __future__ import annotations

import itertools
import json
import math
import os
import random
import statistics
from pathlib import Path

import pytest
from rich.console import Console

from cluster.bench import BenchConfig, Endpoint, LoadConfig, Slo, WorkloadConfig, run_benchmark
from cluster.bench.config import parse_duration_s, parse_endpoint, parse_slo
from cluster.bench.metrics import Stats, cost_figures, percentile
from cluster.bench.report import ratios_table, results_table, write_reports
from cluster.bench.runner import arrival_offsets
from cluster.bench.sse import SseParser
from cluster.bench.tokenizer import LocalTokenizer, find_tokenizer
from cluster.bench.workload import load_workload
from cluster.cli.app import main
from cluster.errors import ConfigError
from tests.support.priority import kernel_lets_raise
from tests.support.stream_server import StreamBehaviour, StreamServer


def _config(*servers: StreamServer, names: tuple[str, ...] = ("a", "b", "c"), **kw) -> BenchConfig:
    workload = kw.pop("workload", {})
    load = kw.pop("load", {})
    return BenchConfig(
        endpoints=[
            Endpoint(name=n, base_url=s.base_url, api_key="secret-key-123")
            for n, s in zip(names, servers, strict=False)
        ],
        workload=WorkloadConfig(**{"input_len": 8, "output_len": 16, **workload}),
        load=LoadConfig(**{"num_requests": 4, "warmup_requests": 1, **load}),
        **kw,
    )


@pytest.fixture
def word_tokenizer(tmp_path: Path) -> Path:
    """A word-level tokenizer.json that counts the stream server's ' tN' tokens exactly."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, **{f"t{i}": i + 1 for i in range(300)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["[UNK]"])
    path = tmp_path / "tok" / "tokenizer.json"
    path.parent.mkdir()
    tok.save(str(path))
    return path.parent


# ----- SSE parsing -----------------------------------------------------------------------------


def test_sse_parser_handles_any_split_crlf_comments_and_multiline() -> None:
    stream = (
        b": keep-alive\r\n\r\n"
        b'data: {"a": 1}\r\n\r\n'
        b"event: error\ndata: line one\ndata: line two\n\n"
        b"data:no-space\r\rdata: [DONE]"
    )
    expected = [
        ("message", '{"a": 1}'),
        ("error", "line one\nline two"),
        ("message", "no-space"),
        ("message", "[DONE]"),
    ]
    rng = random.Random(1)
    for _ in range(50):
        parser, got, pos = SseParser(), [], 0
        while pos < len(stream):
            step = rng.randint(1, 7)
            got += parser.feed(stream[pos : pos + step])
            pos += step
        got += parser.close()
        assert [(e.event, e.data) for e in got] == expected


def test_sse_parser_keeps_split_utf8() -> None:
    data = 'data: {"t": "héllo ✓"}\n\n'.encode()
    parser = SseParser()
    events = [e for i in range(len(data)) for e in parser.feed(data[i : i + 1])]
    assert [json.loads(e.data)["t"] for e in events] == ["héllo ✓"]


def test_which_chunks_carry_tokens() -> None:
    from cluster.bench.client import chunk_output

    def chat(delta, finish=None):
        return {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

    def comp(text, finish=None):
        return {"choices": [{"index": 0, "text": text, "finish_reason": finish}]}

    assert chunk_output(chat({"role": "assistant", "content": ""})) == (False, "")
    assert chunk_output(chat({"role": "assistant", "content": "Hi"})) == (True, "Hi")
    assert chunk_output(chat({"content": " there"})) == (True, " there")
    assert chunk_output(chat({"content": ""})) == (True, "")  # a token that is half a character
    assert chunk_output(chat({}, "stop")) == (False, "")  # closing chunk, finish reason only
    assert chunk_output(chat({"content": ""}, "stop")) == (False, "")
    assert chunk_output(chat({"reasoning_content": "hmm"})) == (True, "hmm")
    assert chunk_output(comp("abc")) == (True, "abc")
    assert chunk_output(comp("")) == (True, "")
    assert chunk_output(comp("", "length")) == (False, "")
    assert chunk_output({"choices": [], "usage": {"completion_tokens": 3}}) == (False, "")


# ----- timing against the server's own emission times -------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("api", ["chat", "completions"])
def test_ttft_tpot_itl_match_the_truth(stream_server: StreamServer, api: str) -> None:
    stream_server.behaviour = StreamBehaviour(ttft_ms=60, itl_ms=10, role_chunk=True)
    result = run_benchmark(
        _config(stream_server, workload={"api": api, "output_len": 24}, load={"num_requests": 5})
    )
    (point,) = result.points
    assert point.completed == 5 and point.failed == 0
    emitted = dict(stream_server.emissions)
    ttft_err, itl_err, tpot_err = [], [], []
    for rec in result.records:
        truth = emitted[_prompt_of(result, rec.index)]
        assert len(rec.token_chunk_times) == len(truth) == 24
        # client-side times against when the server handed each chunk over
        ttft_err.append(abs(rec.ttft_s - (truth[0] - rec.started_at)))
        gaps_truth = [b - a for a, b in itertools.pairwise(truth)]
        itl_err.append(abs(statistics.median(rec.itls) - statistics.median(gaps_truth)))
        tpot_err.append(abs(rec.tpot_s - (truth[-1] - truth[0]) / 23))
    # medians: a loaded shared CPU may stall either thread now and then
    assert statistics.median(ttft_err) < 0.004
    assert statistics.median(itl_err) < 0.002
    assert statistics.median(tpot_err) < 0.0005
    assert point.output_tokens == 5 * 24 and point.token_sources == {"usage": 5}
    assert point.tokens_per_chunk == 1.0
    # the figures follow the configured behaviour (TTFT counts from after the role-only chunk);
    # loose: on a busy CPU the server thread itself emits late now and then
    assert 60 <= point.ttft_ms.p50 <= 60 + 40
    assert point.tpot_ms.p50 == pytest.approx(10.0, abs=2.0)
    assert point.itl_ms.p50 == pytest.approx(10.0, abs=3.0)
    assert point.e2e_ms.p50 >= 60 + 23 * 10
    # c=1: output tokens/s is the tokens over the back-to-back request times
    e2e_sum = sum(r.e2e_s for r in result.records)
    assert point.output_throughput == pytest.approx(5 * 24 / e2e_sum, rel=0.05)
    assert point.request_throughput == pytest.approx(5 / e2e_sum, rel=0.05)
    assert point.output_throughput <= 24 / 0.290


def _prompt_of(result, index: int) -> str:
    """The prompt the workload sent for a record's index (rebuilt from the seed)."""
    from cluster.bench.config import BenchConfig

    cfg = BenchConfig.model_validate(
        {**result.config, "endpoints": [{"name": "x", "base_url": "http://x"}]}
    )
    workload = load_workload(cfg.workload, tokenizer=None)
    req = workload.request(index)
    return req.prompt if req.prompt is not None else req.as_messages()[-1]["content"]


@pytest.mark.timeout(60)
def test_several_tokens_per_chunk_counted_as_tokens(stream_server: StreamServer) -> None:
    stream_server.behaviour = StreamBehaviour(ttft_ms=30, itl_ms=10, tokens_per_chunk=3)
    result = run_benchmark(_config(stream_server, workload={"output_len": 24}))
    (p,) = result.points
    assert p.output_tokens == 4 * 24
    assert all(r.token_chunks == 8 for r in result.records)
    assert p.tokens_per_chunk == 3.0
    # TPOT is per token: 7 gaps of 10 ms over 23 tokens; ITL is per chunk
    assert p.tpot_ms.p50 == pytest.approx(70 / 23, abs=0.5)
    assert p.itl_ms.p50 == pytest.approx(10, abs=2.5)
    assert any("3.00 tokens on average" in w for w in result.warnings)


@pytest.mark.timeout(60)
def test_missing_usage_falls_back_to_chunks_and_is_flagged(stream_server: StreamServer) -> None:
    stream_server.behaviour = StreamBehaviour(ttft_ms=5, itl_ms=1, send_usage=False)
    result = run_benchmark(_config(stream_server))
    (p,) = result.points
    assert result.endpoints[0].usage == "absent"
    assert p.token_sources == {"chunks": 4} and p.output_tokens == 4 * 16
    assert math.isnan(p.full_length_fraction)
    assert any("no token usage" in w for w in result.warnings)
    assert any("counted by chunks" in w for w in result.warnings)


@pytest.mark.timeout(60)
def test_missing_usage_recounted_with_local_tokenizer(
    stream_server: StreamServer, word_tokenizer: Path
) -> None:
    stream_server.behaviour = StreamBehaviour(
        ttft_ms=5, itl_ms=1, send_usage=False, tokens_per_chunk=2
    )
    cfg = _config(stream_server, workload={"tokenizer": str(word_tokenizer), "input_len": 20})
    result = run_benchmark(cfg)
    (p,) = result.points
    assert p.token_sources == {"tokenizer": 4}
    assert p.output_tokens == 4 * 16  # exact although chunks carry two tokens
    assert p.tokens_per_chunk == 2.0
    # random prompts were built to exactly 20 tokens of this tokenizer
    assert p.prompt_sources == {"tokenizer": 4} and p.input_tokens == 4 * 20
    assert result.environment["tokenizer"].endswith("tokenizer.json")


# ----- errors ----------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_errors_are_counted_by_kind_and_never_crash(stream_server: StreamServer) -> None:
    stream_server.behaviour = StreamBehaviour(ttft_ms=5, itl_ms=2, fail_every=3, drop_every=5)
    result = run_benchmark(
        _config(stream_server, load={"num_requests": 14, "concurrency": [2], "warmup_requests": 0})
    )
    (p,) = result.points
    assert p.requests == 14 and p.completed + p.failed == 14
    assert p.errors.get("http_500", 0) >= 3 and p.errors.get("disconnect", 0) >= 1
    failed = [r for r in result.records if not r.ok]
    assert all(r.error_detail for r in failed)
    assert p.ttft_ms.n == p.completed  # failures never enter the latency figures
    assert not result.all_failed


def test_closed_loop_waits_as_retry_after_asks(stream_server: StreamServer) -> None:
    from cluster.bench.client import retry_after_seconds

    # Busy for the two requests after the client's probe.
    stream_server.behaviour = StreamBehaviour(ttft_ms=5, itl_ms=1, busy_after=1, busy_first=2)
    result = run_benchmark(
        _config(stream_server, load={"num_requests": 4, "concurrency": [2], "warmup_requests": 0})
    )
    records = sorted(result.records, key=lambda r: r.started_at)
    busy, served = records[:2], records[2:]
    assert [r.status for r in busy] == [503, 503] and all(r.retry_after_s == 1.0 for r in busy)
    assert all(r.ok and r.retry_after_s is None for r in served)
    # Each user waited the second it was asked to before its next request.
    first_free = max(r.started_at + (r.e2e_s or 0.0) for r in busy)
    assert min(r.started_at for r in served) - first_free >= 0.9
    assert [retry_after_seconds(v) for v in ("2", "0.5", "soon", None, "-1", "999")] == [
        2.0, 0.5, None, None, None, 60.0
    ]  # fmt: skip


@pytest.mark.timeout(60)
def test_closed_loop_backs_off_when_nothing_listens() -> None:
    from cluster.bench.runner import CONNECT_BACKOFF_FIRST_S, CONNECT_BACKOFF_MAX_S
    from tests.support.stream_server import start_stream_server

    gone, stop = start_stream_server(StreamBehaviour(ttft_ms=5, itl_ms=1))
    stop()  # its port now refuses connections, like a server between two replicas
    cfg = BenchConfig(
        endpoints=[Endpoint(name="gone", base_url=gone.base_url, model="m")],
        load=LoadConfig(duration_s=2.0, concurrency=[2], warmup_requests=0),
    )
    result = run_benchmark(cfg)
    records = sorted(result.records, key=lambda r: r.started_at)
    assert records and all(r.error_kind == "connect" for r in records)
    # Each user waits 0.1, 0.2, 0.4, 0.8, 1 s ... between refused tries: about five each in
    # two seconds, where re-sending at once makes thousands.
    assert (CONNECT_BACKOFF_FIRST_S, CONNECT_BACKOFF_MAX_S) == (0.1, 1.0)
    assert 2 * 3 <= len(records) <= 2 * 7
    first, last = records[0].started_at, records[-1].started_at
    assert last - first >= 1.0


@pytest.mark.timeout(60)
def test_timeout_and_unreachable_endpoint() -> None:
    from tests.support.stream_server import start_stream_server

    slow, stop = start_stream_server(StreamBehaviour(ttft_ms=400, itl_ms=1))
    try:
        result = run_benchmark(
            _config(slow, load={"timeout_s": 0.15, "num_requests": 2, "warmup_requests": 0})
        )
    finally:
        stop()
    assert result.points[0].errors == {"timeout": 2} and result.all_failed
    # a port nobody listens on (the server just stopped): connect errors, still a result
    cfg = BenchConfig(
        endpoints=[Endpoint(name="gone", base_url=slow.base_url, model="m")],
        load=LoadConfig(num_requests=2, warmup_requests=0),
    )
    result = run_benchmark(cfg)
    assert result.points[0].errors == {"connect": 2} and result.all_failed


# ----- ignore_eos, payload ---------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_ignore_eos_sent_when_accepted_dropped_when_refused(stream_server: StreamServer) -> None:
    result = run_benchmark(_config(stream_server))
    assert result.endpoints[0].ignore_eos == "accepted"
    body = stream_server.received[-1]
    assert body["ignore_eos"] is True and body["stream_options"] == {"include_usage": True}
    assert body["stream"] is True and body["max_tokens"] == 16
    assert result.points[0].full_length_fraction == 1.0

    stream_server.behaviour = StreamBehaviour(ttft_ms=5, itl_ms=1, accept_ignore_eos=False)
    stream_server.received.clear()
    result = run_benchmark(_config(stream_server))
    assert result.endpoints[0].ignore_eos == "rejected"
    assert result.points[0].completed == 4
    assert "ignore_eos" not in stream_server.received[-1]
    assert any("refused ignore_eos" in w for w in result.warnings)


# ----- load shapes -----------------------------------------------------------------------------


def test_arrival_offsets_have_the_asked_rate_and_burstiness() -> None:
    for burst in (1.0, 0.25, 4.0):
        offs = arrival_offsets(
            50.0, burstiness=burst, rng=random.Random(3), count=20000, horizon_s=None
        )
        gaps = [b - a for a, b in zip([0.0, *offs], offs, strict=False)]
        mean = statistics.fmean(gaps)
        cv = statistics.pstdev(gaps) / mean
        assert mean == pytest.approx(1 / 50, rel=0.03)
        assert cv == pytest.approx(1 / math.sqrt(burst), rel=0.06)
    horizon = arrival_offsets(10.0, burstiness=1, rng=random.Random(0), count=None, horizon_s=5)
    assert max(horizon) <= 5 and 30 <= len(horizon) <= 75


@pytest.mark.timeout(60)
def test_open_loop_honours_the_schedule(stream_server: StreamServer) -> None:
    stream_server.behaviour = StreamBehaviour(ttft_ms=30, itl_ms=2)
    cfg = _config(
        stream_server,
        workload={"output_len": 4},
        load={"request_rate": [40.0], "num_requests": 40, "warmup_requests": 0},
    )
    result = run_benchmark(cfg)
    (p,) = result.points
    assert p.mode == "open" and p.point == "rate=40" and p.completed == 40
    lateness = sorted(r.started_at - r.scheduled_at for r in result.records)
    # (a client starved of CPU sends late; bounds allow for a busy shared machine)
    assert lateness[0] > -0.002 and statistics.median(lateness) < 0.05
    # the achieved send rate follows the seeded schedule
    t0 = min(r.started_at for r in result.records)
    sched_span = max(r.scheduled_at for r in result.records) - t0
    sent_span = max(r.started_at for r in result.records) - t0
    assert sent_span == pytest.approx(sched_span, abs=0.1)
    assert 40 / sched_span == pytest.approx(40, rel=0.4)  # a Poisson draw of 40 arrivals
    # requests overlap (open loop does not wait for answers): 30 ms answers at 40/s
    assert p.duration_s < sent_span + 0.2
    assert p.request_throughput == pytest.approx(40 / p.duration_s, rel=0.01)


@pytest.mark.timeout(60)
def test_duration_mode_stops_issuing_at_the_deadline(stream_server: StreamServer) -> None:
    stream_server.behaviour = StreamBehaviour(ttft_ms=10, itl_ms=2)
    cfg = _config(stream_server, load={"num_requests": None, "duration_s": 0.6, "concurrency": [2]})
    result = run_benchmark(cfg)
    (p,) = result.points
    # two requests at a time, back to back, for 0.6 s (about 40 ms each on a quiet machine)
    e2e = [r.e2e_s for r in result.records]
    assert p.completed == pytest.approx(2 * 0.6 / statistics.fmean(e2e), rel=0.35)
    first = min(r.started_at for r in result.records)
    assert max(r.started_at for r in result.records) - first < 0.6 + 0.02
    assert 0.6 <= p.duration_s <= 0.6 + max(e2e) + 0.05


# ----- outputs ---------------------------------------------------------------------------------


class _ColumnObserver:
    """A PointObserver adding one column, as per-node network counters will."""

    def __init__(self) -> None:
        self.phases: list[tuple[str, str, int]] = []

    def phase_started(self, endpoint, point, round_index) -> None:
        self.phases.append((endpoint.name, point.label, round_index))

    def phase_finished(self, endpoint, point, round_index) -> None:
        pass

    def columns(self, endpoint, point, metrics) -> dict[str, float]:
        return {"net kB/tok": metrics.output_tokens / 1000.0}


@pytest.mark.timeout(90)
def test_sweep_writes_table_json_csv_and_plots(stream_server: StreamServer, tmp_path: Path) -> None:
    from matplotlib.image import imread

    stream_server.behaviour = StreamBehaviour(ttft_ms=10, itl_ms=2)
    obs = _ColumnObserver()
    cfg = _config(
        stream_server,
        load={"concurrency": [1, 2, 4], "num_requests": 8},
        slo=Slo(ttft_ms=200, tpot_ms=50),
        cost_per_hour=3.6,
    )
    result = run_benchmark(cfg, observers=[obs])
    assert [p.point for p in result.points] == ["c=1", "c=2", "c=4"]
    assert obs.phases == [("a", "c=1", 0), ("a", "c=2", 0), ("a", "c=4", 0)]
    files = write_reports(result, tmp_path / "out", per_request=True)

    data = json.loads(files["json"].read_text())
    assert data["config"]["load"]["concurrency"] == [1, 2, 4]
    assert data["config"]["endpoints"][0]["api_key"] == "***"
    assert "secret-key-123" not in files["json"].read_text()
    assert "secret-key-123" not in files["requests"].read_text()
    p4 = data["points"][2]
    assert p4["ttft_ms"]["p99"] >= p4["ttft_ms"]["p50"] > 0 and p4["goodput"] > 0
    assert p4["extra"] == {"net kB/tok": 8 * 16 / 1000}
    assert p4["cost"]["tokens_per_dollar"] == pytest.approx(p4["output_throughput"] * 1000)

    rows = files["csv"].read_text().splitlines()
    header = rows[0].split(",")
    assert len(rows) == 4 and {
        "ttft_ms_p50",
        "tpot_ms_p99",
        "net kB/tok",
        "tokens_per_cent",
    } <= set(header)
    assert len(files["requests"].read_text().splitlines()) == 3 * 8

    for key, size in (("throughput_png", (420, 1100)), ("latency_png", (800, 1100))):
        img = imread(files[key])
        assert img.shape[:2] == size and img.std() > 0.01

    console = Console(record=True, width=250)
    console.print(results_table(result))
    text = console.export_text()
    for word in (
        "out tok/s",
        "TTFT p50 ms",
        "TPOT p99 ms",
        "goodput",
        "tok/¢",
        "net kB/tok",
        "c=4",
    ):
        assert word in text
    assert ratios_table(result) is None
    assert "c=2" in result.summary()


@pytest.mark.timeout(90)
def test_compare_mode_identical_interleaved_workload_and_ratio(
    stream_server_pair: tuple[StreamServer, StreamServer],
) -> None:
    fast, slow = stream_server_pair
    cfg = _config(
        fast,
        slow,
        names=("fast", "slow"),
        workload={"output_len": 12},
        load={"concurrency": [2], "num_requests": 8, "rounds": 2, "warmup_requests": 0},
    )
    result = run_benchmark(cfg)
    (row,) = result.ratios
    assert row["baseline"] == "fast" and row["endpoint"] == "slow"
    r = row["ratios"]

    # the truth: what the two servers actually did (their chunk emission times)
    def server_tpot(server: StreamServer) -> float:
        return statistics.median((t[-1] - t[0]) / 11 for _, t in server.emissions[1:])

    assert r["tpot_p50"] == pytest.approx(server_tpot(slow) / server_tpot(fast), rel=0.08)
    assert r["output_tok/s"] == pytest.approx(1 / r["e2e_p50"], rel=0.15)  # closed loop
    # and roughly the configured speeds: TPOT 20 vs 10 ms, a request 300 vs 150 ms, TTFT 80 vs 40
    # (fixed per-request costs of a busy machine pull every ratio towards 1)
    assert r["tpot_p50"] == pytest.approx(2.0, rel=0.3)
    assert r["output_tok/s"] == pytest.approx(150 / 300, rel=0.3)
    assert r["ttft_p50"] == pytest.approx(2.0, rel=0.35)
    # identical prompts, in rounds: fast round 1, slow round 1, fast round 2, slow round 2
    measured = [[k for k, _ in s.emissions[1:]] for s in (fast, slow)]  # [0] is the probe
    assert measured[0] == measured[1] and len(measured[0]) == 8
    f_arr, s_arr = fast.arrivals[1:], slow.arrivals[1:]
    assert max(f_arr[:4]) < min(s_arr[:4]) and max(s_arr[:4]) < min(f_arr[4:])
    assert min(f_arr[4:]) and max(f_arr[4:]) < min(s_arr[4:])
    console = Console(record=True, width=200)
    console.print(ratios_table(result))
    assert "ratios vs fast" in console.export_text()


# ----- workloads -------------------------------------------------------------------------------


def test_workloads_are_seeded_and_warmup_never_repeats_measured() -> None:
    a = load_workload(WorkloadConfig(seed=7, input_len=30), tokenizer=None)
    b = load_workload(WorkloadConfig(seed=7, input_len=30), tokenizer=None)
    c = load_workload(WorkloadConfig(seed=8, input_len=30), tokenizer=None)
    assert a.requests(0, 5) == b.requests(0, 5) != c.requests(0, 5)
    assert len({r.prompt for r in a.requests(0, 50)}) == 50
    assert not {r.prompt for r in a.warmup(10)} & {r.prompt for r in a.requests(0, 50)}
    assert all(len(r.prompt.split()) == 30 and not r.input_exact for r in a.requests(0, 5))
    assert a.notes and "approximate" in a.notes[0]


def test_bundled_jsonl_and_sharegpt_datasets(tmp_path: Path, word_tokenizer: Path) -> None:
    bundled = load_workload(WorkloadConfig(dataset="prompts"), tokenizer=None)
    assert len(bundled.pool) >= 8 and any(r.messages for r in bundled.pool)
    assert len({r.max_tokens for r in bundled.pool}) > 1

    jl = tmp_path / "w.jsonl"
    jl.write_text(
        json.dumps({"prompt": "t1 t2 t3", "max_tokens": 5})
        + "\n\n"
        + json.dumps({"messages": [{"role": "user", "content": "t4 t5"}]})
        + "\n"
    )
    tok = find_tokenizer(None, explicit=str(word_tokenizer))
    wl = load_workload(
        WorkloadConfig(dataset="jsonl", dataset_path=jl, output_len=9), tokenizer=tok
    )
    by_len = sorted((r.input_tokens, r.max_tokens) for r in wl.pool)
    assert by_len == [(2, 9), (3, 5)]
    forced = load_workload(
        WorkloadConfig(dataset="jsonl", dataset_path=jl, output_len=9, output_len_override=True),
        tokenizer=None,
    )
    assert {r.max_tokens for r in forced.pool} == {9}

    sg = tmp_path / "sg.json"
    sg.write_text(
        json.dumps(
            [
                {
                    "conversations": [
                        {"from": "human", "value": "t1 t2"},
                        {"from": "gpt", "value": "t3 t4 t5"},
                    ]
                },
                {"conversations": [{"from": "gpt", "value": "skipped"}]},
            ]
        )
    )
    wl = load_workload(WorkloadConfig(dataset="sharegpt", dataset_path=sg), tokenizer=tok)
    assert [(r.prompt, r.max_tokens) for r in wl.pool] == [("t1 t2", 3)]

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"nope": 1}\n')
    with pytest.raises(ConfigError, match="line 2"):
        load_workload(WorkloadConfig(dataset="jsonl", dataset_path=bad), tokenizer=None)
    with pytest.raises(ValueError, match="needs a file"):
        WorkloadConfig(dataset="jsonl")


def test_tokenizer_lookup(word_tokenizer: Path, tmp_path: Path) -> None:
    assert isinstance(find_tokenizer(str(word_tokenizer)), LocalTokenizer)
    assert find_tokenizer("no/such-model") is None
    with pytest.raises(ConfigError, match=r"no tokenizer\.json"):
        find_tokenizer(None, explicit=str(tmp_path / "missing"))


# ----- pure figures and parsing ----------------------------------------------------------------


def test_percentiles_costs_and_parsing() -> None:
    import numpy as np

    values = [random.Random(i).random() for i in range(101)]
    for q in (50, 90, 99):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))
    s = Stats.of_seconds([0.010, 0.020, 0.030])
    assert (s.mean, s.p50, s.min, s.max, s.n) == pytest.approx((20.0, 20.0, 10.0, 30.0, 3))
    c = cost_figures(100.0, 3.6)  # 360 000 tokens per hour for $3.60
    assert c.tokens_per_dollar == pytest.approx(100_000)
    assert c.tokens_per_cent == pytest.approx(1_000)
    assert c.dollars_per_million_tokens == pytest.approx(10.0)

    assert parse_slo("ttft=200ms,tpot=50") == Slo(ttft_ms=200, tpot_ms=50)
    assert parse_slo("e2e=2s").e2e_ms == pytest.approx(2000)
    assert parse_duration_s("2m") == 120
    ep = parse_endpoint("ours=http://10.0.0.1:8000,key=k1,model=m")
    assert (ep.name, ep.base_url, ep.api_key.get_secret_value(), ep.model) == (
        "ours",
        "http://10.0.0.1:8000/v1",
        "k1",
        "m",
    )
    assert parse_endpoint("http://h:1/v1").name == "h:1"
    for bad in ("x=ftp://h", "x=http://h,colour=red"):
        with pytest.raises(ConfigError):
            parse_endpoint(bad)
    with pytest.raises(ConfigError):
        parse_slo("latency=3")
    with pytest.raises(ValueError, match="not both"):
        LoadConfig(num_requests=3, duration_s=2)
    with pytest.raises(ValueError, match="use --num-requests"):
        LoadConfig(request_rate=[math.inf], duration_s=2)
    assert [p.label for p in LoadConfig(request_rate=[2, math.inf], concurrency=[4]).points()] == [
        "rate=2,c≤4",
        "rate=inf,c≤4",
    ]


# ----- the command line ------------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_cli_runs_writes_results_and_fails_when_everything_fails(
    stream_server: StreamServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("COLUMNS", "250")
    stream_server.behaviour = StreamBehaviour(ttft_ms=5, itl_ms=1)
    key_file = tmp_path / "key"
    key_file.write_text("file-key-456\n")
    key_file.chmod(0o600)
    out = tmp_path / "res"
    rc = main(
        [
            "bench", "--base-url", stream_server.base_url, "--api-key-file", str(key_file),
            "-c", "1,2", "-n", "3", "--output-len", "8", "--api", "completions",
            "--slo", "ttft=200ms,tpot=50ms", "--cost-per-hour", "2", "-o", str(out), "--no-progress",
        ]
    )  # fmt: skip
    assert rc == 0
    text = capsys.readouterr().out
    assert "out tok/s" in text and "c=2" in text
    assert {p.name for p in out.iterdir()} >= {"bench.json", "bench.csv", "bench-throughput.png"}
    assert "file-key-456" not in (out / "bench.json").read_text()
    assert all(r.get("prompt") for r in stream_server.received[1:])

    rc = main(["bench", "-n", "1", "--no-progress"])
    assert rc == 3 and "--base-url" in capsys.readouterr().err

    stream_server.behaviour = StreamBehaviour(fail_every=1)
    rc = main(
        [
            "bench",
            "--base-url",
            stream_server.base_url,
            "-n",
            "2",
            "-o",
            str(out),
            "--no-progress",
            "--no-plots",
        ]
    )
    assert rc != 0 and "every request failed (http_500" in capsys.readouterr().err

    rc = main(["bench", "--base-url", stream_server.base_url, "--slo", "speed=3", "--no-progress"])
    assert rc == 3


@pytest.mark.timeout(90)
def test_cli_raises_its_cpu_priority_while_measuring_and_restores_it(
    stream_server: StreamServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from cluster.bench import priority

    stream_server.behaviour = StreamBehaviour(ttft_ms=5, itl_ms=1)
    before = (priority.autogroup_nice(), os.getpriority(os.PRIO_PROCESS, 0))
    argv = ["bench", "--base-url", stream_server.base_url, "-n", "2", "--output-len", "4",
            "--no-progress", "--no-plots"]  # fmt: skip
    assert main([*argv, "-o", str(tmp_path / "on")]) == 0
    err = capsys.readouterr().err
    assert (priority.autogroup_nice(), os.getpriority(os.PRIO_PROCESS, 0)) == before
    notes = json.loads((tmp_path / "on" / "bench.json").read_text())["notes"]
    if kernel_lets_raise(priority.DEFAULT_NICE, priority.lever()):
        assert "client CPU priority raised while measuring" in err
        assert any(n.startswith("client CPU priority raised") for n in notes)
    else:  # e.g. root in a container that drops CAP_SYS_NICE: told, nothing changed
        assert f"client CPU priority {priority.NOT_RAISED}" in " ".join(err.split())
        assert any(n.startswith(f"client CPU priority {priority.NOT_RAISED}") for n in notes)

    assert main([*argv, "--no-raise-priority", "-o", str(tmp_path / "off")]) == 0
    assert "client CPU priority" not in capsys.readouterr().err
