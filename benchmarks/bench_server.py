"""This server vs plain vLLM's OpenAI server, side by side: TTFT p50/p99 and output tokens/s.

Both run the same engine arguments with the Ray executor on one loopback Ray node, on the demo
model; the bench client's compare mode alternates them (A, B, A, B per point). Prints a table,
writes JSON. Targets: TTFT p50 overhead <= 10 ms at c=1, tokens/s >= 0.95x plain vLLM at c=16.

    .venv/bin/python benchmarks/bench_server.py --out bench-results/server.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

TTFT_TARGET_MS = 10.0
TOKS_TARGET_RATIO = 0.95


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "bench-results" / "server.json")
    ap.add_argument("--requests-c1", type=int, default=40, help="measured requests at c=1")
    ap.add_argument("--requests-c16", type=int, default=96, help="measured requests at c=16")
    ap.add_argument("--input-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds per point")
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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from cluster.bench.config import BenchConfig, Endpoint, LoadConfig, WorkloadConfig
    from cluster.bench.runner import run_benchmark
    from cluster.demo_model import build_demo_model
    from serve.config import load_config
    from tests.support.ray_cluster import start_loopback_ray_cluster
    from tests.support.server import running_server

    work = Path(tempfile.mkdtemp(prefix="bench-server-"))
    model_dir = build_demo_model(work / "demo-tiny-llama")
    cluster = start_loopback_ray_cluster(nodes=1, slots_per_node=2)
    common = {
        "model": str(model_dir),
        "device": "cpu",
        "cpu_kvcache_space_gb": 1,
        "max_model_len": 2048,
        "max_num_seqs": 32,
        "engine_args": {"enforce_eager": True},
    }
    baseline = None
    rows = []
    try:
        from tests.support.server import free_port

        vllm_port = free_port()
        env = {**cluster.env, "VLLM_CPU_KVCACHE_SPACE": "1"}
        baseline = start_plain_vllm(
            load_config(**common, no_auth=True), port=vllm_port, env=env, log=work / "vllm.log"
        )
        wait_ready(f"http://127.0.0.1:{vllm_port}/health")
        with running_server(cluster, model_dir, **{**common, "max_ongoing_requests": 1024}) as ours:
            for concurrency, count in ((1, args.requests_c1), (16, args.requests_c16)):
                config = BenchConfig(
                    endpoints=[
                        Endpoint(name="vllm", base_url=f"http://127.0.0.1:{vllm_port}/v1"),
                        Endpoint(name="llamacluster", base_url=ours.base_url, api_key=ours.api_key),
                    ],
                    workload=WorkloadConfig(
                        api="chat",
                        input_len=args.input_len,
                        output_len=args.output_len,
                        tokenizer=str(model_dir),
                    ),
                    load=LoadConfig(
                        concurrency=[concurrency], num_requests=count, rounds=args.rounds
                    ),
                )
                result = run_benchmark(config, keep_records=False)
                base = result.point("vllm", f"c={concurrency}")
                cand = result.point("llamacluster", f"c={concurrency}")
                rows.append((concurrency, base, cand))
    finally:
        if baseline is not None:
            stop_session(baseline)
        cluster.stop()

    table = [
        "| c | server | TTFT p50 ms | TTFT p99 ms | output tok/s | failed |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    summary = []
    for concurrency, base, cand in rows:
        for name, p in (("plain vLLM", base), ("llamacluster", cand)):
            table.append(
                f"| {concurrency} | {name} | {p.ttft_ms.p50:.1f} | {p.ttft_ms.p99:.1f} | "
                f"{p.output_throughput:.0f} | {p.failed} |"
            )
        ttft_delta = cand.ttft_ms.p50 - base.ttft_ms.p50
        ratio = cand.output_throughput / base.output_throughput if base.output_throughput else 0
        summary.append(
            {
                "concurrency": concurrency,
                "ttft_p50_ms": {"vllm": base.ttft_ms.p50, "ours": cand.ttft_ms.p50},
                "ttft_p99_ms": {"vllm": base.ttft_ms.p99, "ours": cand.ttft_ms.p99},
                "output_tok_s": {"vllm": base.output_throughput, "ours": cand.output_throughput},
                "ttft_p50_overhead_ms": ttft_delta,
                "ttft_p50_ratio": cand.ttft_ms.p50 / base.ttft_ms.p50 if base.ttft_ms.p50 else None,
                "output_tok_s_ratio": ratio,
            }
        )
        table.append(
            f"| {concurrency} | ours / vLLM | {summary[-1]['ttft_p50_ratio']:.2f}x "
            f"({ttft_delta:+.1f} ms) | {cand.ttft_ms.p99 / base.ttft_ms.p99:.2f}x | "
            f"{ratio:.2f}x | |"
        )
    c1 = summary[0]
    c16 = summary[-1]
    verdict = {
        "ttft_p50_overhead_c1_ok": c1["ttft_p50_overhead_ms"] <= TTFT_TARGET_MS,
        "tok_s_ratio_c16_ok": c16["output_tok_s_ratio"] >= TOKS_TARGET_RATIO,
    }
    print("\n".join(table))
    print(json.dumps(verdict))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(
        json.dumps(
            {"summary": summary, "targets": verdict, "args": vars(args) | {"out": str(args.out)}},
            indent=2,
        )
    )
    os.replace(tmp, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
