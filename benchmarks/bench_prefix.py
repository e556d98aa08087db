"""Prefix-aware routing vs least-load on conversations that share a system prompt.

`llamacluster up --local --replicas 2 --routing MODE` serves the demo model with two replicas
behind HAProxy; `llamacluster bench --name local --workload chat-sessions` runs the same
conversations (same seed; 16 open, their turns interleaved, 4 in flight) against each mode,
in alternating rounds (prefix first in odd rounds, least-load first in even ones), each mode
its own `up` / `down`. Reported per mode: vLLM's
prefix-cache hit rate summed over both replicas' own counters, TTFT p50/p99 (median over the
rounds), failures. With prefix routing also the router hop alone: sequential POSTs of a
chat body to the router's /internal/route, p50/p99 in ms (what each request pays before
HAProxy connects to its replica). Prints a table, writes JSON.
Targets: a clearly higher hit rate and a lower TTFT p50 with prefix routing.

    .venv/bin/python benchmarks/bench_prefix.py --out bench-results/prefix.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.bench_balancer import wait_all_ready  # noqa: E402
from benchmarks.bench_netcost import cli, report  # noqa: E402

MODES = ("prefix", "least-load")
ROUTER = re.compile(r'host = "([^"]+)", port = (\d+)')


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "bench-results" / "prefix.json")
    ap.add_argument("--rounds", type=int, default=2, help="rounds; each mode once per round")
    ap.add_argument("--requests", type=int, default=96, help="measured turns per mode and round")
    ap.add_argument("--concurrency", type=int, default=4, help="turns in flight")
    ap.add_argument(
        "--open-sessions",
        type=int,
        default=16,
        help="conversations open at once, their turns interleaved (bench --open-sessions)",
    )
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--system-prompt-len", type=int, default=300)
    ap.add_argument("--input-len", type=int, default=128, help="tokens per user turn")
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--hop-requests", type=int, default=200, help="router calls for the hop")
    ap.add_argument(
        "--model-size-mb",
        type=float,
        default=None,
        help="build the demo model at about this size (a larger one makes prefill, and so a "
        "prefix-cache hit, matter more); default: the tiny one",
    )
    return ap.parse_args(argv)


HOP_BODY = {
    "model": "m",
    "messages": [
        {"role": "system", "content": "You answer questions about trains. " * 60},
        {"role": "user", "content": "When does the first train leave?"},
    ],
}


def router_url(api_port: int, app_name: str) -> str:
    """The router's /internal/route, as HAProxy's Lua file names it."""
    from serve.balancer import private_dir_path

    for lua in private_dir_path(app_name, api_port).glob("*/ingress_request_router.lua"):
        if found := ROUTER.search(lua.read_text()):
            return f"http://{found[1]}:{found[2]}/internal/route"
    raise RuntimeError("no ingress request router in HAProxy's Lua file")


def hop_times(url: str, *, count: int | None = None, until=None, pause_s: float = 0.0) -> list:
    """Milliseconds of sequential POSTs of a chat body to the router: ``count`` of them, or
    until the event ``until`` is set (``pause_s`` between calls); the first 10 warm up."""
    import httpx

    times = []
    with httpx.Client(timeout=30) as client:
        i = 0
        while (count is not None and i < count + 10) or (until is not None and not until.is_set()):
            t0 = time.perf_counter()
            response = client.post(url, json=HOP_BODY)
            elapsed = (time.perf_counter() - t0) * 1000
            if response.status_code != 200:
                raise RuntimeError(f"router answered {response.status_code}: {response.text}")
            if i >= 10:
                times.append(elapsed)
            i += 1
            if pause_s:
                time.sleep(pause_s)
    return times


def percentiles(times: list[float]) -> dict[str, float]:
    """p50/p99 of the hop times (the bench client's own percentile), and their count."""
    from cluster.bench.metrics import percentile

    return {"p50_ms": percentile(times, 50), "p99_ms": percentile(times, 99), "calls": len(times)}


def bench_cli(env: dict[str, str], out: Path, model_dir: Path, args: argparse.Namespace) -> None:
    """The chat-sessions bench against the cluster, results in ``out``."""
    cli(
        "bench", "--name", "local", "--workload", "chat-sessions",
        "--turns", str(args.turns), "--system-prompt-len", str(args.system_prompt_len),
        "--input-len", str(args.input_len), "--output-len", str(args.output_len),
        "--tokenizer", str(model_dir),
        "-n", str(args.requests), "-c", str(args.concurrency), "--warmup", "0",
        "--open-sessions", str(max(args.open_sessions, args.concurrency)),
        "--no-plots", "--no-progress", "--no-net-counters", "-o", str(out),
        env=env,
    )  # fmt: skip


def one_round(mode: str, model_dir: Path, work: Path, args: argparse.Namespace) -> dict:
    """`up` with one routing mode, the chat-sessions bench against it, `down`."""
    home = work / f"home-{mode}"
    env = {**os.environ, "LLAMACLUSTER_HOME": str(home), "COLUMNS": "200"}
    up = ["--local", "--model", str(model_dir), "--tp", "1", "--pp", "1", "--replicas", "2"]
    up += ["--routing", mode, "--cpu-slots", "2", "--cpu-kvcache-gb", "1", "--skip", "monitor"]
    # Free ports of the system's choosing: nothing else on the machine is in the way.
    up += ["--ray-port", "0", "--dashboard-port", "0", "--api-port", "0"]
    cli("up", *up, env=env)
    try:
        state = json.loads((home / "clusters" / "local" / "state.json").read_text())
        url = state["server"]["endpoint"]
        wait_all_ready(url)
        out = work / f"bench-{mode}-{time.monotonic_ns()}"
        if mode == "prefix":
            # The router's hop while the replicas stream: a call every 0.5 s beside the load.
            url_route = router_url(
                int(url.rsplit(":", 1)[1]), state["server"].get("app_name", "llamacluster")
            )
            done = threading.Event()
            loaded: list[float] = []
            probe = threading.Thread(
                target=lambda: loaded.extend(hop_times(url_route, until=done, pause_s=0.5))
            )
            probe.start()
        try:
            bench_cli(env, out, model_dir, args)
        finally:
            if mode == "prefix":
                done.set()
                probe.join()
        point = json.loads((out / "bench.json").read_text())["points"][0]
        extra = point.get("extra", {})
        figures = {
            "hit_rate": extra.get("prefix_cache_hit_rate"),
            "queries": extra.get("prefix_cache_queries", 0.0),
            "replicas_read": extra.get("prefix_cache_replicas", 0.0),
            "ttft_p50_ms": point["ttft_ms"]["p50"],
            "ttft_p99_ms": point["ttft_ms"]["p99"],
            "completed": point["completed"],
            "failed": point["failed"],
        }
        if mode == "prefix":
            figures["router_hop"] = percentiles(hop_times(url_route, count=args.hop_requests))
            figures["router_hop_loaded"] = percentiles(loaded)
        return figures
    finally:
        cli("down", "--name", "local", env=env)


def summary(runs: dict[str, list[dict]]) -> dict[str, dict]:
    """Per mode: the hit rate over every round's tokens, TTFT medians over rounds, failures."""
    out = {}
    for mode, rounds in runs.items():
        queries = sum(r["queries"] for r in rounds)
        hits = sum((r["hit_rate"] or 0.0) * r["queries"] for r in rounds)
        out[mode] = {
            "hit_rate": hits / queries if queries else None,
            "ttft_p50_ms": statistics.median(r["ttft_p50_ms"] for r in rounds),
            "ttft_p99_ms": statistics.median(r["ttft_p99_ms"] for r in rounds),
            "completed": sum(r["completed"] for r in rounds),
            "failed": sum(r["failed"] for r in rounds),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from cluster.demo_model import build_demo_model

    work = Path(tempfile.mkdtemp(prefix="bench-prefix-"))
    model_dir = build_demo_model(work / "demo-llama", target_size_mb=args.model_size_mb)
    runs: dict[str, list[dict]] = {mode: [] for mode in MODES}
    for r in range(args.rounds):
        for mode in MODES if r % 2 == 0 else tuple(reversed(MODES)):
            runs[mode].append(one_round(mode, model_dir, work, args))
            print(f"round {r + 1} {mode}: {json.dumps(runs[mode][-1])}", flush=True)
    figures = summary(runs)
    hops = [r["router_hop"] for r in runs["prefix"] if "router_hop" in r]
    loaded_hops = [r["router_hop_loaded"] for r in runs["prefix"] if "router_hop_loaded" in r]
    p, ll = figures["prefix"], figures["least-load"]
    verdict = {
        "higher_hit_rate": (p["hit_rate"] or 0) > (ll["hit_rate"] or 0),
        "lower_ttft_p50": p["ttft_p50_ms"] < ll["ttft_p50_ms"],
        "all_succeeded": p["failed"] == 0 and ll["failed"] == 0,
    }
    table = [
        "| routing | prefix-cache hit rate | TTFT p50 ms | TTFT p99 ms | completed | failed |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for mode in MODES:
        f = figures[mode]
        rate = "n/a" if f["hit_rate"] is None else f"{100 * f['hit_rate']:.1f} %"
        table.append(
            f"| {mode} | {rate} | {f['ttft_p50_ms']:.1f} | {f['ttft_p99_ms']:.1f} | "
            f"{f['completed']} | {f['failed']} |"
        )
    if hops:
        table.append("")
        table.append(
            f"router hop (/internal/route alone): p50 "
            f"{statistics.median(h['p50_ms'] for h in hops):.2f} ms, p99 "
            f"{statistics.median(h['p99_ms'] for h in hops):.2f} ms"
        )
    if loaded_hops:
        table.append(
            f"router hop during the load (a call every 0.5 s): p50 "
            f"{statistics.median(h['p50_ms'] for h in loaded_hops):.2f} ms, p99 "
            f"{statistics.median(h['p99_ms'] for h in loaded_hops):.2f} ms"
        )
    report(args, table, verdict, summary=figures, rounds=runs, router_hop=hops)
    return 0


if __name__ == "__main__":
    sys.exit(main())
