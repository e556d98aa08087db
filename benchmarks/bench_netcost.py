"""Network kB per generated token on two loopback Ray nodes, layout by layout (tp × pp).

Starts a two-node loopback Ray cluster (127.0.0.1, 127.0.0.2, one worker slot each, so a
two-worker layout spans both nodes), serves the demo model (random weights: gibberish text) in
each layout in turn, and runs `llamacluster bench`'s client with the network counter observer
reading `lo` on both "nodes" before and after the measured phase. Prints a table, writes JSON.

On one host both nodes read the same `lo` counters (host-wide numbers, see docs/BENCH.md), and
each byte on `lo` is counted once sent and once received.

    .venv/bin/python benchmarks/bench_netcost.py --out bench-results/netcost.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "bench-results" / "netcost.json")
    ap.add_argument(
        "--layouts", default="1x1,2x1,1x2", help="tp x pp layouts, comma separated (e.g. 2x1,1x2)"
    )
    ap.add_argument("--requests", type=int, default=16, help="measured requests per layout")
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--input-len", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--model-dir", type=Path, default=None, help="demo model (built if absent)")
    ap.add_argument(
        "--idle-s", type=float, default=10.0, help="seconds of idle lo traffic measured per layout"
    )
    return ap.parse_args(argv)


def loopback_net_nodes(hosts: list[str]):
    """NetNodes for loopback "nodes" of this host: local runners reading the shared `lo`."""
    from cluster.bench.netcount import NetNode
    from cluster.inventory import Node
    from cluster.runner import LocalRunner

    return [
        NetNode(
            name="head" if i == 0 else f"worker{i}",
            runner=LocalRunner(Node(index=i, host=h, local=True)),
            interface="lo",
            host_key="this-host/lo",
        )
        for i, h in enumerate(hosts)
    ]


def measure_layouts(
    model_dir: Path,
    layouts: list[tuple[int, int]],
    *,
    requests: int,
    concurrency: int,
    input_len: int,
    output_len: int,
    idle_s: float = 10.0,
) -> list[dict]:
    """One row per layout: tokens/s and kB sent/received per token (total and per node)."""
    from cluster.bench.config import BenchConfig, Endpoint, LoadConfig, WorkloadConfig
    from cluster.bench.netcount import NetCounterObserver, counter_delta, read_counters
    from cluster.bench.runner import run_benchmark
    from tests.support.ray_cluster import start_loopback_ray_cluster
    from tests.support.server import running_server

    cluster = start_loopback_ray_cluster(nodes=2, slots_per_node=1)
    nodes = loopback_net_nodes(["127.0.0.1", "127.0.0.2"])
    rows = []
    try:
        for tp, pp in layouts:
            started = time.monotonic()
            with running_server(
                cluster, model_dir, tp=tp, pp=pp, engine_args={}, max_model_len=512,
                max_num_seqs=16, ready_timeout_s=900.0,
            ) as server:  # fmt: skip
                load_s = time.monotonic() - started
                # The background: lo traffic of the idle server, Ray and anything else on this
                # host (other clusters too), per second, to set against the per-token figures.
                before, t0 = read_counters(nodes[:1]), time.monotonic()
                time.sleep(idle_s)
                idle = counter_delta(before["head"], read_counters(nodes[:1])["head"])
                idle_tx_per_s = idle.tx / (time.monotonic() - t0)
                config = BenchConfig(
                    endpoints=[
                        Endpoint(name="main", base_url=server.base_url, api_key=server.api_key)
                    ],
                    workload=WorkloadConfig(
                        input_len=input_len, output_len=output_len, tokenizer=str(model_dir)
                    ),
                    load=LoadConfig(
                        concurrency=[concurrency], num_requests=requests, warmup_requests=2
                    ),
                )
                observer = NetCounterObserver(nodes, endpoint="main")
                result = run_benchmark(config, observers=[observer], keep_records=False)
            point = result.points[0]
            background_kb = idle_tx_per_s * point.duration_s / 1000.0
            rows.append(
                {
                    "layout": f"tp={tp} × pp={pp}",
                    "tp": tp,
                    "pp": pp,
                    "load_s": round(load_s, 1),
                    "completed": point.completed,
                    "output_tokens": point.output_tokens,
                    "out_tok_s": point.output_throughput,
                    **point.extra,
                    "idle kB/s": idle_tx_per_s / 1000.0,
                    "kB tx/tok less idle": point.extra["net kB tx/tok"]
                    - background_kb / max(point.output_tokens, 1),
                }
            )
    finally:
        cluster.stop()
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from rich.console import Console
    from rich.table import Table

    from cluster.demo_model import build_demo_model
    from cluster.files import atomic_write

    layouts = [tuple(int(x) for x in text.split("x")) for text in args.layouts.split(",")]
    model_dir = args.model_dir
    if model_dir is None or not (model_dir / "config.json").exists():
        model_dir = build_demo_model(
            model_dir or Path(tempfile.mkdtemp(prefix="netcost-")) / "demo-tiny-llama"
        )
    rows = measure_layouts(
        model_dir,
        layouts,
        requests=args.requests,
        concurrency=args.concurrency,
        input_len=args.input_len,
        output_len=args.output_len,
        idle_s=args.idle_s,
    )
    table = Table(title="network kB per generated token, two loopback nodes (lo, host-wide)")
    cols = ("layout", "ok", "out tok/s", "kB tx/tok", "kB rx/tok", "idle kB/s", "tx/tok less idle")
    for col in (*cols, "load s"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            r["layout"], f"{r['completed']}/{args.requests}", f"{r['out_tok_s']:.1f}",
            f"{r['net kB tx/tok']:.2f}", f"{r['net kB rx/tok']:.2f}", f"{r['idle kB/s']:.1f}",
            f"{r['kB tx/tok less idle']:.2f}", f"{r['load_s']:.0f}",
        )  # fmt: skip
    Console().print(table)
    out = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "rows": rows,
        "note": "one host: both nodes read the same lo counters; each lo byte is tx and rx",
    }
    atomic_write(args.out, (json.dumps(out, indent=2) + "\n").encode())
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
