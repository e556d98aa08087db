"""This server vs plain vLLM's OpenAI server, like for like: TTFT p50/p99, ITL p99, tokens/s.

Both run the same engine arguments with the Ray executor on one loopback Ray node, on the demo
model. Each server runs alone on the machine: started, measured at every concurrency, stopped;
the order alternates per round (A B, B A, ...) and the table shows each figure's median over the
rounds. The load client shares the machine, so its CPU priority is raised while it measures
(cluster/bench/priority.py; needs CAP_SYS_NICE): a client waiting for a core would be
measured instead of the server. Prints a table, writes JSON. Targets: TTFT p50 at c=1 within
+3 ms of plain vLLM, output tokens/s at least 0.97x and ITL p99 at most 1.1x at every
concurrency.

    .venv/bin/python benchmarks/bench_server.py --out bench-results/server.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

TTFT_TARGET_MS = 3.0
TOKS_TARGET_RATIO = 0.97
ITL_P99_TARGET_RATIO = 1.1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "bench-results" / "server.json")
    ap.add_argument(
        "--concurrency", type=int, nargs="+", default=[1, 4, 16, 64], help="points to measure"
    )
    ap.add_argument(
        "--requests-per-slot", type=int, default=6, help="measured requests per concurrent slot"
    )
    ap.add_argument("--min-requests", type=int, default=40, help="at least this many per point")
    ap.add_argument("--input-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2, help="rounds; each server alone per round")
    ap.add_argument(
        "--cpu-threads",
        type=int,
        default=None,
        help="compute threads of each engine worker, both servers (OMP_NUM_THREADS); default: "
        "what `up` sets for one worker slot on this machine, its cores less one",
    )
    return ap.parse_args(argv)


def wait_ready(url: str, *, timeout_s: float = 600.0) -> None:
    """Wait until a server's health route answers 200."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url} not ready after {timeout_s:g}s")


def start_plain_vllm(config, *, port: int, env: dict[str, str], log: Path) -> subprocess.Popen:
    """`python -m vllm.entrypoints.openai.api_server` with the same engine args (own session)."""
    from serve.vllm_glue import vllm_cli_args

    cmd = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        *vllm_cli_args(config),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--disable-uvicorn-access-log",
    ]
    return subprocess.Popen(
        cmd,
        env={**os.environ, **env},
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def stop_session(proc: subprocess.Popen) -> None:
    """Stop a process started with its own session, and everything in that session."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def chat_load(base_url: str, api_key: str | None, args, model_dir: Path, **load: Any):
    """The bench client's config for a streamed chat load on the endpoint named "server":
    ``--input-len``/``--output-len`` tokens (the demo model's tokenizer), ``load`` the
    LoadConfig's values (concurrency, count or duration...)."""
    from cluster.bench.config import BenchConfig, Endpoint, LoadConfig, WorkloadConfig

    return BenchConfig(
        endpoints=[Endpoint(name="server", base_url=base_url, api_key=api_key)],
        workload=WorkloadConfig(
            api="chat",
            input_len=args.input_len,
            output_len=args.output_len,
            tokenizer=str(model_dir),
        ),
        load=LoadConfig(**load),
    )


@dataclass
class Measured:
    """One concurrency point of one server: the bench client's figures and where each
    request's time went."""

    point: Any
    parts: dict[str, float]
    slow: list[list[float]]
    # The load client's CPU priority during the load (cluster/bench/priority.py).
    client_priority: str


def request_parts(records: list[Any], concurrency: int, duration_s: float) -> dict[str, float]:
    """Where a closed-loop request's time goes, as means in ms over the answered requests:
    ``ttft`` (send to first token), ``decode`` (first to last token), ``tail`` (last token to
    the end of the response), ``idle`` (a client slot's time between one answer and its next
    request: slot time the server could not use), and ``chunks`` per request."""
    ok = [r for r in records if r.ok and r.token_chunk_times and r.e2e_s is not None]
    if not ok:
        return {}
    n = len(ok)
    busy = sum(r.e2e_s for r in records if r.e2e_s is not None)
    return {
        "ttft": 1000 * sum(r.token_chunk_times[0] for r in ok) / n,
        "decode": 1000 * sum(r.token_chunk_times[-1] - r.token_chunk_times[0] for r in ok) / n,
        "tail": 1000 * sum(r.e2e_s - r.token_chunk_times[-1] for r in ok) / n,
        "idle": 1000 * max(0.0, concurrency * duration_s - busy) / max(1, len(records)),
        "chunks": sum(len(r.token_chunk_times) for r in ok) / n,
    }


def measure(base_url: str, api_key: str | None, args, model_dir: Path) -> dict[int, Measured]:
    """Every concurrency point against one server (the only one running), the load client's
    CPU priority raised while it runs (cluster/bench/priority.py)."""
    from cluster.bench.priority import NOT_RAISED, raised_priority
    from cluster.bench.runner import run_benchmark

    points = {}
    for concurrency in args.concurrency:
        config = chat_load(
            base_url,
            api_key,
            args,
            model_dir,
            concurrency=[concurrency],
            num_requests=max(args.requests_per_slot * concurrency, args.min_requests),
            rounds=1,
        )
        with raised_priority() as raised:
            result = run_benchmark(config, keep_records=True)
        point = result.point("server", f"c={concurrency}")
        parts = request_parts(result.records, concurrency, point.duration_s)
        client = raised or NOT_RAISED
        points[concurrency] = Measured(point, parts, slow_requests(result.records), client)
    return points


def slow_requests(records: list[Any], factor: float = 4.0) -> list[list[float]]:
    """[seconds into the point, TTFT ms] of each request whose TTFT was over ``factor`` times
    the median: when the slow ones started tells a periodic stall from random ones."""
    ok = sorted((r for r in records if r.ok and r.token_chunk_times), key=lambda r: r.started_at)
    if not ok:
        return []
    t0 = ok[0].started_at
    median = statistics.median(r.token_chunk_times[0] for r in ok)
    return [
        [round(r.started_at - t0, 2), round(1000 * r.token_chunk_times[0], 1)]
        for r in ok
        if r.token_chunk_times[0] > factor * median
    ]


@dataclass
class Bed:
    """What both servers share: the loopback Ray cluster, the demo model, the engine values."""

    cluster: Any
    model_dir: Path
    work: Path
    threads: int
    common: dict[str, Any]


@contextlib.contextmanager
def loopback_bed(prefix: str, cpu_threads: int | None) -> Iterator[Bed]:
    """A one-node loopback Ray cluster (2 worker slots) and the demo model; the engine values
    both servers get: Ray executor, tp=1, eager, 1 GiB KV cache, the compute threads `up` would
    set (or ``cpu_threads``). Stops the cluster at the end."""
    from cluster.demo_model import build_demo_model
    from cluster.measure import engine_threads
    from tests.support.ray_cluster import start_loopback_ray_cluster

    threads = cpu_threads or engine_threads(len(os.sched_getaffinity(0)), 1)
    work = Path(tempfile.mkdtemp(prefix=prefix))
    model_dir = build_demo_model(work / "demo-tiny-llama")
    cluster = start_loopback_ray_cluster(nodes=1, slots_per_node=2)
    common = {
        "model": str(model_dir),
        "device": "cpu",
        "cpu_kvcache_space_gb": 1,
        "max_model_len": 2048,
        "max_num_seqs": 64,
        "engine_args": {"enforce_eager": True},
        "cpu_threads": threads,
    }
    try:
        yield Bed(cluster, model_dir, work, threads, common)
    finally:
        cluster.stop()


@contextlib.contextmanager
def serving(server: str, bed: Bed, log_name: str) -> Iterator[tuple[str, str | None, int | None]]:
    """One server running alone on the bed until the block ends: (OpenAI base URL, API key,
    the pid of plain vLLM's process group or None for ours)."""
    from serve.config import load_config
    from tests.support.server import free_port, running_server

    if server == "vllm":
        port = free_port()
        env = {
            **bed.cluster.env,
            "VLLM_CPU_KVCACHE_SPACE": "1",
            "OMP_NUM_THREADS": str(bed.threads),
        }
        proc = start_plain_vllm(
            load_config(**bed.common, no_auth=True), port=port, env=env, log=bed.work / log_name
        )
        try:
            wait_ready(f"http://127.0.0.1:{port}/health")
            yield f"http://127.0.0.1:{port}/v1", None, proc.pid
        finally:
            stop_session(proc)
    else:
        with running_server(
            bed.cluster, bed.model_dir, **{**bed.common, "max_ongoing_requests": 1024}
        ) as ours:
            yield ours.base_url, ours.api_key, None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # runs[server] = one {c: point} per round; each server runs alone, the order alternating.
    runs: dict[str, list[dict[int, Measured]]] = {"vllm": [], "llamacluster": []}
    with loopback_bed("bench-server-", args.cpu_threads) as bed:
        for r in range(args.rounds):
            order = ["vllm", "llamacluster"] if r % 2 == 0 else ["llamacluster", "vllm"]
            for server in order:
                with serving(server, bed, f"vllm-{r}.log") as (url, key, _):
                    runs[server].append(measure(url, key, args, bed.model_dir))
                print(f"round {r + 1}: {server} measured", flush=True)

    def med(server: str, c: int, get) -> float:
        return statistics.median(get(run[c]) for run in runs[server])

    metrics = {
        "ttft_p50_ms": lambda m: m.point.ttft_ms.p50,
        "ttft_p99_ms": lambda m: m.point.ttft_ms.p99,
        "itl_p99_ms": lambda m: m.point.itl_ms.p99,
        "output_tok_s": lambda m: m.point.output_throughput,
        "failed": lambda m: m.point.failed,
    }
    parts = ("ttft", "decode", "tail", "idle", "chunks")
    breakdown = [
        "| c | server | TTFT | decode | tail | idle | = per request ms | chunks |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    table = [
        "| c | server | TTFT p50 ms | TTFT p99 ms | ITL p99 ms | output tok/s | failed |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    summary = []
    for c in args.concurrency:
        row = {"concurrency": c}
        for name in metrics:
            row[name] = {s: med(s, c, metrics[name]) for s in runs}
        row["rounds_output_tok_s"] = {
            s: [metrics["output_tok_s"](run[c]) for run in runs[s]] for s in runs
        }
        row["slow_requests"] = {s: [run[c].slow for run in runs[s]] for s in runs}
        row["request_ms"] = {
            s: {k: med(s, c, lambda m, k=k: m.parts.get(k, 0.0)) for k in parts} for s in runs
        }
        for server in runs:
            ms = row["request_ms"][server]
            whole = ms["ttft"] + ms["decode"] + ms["tail"] + ms["idle"]
            breakdown.append(
                f"| {c} | {server} | {ms['ttft']:.1f} | {ms['decode']:.1f} | {ms['tail']:.1f} "
                f"| {ms['idle']:.1f} | {whole:.1f} | {ms['chunks']:.1f} |"
            )
        for server, label in (("vllm", "plain vLLM"), ("llamacluster", "llamacluster")):
            table.append(
                f"| {c} | {label} | {row['ttft_p50_ms'][server]:.1f} | "
                f"{row['ttft_p99_ms'][server]:.1f} | {row['itl_p99_ms'][server]:.1f} | "
                f"{row['output_tok_s'][server]:.0f} | {row['failed'][server]:g} |"
            )
        row["ttft_p50_overhead_ms"] = (
            row["ttft_p50_ms"]["llamacluster"] - row["ttft_p50_ms"]["vllm"]
        )
        row["output_tok_s_ratio"] = _ratio(row["output_tok_s"])
        row["itl_p99_ratio"] = _ratio(row["itl_p99_ms"])
        table.append(
            f"| {c} | ours vs vLLM | {row['ttft_p50_overhead_ms']:+.1f} ms | "
            f"{_ratio(row['ttft_p99_ms']):.2f}x | {row['itl_p99_ratio']:.2f}x | "
            f"{row['output_tok_s_ratio']:.2f}x | |"
        )
        summary.append(row)
    by_c = {row["concurrency"]: row for row in summary}
    verdict = {
        "ttft_p50_overhead_c1_ok": 1 in by_c and by_c[1]["ttft_p50_overhead_ms"] <= TTFT_TARGET_MS,
        "tok_s_ratio_ok": all(r["output_tok_s_ratio"] >= TOKS_TARGET_RATIO for r in summary),
        "itl_p99_ratio_ok": all(r["itl_p99_ratio"] <= ITL_P99_TARGET_RATIO for r in summary),
    }
    print("\n".join(table))
    print("\nWhere a request's time goes (means, ms; medians over the rounds):")
    print("\n".join(breakdown))
    print(json.dumps(verdict))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(
        json.dumps(
            {
                "summary": summary,
                "targets": verdict,
                "client_priority": sorted(
                    {m.client_priority for rs in runs.values() for run in rs for m in run.values()}
                ),
                "args": vars(args) | {"out": str(args.out)},
            },
            indent=2,
        )
    )
    os.replace(tmp, args.out)
    return 0


def _ratio(pair: dict[str, float]) -> float:
    """ours / plain vLLM (0 when the baseline is 0)."""
    return pair["llamacluster"] / pair["vllm"] if pair["vllm"] else 0.0


if __name__ == "__main__":
    sys.exit(main())
