"""Prometheus after a long time scraping a two-node cluster: resident memory, series, disk, CPU.

Brings up a real two-node cluster with `llamacluster up` over SSH on two namespace nodes (the
fault benchmark's `start_cluster`: supervised Ray, the demo model with tp=2 so both nodes run a
vLLM worker) with the `monitor` stage on, then leaves it scraping for ``--minutes`` (default 60)
with a light load (one streamed chat request every ``--request-every`` seconds, so the server's
and vLLM's series move). Every ``--sample-s`` it records Prometheus's resident memory (VmRSS) and,
every few minutes, the head series and the TSDB's size on disk (asked inside the head's
namespace, where Prometheus listens on 127.0.0.1). Reports the RSS after the first minute, at the
end, the peak and the straight-line growth per hour; head series, chunks, bytes on disk and the
CPU share. Prints a table, writes JSON, brings the cluster down. Needs root (namespaces).

    sudo flock /tmp/llamacluster-heavy.lock .venv/bin/python benchmarks/bench_monitor_hour.py \\
        --minutes 60 --out bench-results/monitor-hour.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.bench_faults import start_cluster, stop_cluster  # noqa: E402
from benchmarks.bench_monitor import (  # noqa: E402
    MemorySampler,
    cpu_seconds,
    growth_per_hour,
    prometheus_pid,
)
from benchmarks.bench_netcost import write_results  # noqa: E402

# What is asked of Prometheus's own API every few minutes.
QUERIES = {
    "head_series": "prometheus_tsdb_head_series",
    "head_chunks": "prometheus_tsdb_head_chunks",
    "targets_up": "sum(up)",
    "targets": "count(up)",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "bench-results" / "monitor-hour.json")
    ap.add_argument("--minutes", type=float, default=60.0, help="how long it scrapes")
    ap.add_argument("--request-every", type=float, default=5.0, help="seconds between requests")
    ap.add_argument("--sample-s", type=float, default=30.0, help="seconds between RSS samples")
    ap.add_argument("--query-every", type=float, default=300.0, help="seconds between API reads")
    ap.add_argument("--model-dir", type=Path, default=None, help="demo model (built if absent)")
    return ap.parse_args(argv)


def ask_prometheus(cluster, url: str) -> dict[str, float | None]:
    """The QUERIES' values, read with curl inside the head's namespace (Prometheus listens on
    the head's 127.0.0.1 only)."""
    out: dict[str, float | None] = {}
    for name, expr in QUERIES.items():
        text = cluster.hosts.run_in(
            0, "curl", "-sf", "--get", "--data-urlencode", f"query={expr}", f"{url}/api/v1/query"
        )
        result = json.loads(text)["data"]["result"]
        out[name] = float(result[0]["value"][1]) if result else None
    return out


def disk_bytes(path: Path) -> int:
    """Bytes of every file under ``path`` (the TSDB's data directory)."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def light_load(state: dict, every_s: float, stop: threading.Event, counts: dict) -> None:
    """One streamed chat request every ``every_s`` seconds until ``stop``; counts by outcome."""
    import httpx

    key = Path(state["secrets"]["api_key_file"]).read_text().split()[0]
    url = state["server"]["endpoint"]
    model = state["server"]["served_name"]
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "Say something about trains."}],
        "max_tokens": 16,
        "stream": True,
    }
    with httpx.Client(timeout=60, headers={"Authorization": f"Bearer {key}"}) as client:
        while not stop.wait(every_s):
            try:
                with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
                    for _ in response.iter_bytes():
                        pass
                    counts[str(response.status_code)] = counts.get(str(response.status_code), 0) + 1
            except httpx.HTTPError as exc:
                counts[type(exc).__name__] = counts.get(type(exc).__name__, 0) + 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from cluster.demo_model import build_demo_model

    workdir = Path(tempfile.mkdtemp(prefix="bench-monitor-hour-"))
    model_dir = args.model_dir or build_demo_model(workdir / "demo-tiny-llama")
    cluster = start_cluster(workdir, model_dir, tp=2, pp=1, stall_timeout=30, skip=("cache",))
    stop = threading.Event()
    counts: dict[str, int] = {}
    reads: list[dict] = []
    sampler: MemorySampler | None = None
    stopped = False
    try:
        state = cluster.state()
        monitor = state["monitoring"]
        pid = prometheus_pid(monitor["pid"])
        data_dir = Path(monitor["dir"]) / "data"

        def read_now(t_s: float) -> dict:
            read: dict = {"t_s": round(t_s)}
            try:
                read.update(ask_prometheus(cluster, monitor["url"]))
            except (subprocess.SubprocessError, ValueError, KeyError) as exc:
                read["error"] = f"{type(exc).__name__}: {exc}"  # one failed read ends nothing
            read["disk_mb"] = disk_bytes(data_dir) / 1e6
            return read

        loader = threading.Thread(
            target=light_load, args=(state, args.request_every, stop, counts), daemon=True
        )
        loader.start()
        sampler = MemorySampler(pid, args.sample_s)
        sampler.start()
        cpu0, t0 = cpu_seconds(pid), time.monotonic()
        end = t0 + 60 * args.minutes
        next_read = t0
        while (now := time.monotonic()) < end:
            if now >= next_read:
                read = read_now(now - t0)
                read["rss_mb"] = sampler.samples[-1][1] / 1e6 if sampler.samples else None
                reads.append(read)
                print(json.dumps(read), flush=True)
                next_read = now + args.query_every
            time.sleep(min(5.0, max(0.0, end - now)))
        wall_s = time.monotonic() - t0
        cpu_s = cpu_seconds(pid) - cpu0
        final = read_now(wall_s)
        reads.append(final)
        sampler.stop()
        stopped = True
    finally:
        if sampler is not None and not stopped:
            sampler.stop()
        stop.set()
        stop_cluster(cluster)
    assert sampler is not None
    samples = sampler.samples
    if not samples:
        raise RuntimeError("no memory sample of Prometheus was taken")
    after_minute = [b for t, b in samples if t >= 60] or [samples[-1][1]]
    memory = {
        "rss_after_1min_mb": after_minute[0] / 1e6,
        "rss_last_mb": samples[-1][1] / 1e6,
        "rss_peak_mb": max(b for _, b in samples) / 1e6,
        "growth_mb_per_hour": growth_per_hour([(t, b) for t, b in samples if t >= 60]) / 1e6,
        "running_s": wall_s,
        "cpu_percent": 100 * cpu_s / max(wall_s, 1e-9),
        "version": monitor.get("version"),
    }
    nan = float("nan")  # a final read that failed shows as nan (its error is in the JSON)
    table = [
        "| measure | value |",
        "| --- | ---: |",
        f"| scraped for | {memory['running_s'] / 60:.0f} min |",
        f"| targets up / scraped | {final.get('targets_up', nan):.0f} / {final.get('targets', nan):.0f} |",
        f"| RSS after 1 min | {memory['rss_after_1min_mb']:.1f} MB |",
        f"| RSS at the end | {memory['rss_last_mb']:.1f} MB |",
        f"| RSS peak | {memory['rss_peak_mb']:.1f} MB |",
        f"| RSS growth (fit, after 1 min) | {memory['growth_mb_per_hour']:+.1f} MB/hour |",
        f"| head series at the end | {final.get('head_series', nan):.0f} |",
        f"| TSDB on disk at the end | {final['disk_mb']:.1f} MB |",
        f"| Prometheus CPU | {memory['cpu_percent']:.2f} % of a core |",
        f"| light-load requests by outcome | {counts} |",
    ]
    print("\n".join(table))
    write_results(args.out, {"memory": memory, "reads": reads, "requests": counts})
    return 0


if __name__ == "__main__":
    sys.exit(main())
