"""Network kB per generated token on a two-node cluster, layout by layout (tp × pp).

Brings up a real two-node cluster with `llamacluster up` over SSH, each node a network
namespace of this host with its own interface (`eth0`), sshd and /dev/shm (see
tests/support/netns.py; needs root), one CPU worker slot per node so every two-worker layout
spans both nodes. For each layout it (re)deploys the server with `up --tp T --pp P` (Ray stays
up), reads the nodes' idle traffic for a few seconds, then runs `llamacluster bench --name`,
which reads every node's interface counters before and after the measured phase. Prints a table,
writes JSON, brings the cluster down.

    sudo .venv/bin/python benchmarks/bench_netcost.py --layouts 2x1,1x2 --out bench-results/netcost.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

CLI = [sys.executable, "-c", "from cluster.cli.app import run; run()"]
NAME = "netcost"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "bench-results" / "netcost.json")
    ap.add_argument(
        "--layouts", default="2x1,1x2", help="tp x pp layouts, comma separated (e.g. 2x1,1x2)"
    )
    ap.add_argument("--requests", type=int, default=16, help="measured requests per layout")
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--input-len", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--model-dir", type=Path, default=None, help="demo model (built if absent)")
    ap.add_argument("--idle-s", type=float, default=5.0, help="seconds of idle traffic per layout")
    return ap.parse_args(argv)


def cli(*args: str, env: dict[str, str], timeout: float = 1500) -> str:
    """Run the real CLI as a person would; its output, or an error with its last lines."""
    done = subprocess.run(
        [*CLI, *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(
            f"llamacluster {args[0]} exited {done.returncode}:\n"
            f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        )
    return done.stdout


def write_results(path: Path, result: dict) -> None:
    """The benchmark's JSON, written whole (temp file + rename), and where it went."""
    from cluster.files import atomic_write

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, (json.dumps(result, indent=2) + "\n").encode())
    print(f"results: {path}")


def report(args: Any, table: list[str], verdict: dict, **results: Any) -> None:
    """Print a benchmark's table and verdict, and write its JSON to ``args.out``: ``results``,
    the verdict as ``targets`` and the arguments it ran with."""
    print("\n".join(table))
    print(json.dumps(verdict))
    payload = {**results, "targets": verdict, "args": vars(args) | {"out": str(args.out)}}
    write_results(args.out, payload)


def idle_bytes_per_s(seconds: float) -> dict[str, float]:
    """Bytes per second each node's interface moves (sent + received) with the server idle."""
    from cluster.bench.netcount import cluster_net_nodes, counter_delta, read_counters

    nodes = cluster_net_nodes(NAME)
    before, t0 = read_counters(nodes), time.monotonic()
    time.sleep(seconds)
    after, dt = read_counters(nodes), time.monotonic() - t0
    return {
        n: (counter_delta(before[n], after[n]).tx + counter_delta(before[n], after[n]).rx) / dt
        for n in before
    }


def measure_layouts(
    model_dir: Path,
    layouts: list[tuple[int, int]],
    *,
    workdir: Path,
    requests: int,
    concurrency: int,
    input_len: int,
    output_len: int,
    idle_s: float,
) -> list[dict]:
    """One row per layout: tokens/s and kB sent/received per token, per node and in total."""
    from tests.support.netns import start_netns_hosts

    home = workdir / "home"
    env = {**os.environ, "LLAMACLUSTER_HOME": str(home), "VLLM_CPU_KVCACHE_SPACE": "1"}
    os.environ["LLAMACLUSTER_HOME"] = str(home)  # for the in-process idle reading
    hosts = start_netns_hosts(2)
    inventory = workdir / "ips.txt"
    inventory.write_text(hosts.inventory_text())
    up_args = [
        "--ips", str(inventory), "--name", NAME, "--ssh-key", str(hosts.client_key),
        "--known-hosts", str(workdir / "known_hosts"), "--model", str(model_dir),
        "--shared-dir", str(workdir / "shared"), "--env", sys.prefix, "--skip", "cache",
        # No monitor: its scrapes of the worker's Ray metrics would count as serving traffic.
        "--skip", "monitor",
        "--cpu-slots", "1", "--cpu-kvcache-gb", "1", "--max-model-len", "512",
        "--ray-port", "0", "--dashboard-port", "0", "--api-port", "0",
    ]  # fmt: skip
    rows = []
    try:
        for tp, pp in layouts:
            started = time.monotonic()
            cli("up", *up_args, "--tp", str(tp), "--pp", str(pp), env=env)
            up_s = time.monotonic() - started
            idle = idle_bytes_per_s(idle_s)
            out = workdir / f"bench-{tp}x{pp}"
            cli(
                "bench", "--name", NAME, "-n", str(requests), "-c", str(concurrency),
                "--input-len", str(input_len), "--output-len", str(output_len),
                "--tokenizer", str(model_dir), "--warmup", "2", "--no-plots", "--no-progress",
                "-o", str(out), env=env, timeout=900,
            )  # fmt: skip
            point = json.loads((out / "bench.json").read_text())["points"][0]
            extra = point["extra"]
            tokens = max(point["output_tokens"], 1)
            rows.append(
                {
                    "layout": f"tp={tp} × pp={pp}",
                    "tp": tp,
                    "pp": pp,
                    "up_s": round(up_s, 1),
                    "completed": point["completed"],
                    "output_tokens": point["output_tokens"],
                    "out_tok_s": point["output_throughput"],
                    **extra,
                    # The idle traffic (Ray heartbeats, metrics) over the run, per token.
                    "idle kB/tok": {
                        n: bps * point["duration_s"] / 1000.0 / tokens for n, bps in idle.items()
                    },
                }
            )
    finally:
        try:
            if (home / "clusters" / NAME / "state.json").exists():
                cli("down", "--name", NAME, env=env, timeout=300)
        finally:
            hosts.stop()
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from rich.console import Console
    from rich.table import Table

    from cluster.demo_model import build_demo_model

    layouts = [tuple(int(x) for x in text.split("x")) for text in args.layouts.split(",")]
    with tempfile.TemporaryDirectory(prefix="netcost-") as tmp:
        model_dir = args.model_dir
        if model_dir is None or not (model_dir / "config.json").exists():
            model_dir = build_demo_model(model_dir or Path(tmp) / "demo-tiny-llama")
        rows = measure_layouts(
            model_dir,
            layouts,
            workdir=Path(tmp),
            requests=args.requests,
            concurrency=args.concurrency,
            input_len=args.input_len,
            output_len=args.output_len,
            idle_s=args.idle_s,
        )
    table = Table(title="network kB per generated token, two nodes (each its own eth0)")
    cols = ["layout", "ok", "out tok/s"]
    for node in ("head", "worker1"):
        cols += [f"{node} kB tx/tok", f"{node} kB rx/tok", f"{node} idle kB/tok"]
    for col in (*cols, "total kB tx/tok", "up s"):
        table.add_column(col, justify="right")
    for r in rows:
        cells = [r["layout"], f"{r['completed']}/{args.requests}", f"{r['out_tok_s']:.1f}"]
        for node in ("head", "worker1"):
            cells += [
                f"{r[f'{node} kB tx/tok']:.2f}",
                f"{r[f'{node} kB rx/tok']:.2f}",
                f"{r['idle kB/tok'][node]:.2f}",
            ]
        table.add_row(*cells, f"{r['net kB tx/tok']:.2f}", f"{r['up_s']:.0f}")
    Console(width=200).print(table)
    out = {"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}
    write_results(args.out, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
