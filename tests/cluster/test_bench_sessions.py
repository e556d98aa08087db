"""`bench --workload chat-sessions`: the conversation generator, the turn-by-turn runner and the
prefix-cache hit-rate arithmetic."""

from __future__ import annotations

import contextlib
import ssl
from pathlib import Path

import pytest
from pydantic import ValidationError

from cluster.bench import BenchConfig, Endpoint, LoadConfig, WorkloadConfig, run_benchmark
from cluster.bench.cli_glue import build_config
from cluster.bench.prefix_cache import (
    PrefixCacheObserver,
    PrefixCounters,
    counters_delta,
    parse_prefix_counters,
    read_counters,
    replica_metric_urls,
)
from cluster.bench.workload import conversation_messages, load_workload, session_turns
from cluster.errors import ConfigError
from tests.support.stream_server import StreamBehaviour, StreamServer

# What a vLLM server's /metrics holds for the prefix cache (two engines of one server here).
METRICS = """\
# HELP vllm:prefix_cache_queries_total Prefix cache queries, in terms of number of queried tokens.
# TYPE vllm:prefix_cache_queries_total counter
vllm:prefix_cache_queries_total{engine="0",model_name="m"} 1200.0
vllm:prefix_cache_queries_total{engine="1",model_name="m"} 800.0
# HELP vllm:prefix_cache_queries_created Prefix cache queries, in terms of number of queried tokens.
# TYPE vllm:prefix_cache_queries_created gauge
vllm:prefix_cache_queries_created{engine="0",model_name="m"} 1.7e+09
# HELP vllm:prefix_cache_hits_total Prefix cache hits, in terms of number of cached tokens.
# TYPE vllm:prefix_cache_hits_total counter
vllm:prefix_cache_hits_total{engine="0",model_name="m"} 600.0
vllm:prefix_cache_hits_total{engine="1",model_name="m"} 2.0e+02
vllm:num_requests_running{engine="0",model_name="m"} 0.0
"""


def _workload(**kw) -> WorkloadConfig:
    return WorkloadConfig(workload="chat-sessions", **{"input_len": 6, "output_len": 4, **kw})


def test_conversations_share_the_system_prompt_and_grow_turn_by_turn():
    workload = load_workload(_workload(system_prompt_len=50, seed=3), tokenizer=None)
    assert len(workload.system_prompt().split()) == 50
    again = load_workload(_workload(system_prompt_len=50, seed=3), tokenizer=None)
    assert again.system_prompt() == workload.system_prompt()  # seeded
    other_seed = load_workload(_workload(system_prompt_len=50, seed=4), tokenizer=None)
    assert other_seed.system_prompt() != workload.system_prompt()
    assert workload.user_turn(0, 0) != workload.user_turn(1, 0) != workload.user_turn(0, 1)

    first = workload.session_request(7, 0, [])
    second = workload.session_request(7, 1, [(workload.user_turn(7, 0), "an answer")])
    assert first.messages is not None and second.messages is not None
    assert [m["role"] for m in first.messages] == ["system", "user"]
    assert [m["role"] for m in second.messages] == ["system", "user", "assistant", "user"]
    assert second.messages[:2] == first.messages  # the prefix a cache can reuse
    assert second.messages[2]["content"] == "an answer"
    assert first.max_tokens == 4
    assert conversation_messages("", [], "q") == [{"role": "user", "content": "q"}]


def test_turns_are_split_into_conversations():
    assert session_turns(12, 4) == [4, 4, 4]
    assert session_turns(10, 4) == [4, 4, 2]
    assert session_turns(3, 4) == [3]


def test_sessions_are_closed_loop_on_generated_prompts():
    endpoint = Endpoint(name="a", base_url="http://127.0.0.1:1/v1")
    with pytest.raises(ValidationError, match="closed loop"):
        BenchConfig(endpoints=[endpoint], workload=_workload(), load={"request_rate": [1.0]})
    with pytest.raises(ValidationError, match="drop --dataset"):
        _workload(dataset="prompts")
    with pytest.raises(ConfigError, match="--workload"):
        _cli_config(workload="sessions")


def _cli_config(**kw) -> BenchConfig:
    values = dict(
        base_url="http://127.0.0.1:1/v1", model="m", api_key="k", api_key_file=None,
        endpoints=[], api="chat", dataset="random", dataset_path=None, input_len=8,
        output_len=8, force_output_len=False, tokenizer=None, ignore_eos=True,
        temperature=None, concurrency="2", request_rate=None, burstiness=1.0, num_requests=8,
        duration=None, warmup=0, rounds=None, timeout="30s", slo=None, cost_per_hour=None,
        seed=0,
    )  # fmt: skip
    return build_config(**{**values, **kw})


def test_each_turn_carries_the_conversation_so_far(stream_server: StreamServer):
    stream_server.behaviour = StreamBehaviour(ttft_ms=5, itl_ms=1)
    config = BenchConfig(
        endpoints=[Endpoint(name="a", base_url=stream_server.base_url, api_key="secret-key-1")],
        workload=_workload(turns=3, system_prompt_len=20),
        load=LoadConfig(concurrency=[2], num_requests=7, warmup_requests=0),
    )
    result = run_benchmark(config)
    assert result.points[0].completed == 7
    bodies = [b for b in stream_server.received if len(b.get("messages", [])) > 1]
    assert len(bodies) == 7
    system = bodies[0]["messages"][0]
    assert all(b["messages"][0] == system for b in bodies)
    # 7 requests of 3 turns: conversations of 3, 3 and 1 turns.
    by_length = sorted(len(b["messages"]) for b in bodies)
    assert by_length == [2, 2, 2, 4, 4, 6, 6]
    # A later turn repeats the earlier one and the server's answer to it.
    for later in (b for b in bodies if len(b["messages"]) == 6):
        earlier = next(
            b for b in bodies if b["messages"] == later["messages"][:4] and len(b["messages"]) == 4
        )
        answer = later["messages"][4]
        assert answer["role"] == "assistant" and answer["content"].strip().startswith("t")
        assert earlier["messages"][:2] == later["messages"][:2]


def test_open_sessions_interleave_the_turns_of_many_conversations(stream_server: StreamServer):
    stream_server.behaviour = StreamBehaviour(ttft_ms=5, itl_ms=1)
    config = BenchConfig(
        endpoints=[Endpoint(name="a", base_url=stream_server.base_url, api_key="secret-key-1")],
        workload=_workload(turns=3, system_prompt_len=20, open_sessions=4),
        load=LoadConfig(concurrency=[2], num_requests=12, warmup_requests=0),
    )
    result = run_benchmark(config)
    assert (result.points[0].completed, result.points[0].failed) == (12, 0)
    bodies = [b for b in stream_server.received if len(b.get("messages", [])) > 1]
    assert len(bodies) == 12
    # The four conversations' first turns go before any second turn, and so on: each answered
    # conversation waits behind the others for its next turn.
    turns = [len(b["messages"]) // 2 for b in bodies]
    assert turns == [1] * 4 + [2] * 4 + [3] * 4
    firsts = {b["messages"][1]["content"] for b in bodies[:4]}
    assert len(firsts) == 4
    # Every conversation still carries its own earlier turns.
    for later in (b for b in bodies if len(b["messages"]) == 6):
        assert later["messages"][1]["content"] in firsts
        assert any(b["messages"] == later["messages"][:4] for b in bodies)


def test_open_sessions_are_checked_against_the_concurrency_and_the_workload():
    endpoint = Endpoint(name="a", base_url="http://127.0.0.1:1/v1")
    with pytest.raises(ValidationError, match="below --concurrency 4"):
        BenchConfig(
            endpoints=[endpoint],
            workload=_workload(open_sessions=2),
            load={"concurrency": [1, 4]},
        )
    with pytest.raises(ValidationError, match="for --workload chat-sessions"):
        BenchConfig(
            endpoints=[endpoint],
            workload=WorkloadConfig(open_sessions=8),
            load={"concurrency": [1]},
        )
    with pytest.raises(ConfigError, match="--open-sessions 1 is below --concurrency 2"):
        _cli_config(workload="chat-sessions", open_sessions=1)
    assert _cli_config(workload="chat-sessions", open_sessions=8).workload.open_sessions == 8


def test_counters_are_summed_over_engines_and_deltas_over_replicas():
    counters = parse_prefix_counters(METRICS)
    assert counters == PrefixCounters(hits=800.0, queries=2000.0)
    assert counters.hit_rate == pytest.approx(0.4)
    assert parse_prefix_counters("vllm:num_requests_running 0.0\n") is None
    assert PrefixCounters().hit_rate is None

    before = {"r1": PrefixCounters(100, 400), "r2": PrefixCounters(50, 100)}
    after = {
        "r1": PrefixCounters(400, 900),  # +300 / +500
        "r2": PrefixCounters(10, 60),  # restarted: all of it is new
        "r3": PrefixCounters(999, 999),  # not read before: left out
    }
    assert counters_delta(before, after) == PrefixCounters(hits=310, queries=560)


def test_observer_reports_the_hit_rate_of_a_point(metrics_text_server):
    url, set_text = metrics_text_server
    observer = PrefixCacheObserver(sources={"a": [url]}, api_keys={"a": None})
    endpoint = Endpoint(name="a", base_url="http://127.0.0.1:1/v1")
    point = LoadConfig(concurrency=[1]).points()[0]
    set_text(METRICS)
    observer.phase_started(endpoint, point, 0)
    set_text(METRICS.replace("600.0", "1100.0").replace("1200.0", "2200.0"))
    observer.phase_finished(endpoint, point, 0)
    columns = observer.columns(endpoint, point, None)  # type: ignore[arg-type]
    assert columns == {
        "prefix_cache_queries": 1000.0,
        "prefix_cache_replicas": 1.0,
        "prefix_cache_hit_rate": pytest.approx(0.5),
    }


def test_replica_urls_are_only_the_routing_table_s_ports_on_each_node_s_addresses():
    rows = [
        {"replica_id": "a", "node_ip": "10.0.0.1", "port": 8010},
        {"replica_id": "b", "node_ip": "10.0.0.2", "port": 8012},
        {"replica_id": "c", "node_ip": "10.0.0.2", "port": None},  # starting: not routed yet
        {"replica_id": "d", "node_ip": "fd00::3", "port": 8011},
    ]
    addresses = {"10.0.0.1": ["head.example"], "10.0.0.2": ["10.0.0.2"]}
    assert replica_metric_urls(rows, addresses) == {
        "a": ["http://10.0.0.1:8010/metrics", "http://head.example:8010/metrics"],
        "b": ["http://10.0.0.2:8012/metrics"],
        "d": ["http://[fd00::3]:8011/metrics"],
    }
    assert replica_metric_urls([], addresses) == {}


@contextlib.contextmanager
def _metrics_server(tls: tuple[Path, Path] | None = None):
    """A loopback server answering /metrics with text the caller sets; HTTPS with ``tls``
    (certificate, key)."""
    import http.server
    import threading

    text = {"body": ""}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = text["body"].encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    scheme = "http"
    if tls is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(*tls)
        server.socket = context.wrap_socket(server.socket, server_side=True)
        scheme = "https"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield (
            f"{scheme}://127.0.0.1:{server.server_address[1]}/metrics",
            lambda t: text.update(body=t),
        )
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def metrics_text_server():
    """A loopback HTTP server answering /metrics with text the test sets."""
    with _metrics_server() as served:
        yield served


def test_replicas_speaking_https_are_read_with_the_clusters_certificate(tmp_path):
    from cluster.bench.config import tls_context
    from cluster.tls import self_signed

    cert, key = tmp_path / "api.crt", tmp_path / "api.key"
    self_signed(["10.9.9.9"], cert_path=cert, key_path=key)  # not the replica's address
    rows = [{"replica_id": "a", "node_ip": "127.0.0.1", "port": 8010}]
    assert replica_metric_urls(rows, {}, scheme="https") == {
        "a": ["https://127.0.0.1:8010/metrics"]
    }
    with _metrics_server((cert, key)) as (url, set_text):
        set_text(METRICS)
        # The system's authorities do not know the self-signed certificate: nothing is read.
        assert read_counters([url], api_key=None) == {}
        check = tls_context([Endpoint(name="main", base_url=url, ca_cert=cert)])
        assert isinstance(check, ssl.SSLContext)
        check.check_hostname = False  # the chain is checked, the replica's address is not named
        assert read_counters([url], api_key=None, verify=check) == {
            url: parse_prefix_counters(METRICS)
        }
