"""Soak: steady streamed load on `up --local` for a long time; 5xx count, TTFT drift, memory growth.

Brings up the demo model with `llamacluster up --local` (a LLAMACLUSTER_HOME of its own), then
runs a closed-loop streamed chat load (the bench client's `send_request`, concurrency 4, the
fault benchmark's `Load`) for ``--minutes``. Reports:

- requests, failures by kind and the number of 5xx answers (target 0);
- TTFT p50/p99 of the first and of the last ``--window-minutes`` of the run, and the p99 drift;
- the resident memory (RSS) of the Serve replica process, vLLM's engine core and its Ray
  workers, after ``--warmup`` seconds of load and at the end, and the growth in % (target under
  5 %); a sample every minute goes to the JSON. The start is taken after a warm-up because the
  first minutes touch the KV cache's pages for the first time (growth that is not a leak).

Processes are found by the cluster's recorded Ray session only. Not part of CI. Then `down`.

    flock /tmp/llamacluster-heavy.lock .venv/bin/python benchmarks/bench_soak.py \\
        --minutes 30 --out bench-results/soak.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.bench_faults import Load, Sample, load_from_state, session_pids  # noqa: E402
from benchmarks.bench_netcost import cli, write_results  # noqa: E402

NAME = "local"
# Process kinds whose memory is followed, by what their command line starts with.
PROCESS_KINDS = {
    "replica": "ray::ServeReplica",
    "engine_core": "VLLM::EngineCore",
    "ray_worker": "ray::RayWorkerProc",
}
RSS_GROWTH_TARGET_PCT = 5.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "bench-results" / "soak.json")
    ap.add_argument("--minutes", type=float, default=30.0, help="length of the steady load")
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--output-len", type=int, default=32, help="tokens per request")
    ap.add_argument(
        "--window-minutes", type=float, default=5.0, help="first and last window for TTFT drift"
    )
    ap.add_argument(
        "--warmup", type=float, default=60.0, help="seconds of load before the start RSS"
    )
    ap.add_argument("--model-dir", type=Path, default=None, help="demo model (built if absent)")
    args = ap.parse_args(argv)
    if args.minutes <= 0 or args.window_minutes <= 0 or args.concurrency < 1:
        ap.error("--minutes, --window-minutes and --concurrency must be positive")
    if args.warmup >= args.minutes * 60:
        ap.error("--warmup must be shorter than the run (--minutes)")
    return args


# --- pure summaries ------------------------------------------------------------------------------


def percentile(values: list[float], q: int) -> float | None:
    """The ``q``-th percentile (1-99, inclusive method), None without values."""
    if len(values) < 2:
        return values[0] if values else None
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def ttft_window(samples: list[Sample], start: float, end: float) -> dict:
    """TTFT p50/p99 (seconds) of the successful requests started in [start, end)."""
    ttfts = [
        s.ttft_s for s in samples if s.ok and s.ttft_s is not None and start <= s.started < end
    ]
    p50, p99 = percentile(ttfts, 50), percentile(ttfts, 99)
    return {
        "requests": len(ttfts),
        "p50_s": None if p50 is None else round(p50, 4),
        "p99_s": None if p99 is None else round(p99, 4),
    }


def drift_pct(first: float | None, last: float | None) -> float | None:
    """Change from ``first`` to ``last`` in %, None when either is missing or first is 0."""
    if first is None or last is None or first == 0:
        return None
    return round((last - first) / first * 100.0, 1)


def summarize(samples: list[Sample], *, t0: float, t_end: float, window_s: float) -> dict:
    """Counts, 5xx and the TTFT drift between the first and the last window of the run."""
    failed = [s for s in samples if not s.ok]
    kinds: dict[str, int] = {}
    for s in failed:
        kinds[str(s.kind)] = kinds.get(str(s.kind), 0) + 1
    first = ttft_window(samples, t0, t0 + window_s)
    last = ttft_window(samples, t_end - window_s, t_end)
    return {
        "requests": len(samples),
        "failed": len(failed),
        "failed_by_kind": kinds,
        "http_5xx": sum(1 for s in samples if s.status is not None and s.status >= 500),
        "ttft_first_window": first,
        "ttft_last_window": last,
        "ttft_p99_drift_pct": drift_pct(first["p99_s"], last["p99_s"]),
        "tokens": sum(s.tokens for s in samples),
    }


def rss_growth(start: dict[str, int], end: dict[str, int]) -> dict[str, float | None]:
    """Growth in % of each process kind's RSS from ``start`` to ``end``."""
    return {k: drift_pct(start.get(k), end.get(k)) for k in sorted(set(start) | set(end))}


# --- processes of the local cluster ---------------------------------------------------------------


def rss_by_kind(session: int) -> dict[str, int]:
    """Summed RSS (bytes) of each process kind in Ray session ``session``."""
    totals: dict[str, int] = {}
    for pid in session_pids(session):
        cmd = _cmdline(pid)
        for kind, prefix in PROCESS_KINDS.items():
            if cmd.startswith(prefix):
                totals[kind] = totals.get(kind, 0) + _rss_bytes(pid)
    return totals


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


# --- the run ----------------------------------------------------------------------------------------


def soak(load: Load, session: int, *, minutes: float, warmup_s: float) -> dict:
    """Run ``load`` for ``minutes``; RSS after the warm-up, every minute, and at the end."""
    load.start()
    t0 = time.perf_counter()
    rss: list[dict] = []
    try:
        time.sleep(warmup_s)
        start = rss_by_kind(session)
        rss.append({"t_s": round(time.perf_counter() - t0), **start})
        end_at = t0 + minutes * 60
        while (left := end_at - time.perf_counter()) > 0:
            time.sleep(min(60.0, left))
            rss.append({"t_s": round(time.perf_counter() - t0), **rss_by_kind(session)})
            done = len(load.samples)
            print(f"{time.strftime('%H:%M:%S')} {done} requests, rss {rss[-1]}", flush=True)
        end = rss_by_kind(session)
    finally:
        load.stop()
    return {"t0": t0, "t_end": t0 + minutes * 60, "rss_start": start, "rss_end": end, "rss": rss}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from cluster.demo_model import build_demo_model

    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        home = Path(tmp) / "home"
        env = {**os.environ, "LLAMACLUSTER_HOME": str(home)}
        model_dir = args.model_dir
        if model_dir is None or not (model_dir / "config.json").exists():
            model_dir = build_demo_model(model_dir or Path(tmp) / "demo-tiny-llama")
        started = time.monotonic()
        try:
            cli("up", "--local", "--model", str(model_dir), env=env)
            up_s = time.monotonic() - started
            print(f"up: {up_s:.0f} s", flush=True)
            state = json.loads((home / "clusters" / NAME / "state.json").read_text())
            session = int(state["ray"]["nodes"]["head"]["session"])
            load = load_from_state(state, concurrency=args.concurrency, output_len=args.output_len)
            run = soak(load, session, minutes=args.minutes, warmup_s=args.warmup)
        finally:
            if (home / "clusters" / NAME / "state.json").exists():
                cli("down", "--name", NAME, env=env, timeout=300)
    samples = list(load.samples)
    summary = summarize(
        samples, t0=run["t0"], t_end=run["t_end"], window_s=args.window_minutes * 60
    )
    growth = rss_growth(run["rss_start"], run["rss_end"])
    result = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "up_s": round(up_s, 1),
        **summary,
        "rss_start_bytes": run["rss_start"],
        "rss_end_bytes": run["rss_end"],
        "rss_growth_pct": growth,
        "rss_samples": run["rss"],
        "cpu_count": os.cpu_count(),
        "load_average_end": os.getloadavg(),
    }
    print(json.dumps({k: v for k, v in result.items() if k != "rss_samples"}, indent=2))
    worst = max((g for g in growth.values() if g is not None), default=None)
    print(
        f"soak {args.minutes:g} min: {summary['requests']} requests, {summary['http_5xx']} × 5xx, "
        f"TTFT p99 {summary['ttft_first_window']['p99_s']} -> "
        f"{summary['ttft_last_window']['p99_s']} s ({summary['ttft_p99_drift_pct']} %), "
        f"largest RSS growth {worst} % (target < {RSS_GROWTH_TARGET_PCT:g} %)"
    )
    write_results(args.out, result)
    return 0 if summary["http_5xx"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
