"""This server vs plain vLLM, both up at once, the load switching between them in short windows.

bench_server.py runs each server alone, one after the other: a ratio is taken across minutes, and
on a virtual machine whose speed drifts from minute to minute a round of one server moves by up
to 1.7x (docs/BENCHMARKS.md). Here both servers run on one loopback Ray node with the same engine
arguments (bench_server.py's bed); the closed-loop load goes to one of them for ``--window-s``
seconds, then, after ``--settle-s`` seconds of quiet, to the other, the order alternating (A B,
B A, ...). Each ratio is taken between two adjacent windows, seconds apart.

Each window keeps the "alone" of bench_server.py: every process of the other server (ours: the
Serve controller, proxy, replica, engine core and worker; plain vLLM: its API server, engine core
and Ray worker) is stopped (SIGSTOP) for the window and its settling, and continued (SIGCONT)
after, so its background work (Serve's control loop, our readiness probe) takes no core from the
one measured. Ray's daemons serve both and keep running; their CPU and that of any process of the
cluster outside the measured server is recorded per window (``background_cores``). Prints a
table, writes JSON.

    .venv/bin/python benchmarks/bench_server_ab.py --out bench-results/server-ab.json
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

SERVERS = ("vllm", "llamacluster")
# Titles of Ray worker processes that are Ray's own: pooled idle workers, the node's agents.
RAY_OWN = ("ray::IDLE", "ray::DashboardAgent", "ray::RuntimeEnvAgent")
TOKS_TARGET_RATIO = 0.97
ITL_P99_TARGET_RATIO = 1.1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench-results/server-ab.json"))
    parser.add_argument(
        "--concurrency", type=int, nargs="+", default=[1, 4, 16, 64], help="points to measure"
    )
    parser.add_argument("--pairs", type=int, default=5, help="window pairs per concurrency")
    parser.add_argument("--window-s", type=float, default=15.0, help="seconds of load per window")
    parser.add_argument(
        "--settle-s", type=float, default=3.0, help="quiet seconds before each window"
    )
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument(
        "--cpu-threads",
        type=int,
        default=None,
        help="compute threads of each engine worker, both servers (OMP_NUM_THREADS)",
    )
    args = parser.parse_args(argv)
    if args.pairs < 1 or args.window_s <= 0 or args.settle_s < 0:
        parser.error("--pairs must be at least 1, --window-s above 0 and --settle-s at least 0")
    return args


def pair_summary(windows: list[dict[str, Any]]) -> dict[str, Any]:
    """The ratios of one concurrency from its windows, in the order measured: each window is
    {"pair", "server", "tok_s", "itl_p99_ms", "ttft_p50_ms", "background_cores", "failed"}, two
    per pair. A pair with a failed request is left out; the figures are medians over the rest."""
    pairs: dict[int, dict[str, dict[str, Any]]] = {}
    for window in windows:
        pairs.setdefault(window["pair"], {})[window["server"]] = window
    counted, left_out = [], []
    for index, pair in sorted(pairs.items()):
        if set(pair) != set(SERVERS):
            continue
        ours, plain = pair["llamacluster"], pair["vllm"]
        row = {
            "pair": index,
            "tok_s_ratio": ours["tok_s"] / plain["tok_s"] if plain["tok_s"] else 0.0,
            "itl_p99_ratio": (
                ours["itl_p99_ms"] / plain["itl_p99_ms"] if plain["itl_p99_ms"] else 0.0
            ),
            "ttft_p50_overhead_ms": ours["ttft_p50_ms"] - plain["ttft_p50_ms"],
            "background_cores": {s: pair[s]["background_cores"] for s in SERVERS},
        }
        failed = any(pair[s]["failed"] for s in SERVERS) or not plain["tok_s"]
        (left_out if failed else counted).append(row)
    summary: dict[str, Any] = {"pairs": counted, "left_out": left_out}
    if counted:
        for key in ("tok_s_ratio", "itl_p99_ratio", "ttft_p50_overhead_ms"):
            values = [row[key] for row in counted]
            summary[key] = statistics.median(values)
            summary[f"{key}_range"] = [min(values), max(values)]
        for server in SERVERS:
            summary[f"background_cores_{server}"] = statistics.median(
                row["background_cores"][server] for row in counted
            )
    return summary


def cpu_seconds(pids: set[int]) -> float:
    """User + system CPU seconds of the running processes of ``pids``."""
    from profile_server import cpu_times

    return sum(spent for _, spent in cpu_times(pids).values())


def _signal_all(pids: set[int], signum: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


@contextlib.contextmanager
def stopped(pids: set[int]) -> Iterator[None]:
    """Every process of ``pids`` stopped (SIGSTOP) for the block, continued after, whatever
    happens in it. The block starts once each one is seen stopped (a signal is delivered when
    the process is next scheduled)."""
    import psutil

    _signal_all(pids, signal.SIGSTOP)
    try:
        deadline = time.monotonic() + 5.0
        for pid in pids:
            with contextlib.suppress(psutil.NoSuchProcess):
                while psutil.Process(pid).status() not in (
                    psutil.STATUS_STOPPED,
                    psutil.STATUS_ZOMBIE,
                ):
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"process {pid} did not stop within 5 s of SIGSTOP")
                    time.sleep(0.005)
        yield
    finally:
        _signal_all(pids, signal.SIGCONT)


def busy_workers(roots: set[int]) -> set[int]:
    """The Ray worker processes of the cluster of ``roots`` that hold a task or an actor (their
    title names it, ``ray::Class.method``), not idle pooled workers or Ray's own agents."""
    from profile_server import cpu_times, tree

    return {
        pid
        for pid, (title, _) in cpu_times(tree(roots)).items()
        if title.startswith("ray::") and not title.startswith(RAY_OWN)
    }


def one_window(endpoint, others: set[int], args, model_dir: Path, concurrency: int) -> dict:
    """After ``--settle-s``, a closed-loop load of ``--window-s`` on ``endpoint`` (base URL, key)
    with the client's priority raised; the CPU of ``others`` (every process of the cluster but
    the measured server's) over the same seconds, in cores."""
    from bench_server import chat_load

    from cluster.bench.priority import NOT_RAISED, raised_priority
    from cluster.bench.runner import run_benchmark

    config = chat_load(
        *endpoint,
        args,
        model_dir,
        concurrency=[concurrency],
        duration_s=args.window_s,
        warmup_requests=0,
    )
    time.sleep(args.settle_s)
    before, started = cpu_seconds(others), time.monotonic()
    with raised_priority() as raised:
        result = run_benchmark(config, keep_records=False)
    wall = time.monotonic() - started
    point = result.point("server", f"c={concurrency}")
    return {
        "tok_s": point.output_throughput,
        "itl_p99_ms": point.itl_ms.p99,
        "ttft_p50_ms": point.ttft_ms.p50,
        "failed": point.failed,
        "requests": point.completed,
        "background_cores": (cpu_seconds(others) - before) / wall,
        "client_priority": raised or NOT_RAISED,
    }


def measure(bed, args) -> dict[int, list[dict[str, Any]]]:
    """Both servers up on ``bed``; every window of every concurrency, in the order measured."""
    from bench_server import chat_load, serving
    from profile_server import cluster_roots, tree

    from cluster.bench.runner import run_benchmark

    windows: dict[int, list[dict[str, Any]]] = {c: [] for c in args.concurrency}
    roots = cluster_roots(bed.cluster.spec.temp_dir)
    with serving("vllm", bed, "vllm.log") as (plain_url, _, plain_pid):
        plain = tree({plain_pid}) | tree(busy_workers(roots))
        with serving("llamacluster", bed, "unused.log") as (url, key, _):
            ours = tree(busy_workers(roots)) - plain
            endpoints = {"vllm": (plain_url, None), "llamacluster": (url, key)}
            pids = {"vllm": plain, "llamacluster": ours}
            for endpoint in endpoints.values():  # warm both before any window
                config = chat_load(*endpoint, args, bed.model_dir, concurrency=[4], num_requests=32)
                run_benchmark(config, keep_records=False)
            for c in args.concurrency:
                for index in range(args.pairs):
                    for server in SERVERS if index % 2 == 0 else SERVERS[::-1]:
                        other = SERVERS[1 - SERVERS.index(server)]
                        with stopped(pids[other]):
                            everyone = tree(roots | {plain_pid})
                            window = one_window(
                                endpoints[server], everyone - pids[server], args, bed.model_dir, c
                            )
                        windows[c].append({"pair": index, "server": server, **window})
                        print(
                            f"c={c} pair {index + 1}: {server} {window['tok_s']:.0f} tok/s, "
                            f"background {window['background_cores']:.3f} cores",
                            flush=True,
                        )
    return windows


def main(argv: list[str] | None = None) -> int:
    from bench_netcost import report
    from bench_server import loopback_bed

    args = parse_args(argv)
    with loopback_bed("bench-server-ab-", args.cpu_threads) as bed:
        windows = measure(bed, args)
    summary = {c: pair_summary(windows[c]) for c in args.concurrency}
    table = [
        "| c | pairs | tok/s ours / vLLM (median) | range | ITL p99 ratio | "
        "TTFT p50 ours − vLLM | background cores: vLLM / ours windows | left out (a failure) |",
        "| --- | ---: | ---: | --- | ---: | ---: | --- | ---: |",
    ]
    for c, row in summary.items():
        if not row["pairs"]:
            table.append(f"| {c} | 0 | | | | | | {len(row['left_out'])} |")
            continue
        low, high = row["tok_s_ratio_range"]
        table.append(
            f"| {c} | {len(row['pairs'])} | {row['tok_s_ratio']:.2f}x | {low:.2f}–{high:.2f}x | "
            f"{row['itl_p99_ratio']:.2f}x | {row['ttft_p50_overhead_ms']:+.1f} ms | "
            f"{row['background_cores_vllm']:.3f} / {row['background_cores_llamacluster']:.3f} | "
            f"{len(row['left_out'])} |"
        )
    counted = [row for row in summary.values() if row["pairs"]]
    verdict = {
        "every_point_counted": len(counted) == len(summary),
        "tok_s_ratio_ok": bool(counted)
        and all(row["tok_s_ratio"] >= TOKS_TARGET_RATIO for row in counted),
        "itl_p99_ratio_ok": bool(counted)
        and all(row["itl_p99_ratio"] <= ITL_P99_TARGET_RATIO for row in counted),
    }
    report(
        args,
        table,
        verdict,
        summary={str(c): row for c, row in summary.items()},
        windows={str(c): rows for c, rows in windows.items()},
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
