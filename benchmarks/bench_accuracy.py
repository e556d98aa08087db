"""Accuracy check: `llamacluster bench` against vLLM's own serving benchmark on one vLLM server.

Both clients drive the same server with the same workload shape (random prompts of the same
input/output lengths, ignore_eos, the same concurrency and request count), alternating
in back-to-back pairs (vLLM then ours, then ours then vLLM, ...) so each pair sees the same machine
state; the verdict is the median over pairs of ours/vLLM tokens/s and of the TTFT p50 difference.
The table also shows each tool's medians over rounds. Prints a table and writes JSON.

    .venv/bin/python benchmarks/bench_accuracy.py            # builds the demo model, starts vLLM
    .venv/bin/python benchmarks/bench_accuracy.py --base-url http://127.0.0.1:8000/v1 --model DIR
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cluster.bench import BenchConfig, Endpoint, LoadConfig, WorkloadConfig, run_benchmark  # noqa: E402

TOKS_TOLERANCE = 0.05  # output tokens/s within 5%
TTFT_REL, TTFT_ABS_MS = 0.05, 1.0  # TTFT p50 within 5% or 1 ms, whichever is larger


def free_port() -> int:
    """A TCP port nobody listens on right now (bind 0, read it back)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_vllm(model: str, *, log: Path, eager: bool) -> tuple[subprocess.Popen, str]:
    """Start `python -m vllm.entrypoints.openai.api_server` in its own session; wait until ready."""
    port = free_port()
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", model, "--host", "127.0.0.1", "--port", str(port),
        "--no-enable-prefix-caching",  # repeated prompts must not turn into cache hits
        "--max-model-len", "1024",
    ]  # fmt: skip
    if eager:
        cmd.append("--enforce-eager")  # skips minutes of compilation on a busy shared CPU
    fh = log.open("wb")
    proc = subprocess.Popen(
        cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True
    )
    base = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"vLLM server exited with {proc.returncode}:\n{tail}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(base + "/models", timeout=2).status_code == 200:
                return proc, base
        time.sleep(1)
    stop_process(proc)
    raise RuntimeError(
        f"vLLM server not ready in 900 s:\n{log.read_text(errors='replace')[-2000:]}"
    )


def stop_process(proc: subprocess.Popen) -> None:
    """TERM the server's process group (it was started in its own session), then KILL."""
    if proc.poll() is not None:
        return
    pgid = os.getpgid(proc.pid)
    os.killpg(pgid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(pgid, signal.SIGKILL)
        proc.wait(timeout=10)


def run_vllm_bench(
    base: str, model: str, *, c: int, n: int, in_len: int, out_len: int, seed: int
) -> dict:
    """vLLM's `vllm bench serve`, called from Python (its console script fails under vllm-cpu)."""
    from vllm.benchmarks.serve import add_cli_args, main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    args = parser.parse_args(
        [
            "--backend", "openai", "--base-url", base.removesuffix("/v1"),
            "--endpoint", "/v1/completions", "--model", model, "--tokenizer", model,
            "--dataset-name", "random", "--random-input-len", str(in_len),
            "--random-output-len", str(out_len), "--random-range-ratio", "0",
            "--num-prompts", str(n), "--max-concurrency", str(c), "--request-rate", "inf",
            "--ignore-eos", "--num-warmups", str(c), "--seed", str(seed), "--disable-tqdm",
            "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99",
        ]
    )  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()):
        res = main(args)
    return {
        "output_tok_s": res["output_throughput"],
        "req_s": res["request_throughput"],
        "ttft_p50_ms": res["median_ttft_ms"],
        "ttft_p99_ms": res["p99_ttft_ms"],
        "tpot_p50_ms": res["median_tpot_ms"],
        "itl_p50_ms": res["median_itl_ms"],
        "completed": res["completed"],
        "output_tokens": res["total_output_tokens"],
    }


def run_ours(
    base: str, model: str, *, c: int, n: int, in_len: int, out_len: int, seed: int
) -> dict:
    """`llamacluster bench` through its library entry point, same workload shape."""
    cfg = BenchConfig(
        endpoints=[Endpoint(name="vllm", base_url=base, model=model)],
        workload=WorkloadConfig(
            api="completions", dataset="random", input_len=in_len, output_len=out_len,
            ignore_eos=True, tokenizer=model, seed=seed,
        ),
        load=LoadConfig(concurrency=[c], num_requests=n, warmup_requests=c),
    )  # fmt: skip
    (p,) = run_benchmark(cfg, keep_records=False).points
    return {
        "output_tok_s": p.output_throughput,
        "req_s": p.request_throughput,
        "ttft_p50_ms": p.ttft_ms.p50,
        "ttft_p99_ms": p.ttft_ms.p99,
        "tpot_p50_ms": p.tpot_ms.p50,
        "itl_p50_ms": p.itl_ms.p50,
        "completed": p.completed,
        "output_tokens": p.output_tokens,
    }


def paired(runs: dict[str, list[dict]]) -> dict:
    """Round-by-round comparison and whether the targets hold.

    Round r of each tool ran back to back with the other's (the order alternating), so each
    pair saw the same machine state; the medians of the per-pair ratios and differences are
    the verdict. A shared machine's slow spells hit whole pairs and drop out of the median,
    where medians taken per tool over rounds would mix different spells.
    """
    pairs = list(zip(runs["ours"], runs["vllm"], strict=True))
    ratios = [o["output_tok_s"] / v["output_tok_s"] for o, v in pairs]
    diffs = [o["ttft_p50_ms"] - v["ttft_p50_ms"] for o, v in pairs]
    ref_ttft = statistics.median(v["ttft_p50_ms"] for _, v in pairs)
    toks_ratio, ttft_diff = statistics.median(ratios), statistics.median(diffs)
    ttft_allowed = max(TTFT_REL * ref_ttft, TTFT_ABS_MS)
    return {
        "pair_tok_s_ratios": [float(r) for r in ratios],
        "pair_ttft_p50_diffs_ms": [float(d) for d in diffs],
        "output_tok_s_ratio": float(toks_ratio),
        "ttft_p50_diff_ms": float(ttft_diff),
        "ttft_p50_allowed_ms": float(ttft_allowed),
        "output_tok_s_ok": bool(abs(toks_ratio - 1) <= TOKS_TOLERANCE),
        "ttft_p50_ok": bool(abs(ttft_diff) <= ttft_allowed),
    }


def main(argv: list[str] | None = None) -> int:
    """Run the side-by-side check; exit 1 when a target is missed."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="model dir (default: build the demo model in a temp dir)")
    ap.add_argument("--base-url", help="use this running vLLM server instead of starting one")
    ap.add_argument("--concurrency", default="1,8")
    ap.add_argument("--num-requests", type=int, default=32)
    ap.add_argument("--input-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=8, help="alternating rounds per tool and point")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--compile", action="store_true", help="let vLLM compile (default: --enforce-eager)"
    )
    ap.add_argument("--out", default="bench-results/bench_accuracy.json")
    args = ap.parse_args(argv)

    tmp = tempfile.TemporaryDirectory(prefix="bench-accuracy-")
    proc = None
    try:
        model = args.model
        if model is None:
            from cluster.demo_model import build_demo_model

            model = str(build_demo_model(Path(tmp.name) / "demo-model"))
        base = args.base_url
        if base is None:
            proc, base = start_vllm(model, log=Path(tmp.name) / "vllm.log", eager=not args.compile)
            print(f"vLLM server pid {proc.pid} ready at {base}", flush=True)
        rows = []
        for c in [int(x) for x in args.concurrency.split(",")]:
            shape = dict(
                c=c,
                n=args.num_requests,
                in_len=args.input_len,
                out_len=args.output_len,
                seed=args.seed,
            )
            runs: dict[str, list[dict]] = {"vllm": [], "ours": []}
            for r in range(args.rounds):
                order = ("vllm", "ours") if r % 2 == 0 else ("ours", "vllm")
                for tool in order:
                    fn = run_vllm_bench if tool == "vllm" else run_ours
                    cpu0 = time.process_time()
                    res = fn(base, model, **shape)
                    # the client's own CPU time competes with the server on a small machine
                    res["client_cpu_ms_per_req"] = (
                        (time.process_time() - cpu0) * 1000 / args.num_requests
                    )
                    runs[tool].append(res)
            med = {
                t: {k: statistics.median(x[k] for x in v) for k in v[0]} for t, v in runs.items()
            }
            rows.append({"concurrency": c, "runs": runs, "median": med, **paired(runs)})
    finally:
        if proc is not None:
            stop_process(proc)
        tmp.cleanup()

    table = Table(title="llamacluster bench vs vllm bench serve (same server, same workload)")
    for col in (
        "c",
        "tool",
        "out tok/s",
        "req/s",
        "TTFT p50 ms",
        "TTFT p99 ms",
        "TPOT p50 ms",
        "ITL p50 ms",
        "client CPU ms/req",
        "verdict",
    ):
        table.add_column(col, justify="right")
    for row in rows:
        for tool in ("vllm", "ours"):
            m = row["median"][tool]
            verdict_text = ""
            if tool == "ours":
                verdict_text = (
                    f"pairs: tok/s ×{row['output_tok_s_ratio']:.3f} {'ok' if row['output_tok_s_ok'] else 'MISS'}; "
                    f"TTFT {row['ttft_p50_diff_ms']:+.2f} ms (±{row['ttft_p50_allowed_ms']:.2f}) "
                    f"{'ok' if row['ttft_p50_ok'] else 'MISS'}"
                )
            table.add_row(
                str(row["concurrency"]), tool, f"{m['output_tok_s']:.1f}", f"{m['req_s']:.2f}",
                f"{m['ttft_p50_ms']:.2f}", f"{m['ttft_p99_ms']:.2f}", f"{m['tpot_p50_ms']:.3f}",
                f"{m['itl_p50_ms']:.3f}", f"{m['client_cpu_ms_per_req']:.2f}", verdict_text,
            )  # fmt: skip
    Console(width=200).print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # vLLM's figures are numpy scalars: default=float turns them into plain numbers
    out.write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2, default=float))
    print(f"results: {out}")
    ok = all(r["output_tok_s_ok"] and r["ttft_p50_ok"] for r in rows)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
