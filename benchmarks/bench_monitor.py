"""The cost of watching: output tokens/s with and without the monitor, and Prometheus's memory.

Brings up `llamacluster up --local` with the demo model and the `monitor` stage, then runs
`llamacluster bench --name local` in alternating rounds (on/off, then off/on, ...): *on* with the
monitor's Prometheus running (scraping the server's /metrics every 5 s and Ray's agents every
10 s), *off* with that same process stopped (SIGSTOP: it neither scrapes nor computes, and its
memory and history stay as they were; SIGCONT resumes it). One cluster for both sides keeps the
engine, its warm-up and the machine's drift out of the comparison. Prometheus's resident memory
(VmRSS) and CPU time are sampled over the run; the growth per hour is a straight-line fit over the
seconds it ran, extrapolated (the run itself lasts minutes). Prints a table, writes JSON, brings
the cluster down.

    flock /tmp/llamacluster-heavy.lock .venv/bin/python benchmarks/bench_monitor.py \\
        --rounds 3 --duration 30 --out bench-results/monitor.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.bench_netcost import cli, write_results  # noqa: E402 (after the path above)

NAME = "local"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "bench-results" / "monitor.json")
    ap.add_argument("--rounds", type=int, default=3, help="rounds, each one phase on and one off")
    ap.add_argument("--duration", type=int, default=30, help="measured seconds per phase")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--input-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--model-dir", type=Path, default=None, help="demo model (built if absent)")
    ap.add_argument("--sample-s", type=float, default=2.0, help="seconds between RSS samples")
    return ap.parse_args(argv)


def prometheus_pid(session: int) -> int:
    """The prometheus process of the monitor's session (the stage records the session id)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ProcessLookupError):
            if (entry / "comm").read_text().strip() == "prometheus" and os.getsid(
                int(entry.name)
            ) == session:
                return int(entry.name)
    raise RuntimeError(f"no prometheus process in session {session}")


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


@dataclass
class MemorySampler:
    """VmRSS of one process every ``every_s`` seconds, against the seconds it was not stopped."""

    pid: int
    every_s: float
    samples: list[tuple[float, int]] = field(default_factory=list)  # (running s, bytes)
    _running_s: float = 0.0
    _stopped: bool = False
    _done: threading.Event = field(default_factory=threading.Event)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        last = time.monotonic()
        while True:
            now = time.monotonic()
            if not self._stopped:
                self._running_s += now - last
            last = now
            self.samples.append((self._running_s, rss_bytes(self.pid)))
            if self._done.wait(self.every_s):
                return

    def stopped(self, value: bool) -> None:
        self._stopped = value

    def stop(self) -> None:
        self._done.set()
        self._thread.join()


def growth_per_hour(samples: list[tuple[float, int]]) -> float:
    """Least-squares slope of bytes against running seconds, times 3600 (0 with < 2 samples)."""
    if len(samples) < 2 or samples[-1][0] == samples[0][0]:
        return 0.0
    xs = [s for s, _ in samples]
    ys = [b for _, b in samples]
    return statistics.linear_regression(xs, ys).slope * 3600


def ratio_summary(on: list[float], off: list[float]) -> dict[str, float]:
    """Mean tokens/s each way, their ratio, and the spread of each side (max-min over mean)."""
    mean_on, mean_off = statistics.fmean(on), statistics.fmean(off)
    return {
        "on_tok_s": mean_on,
        "off_tok_s": mean_off,
        "ratio_on_off": mean_on / mean_off,
        "spread_on": (max(on) - min(on)) / mean_on,
        "spread_off": (max(off) - min(off)) / mean_off,
    }


def bench_phase(args: argparse.Namespace, *, env: dict[str, str], out: Path) -> float:
    """Output tokens/s of one measured phase (no plots: nothing asks Prometheus during it)."""
    cli(
        "bench", "--name", NAME, "-c", str(args.concurrency), "--duration", f"{args.duration}s",
        "--input-len", str(args.input_len), "--output-len", str(args.output_len),
        "--warmup", str(args.concurrency), "--no-plots", "--no-progress", "--no-net-counters",
        "-o", str(out), env=env, timeout=args.duration + 600,
    )  # fmt: skip
    point = json.loads((out / "bench.json").read_text())["points"][0]
    return float(point["output_throughput"])


def measure(args: argparse.Namespace, model_dir: Path, workdir: Path) -> dict:
    import httpx

    home = workdir / "home"
    env = {**os.environ, "LLAMACLUSTER_HOME": str(home), "VLLM_CPU_KVCACHE_SPACE": "1"}
    up_args = [
        "--local", "--model", str(model_dir), "--tp", "1", "--pp", "1", "--cpu-kvcache-gb", "1",
        "--ray-port", "0", "--dashboard-port", "0", "--api-port", "0", "--monitor-port", "0",
    ]  # fmt: skip
    phases: list[dict] = []
    pid: int | None = None
    try:
        cli("up", *up_args, env=env)
        state = json.loads((home / "clusters" / NAME / "state.json").read_text())
        monitor = state["monitoring"]
        pid = prometheus_pid(monitor["pid"])
        bench_phase(args, env=env, out=workdir / "warmup")  # engine warm on both sides
        sampler = MemorySampler(pid, args.sample_s)
        sampler.start()
        started_cpu = cpu_seconds(pid)
        for r in range(args.rounds):
            order = ("on", "off") if r % 2 == 0 else ("off", "on")
            for side in order:
                if side == "off":
                    os.kill(pid, signal.SIGSTOP)
                    sampler.stopped(True)
                cpu0, t0 = cpu_seconds(pid), time.monotonic()
                try:
                    tok_s = bench_phase(args, env=env, out=workdir / f"r{r}-{side}")
                finally:
                    if side == "off":
                        os.kill(pid, signal.SIGCONT)
                        sampler.stopped(False)
                wall = time.monotonic() - t0
                phases.append(
                    {
                        "round": r,
                        "monitor": side,
                        "out_tok_s": tok_s,
                        "prometheus_cpu_percent": 100 * (cpu_seconds(pid) - cpu0) / wall,
                        # The shared machine's load (1 min) at the end of the phase.
                        "load1": os.getloadavg()[0],
                    }
                )
                print(f"round {r} monitor {side}: {tok_s:.1f} output tok/s", flush=True)
        sampler.stop()

        def query(expr: str) -> list[dict]:
            resp = httpx.get(f"{monitor['url']}/api/v1/query", params={"query": expr})
            return resp.json()["data"]["result"]

        series = query("prometheus_tsdb_head_series")
        # What the scraped side pays: each target's last scrape (how long its exporter took to
        # answer, how many samples), as Prometheus measured it.
        scrapes = {
            f"{r['metric']['job']} {r['metric']['instance']}": float(r["value"][1])
            for r in query("scrape_duration_seconds")
        }
        samples = {
            f"{r['metric']['job']} {r['metric']['instance']}": int(float(r["value"][1]))
            for r in query("scrape_samples_scraped")
        }
        running_s = sampler.samples[-1][0]
        memory = {
            "rss_first_mb": sampler.samples[0][1] / 1e6,
            "rss_last_mb": sampler.samples[-1][1] / 1e6,
            "rss_peak_mb": max(b for _, b in sampler.samples) / 1e6,
            "running_s": running_s,
            "samples": len(sampler.samples),
            "growth_mb_per_hour_extrapolated": growth_per_hour(sampler.samples) / 1e6,
            "cpu_percent_over_run": 100 * (cpu_seconds(pid) - started_cpu) / max(running_s, 1e-9),
            "head_series": int(float(series[0]["value"][1])) if series else None,
            "scrape_s_by_target": scrapes,
            "samples_by_target": samples,
            "version": monitor.get("version"),
        }
    finally:
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)  # never leave it stopped
        if (home / "clusters" / NAME / "state.json").exists():
            cli("down", "--name", NAME, env=env, timeout=600)
    on = [p["out_tok_s"] for p in phases if p["monitor"] == "on"]
    off = [p["out_tok_s"] for p in phases if p["monitor"] == "off"]
    return {"phases": phases, "summary": ratio_summary(on, off), "memory": memory}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from rich.console import Console
    from rich.table import Table

    from cluster.demo_model import build_demo_model

    with tempfile.TemporaryDirectory(prefix="bench-monitor-") as tmp:
        model_dir = args.model_dir
        if model_dir is None or not (model_dir / "config.json").exists():
            model_dir = build_demo_model(model_dir or Path(tmp) / "demo-tiny-llama")
        result = measure(args, model_dir, Path(tmp))
    console = Console(width=160)
    table = Table(title="output tokens/s, monitor on vs off (alternating rounds, one cluster)")
    for col in ("round", "monitor on", "monitor off", "on/off", "prometheus CPU % (on)", "load"):
        table.add_column(col, justify="right")
    for r in range(args.rounds):
        on = next(p for p in result["phases"] if p["round"] == r and p["monitor"] == "on")
        off = next(p for p in result["phases"] if p["round"] == r and p["monitor"] == "off")
        table.add_row(
            str(r),
            f"{on['out_tok_s']:.1f}",
            f"{off['out_tok_s']:.1f}",
            f"{on['out_tok_s'] / off['out_tok_s']:.3f}",
            f"{on['prometheus_cpu_percent']:.1f}",
            f"{on['load1']:.1f} / {off['load1']:.1f}",
        )
    s = result["summary"]
    table.add_row(
        "mean",
        f"{s['on_tok_s']:.1f}",
        f"{s['off_tok_s']:.1f}",
        f"{s['ratio_on_off']:.3f}",
        "",
        "",
    )
    console.print(table)
    m = result["memory"]
    console.print(
        f"spread between rounds: on {100 * s['spread_on']:.1f} %, off {100 * s['spread_off']:.1f} %"
        f"\nprometheus ({m['version']}): RSS {m['rss_first_mb']:.1f} → {m['rss_last_mb']:.1f} MB "
        f"(peak {m['rss_peak_mb']:.1f}) over {m['running_s']:.0f} s running, "
        f"{m['head_series']} series in its head block; growth "
        f"{m['growth_mb_per_hour_extrapolated']:+.1f} MB/hour (extrapolated from this run); "
        f"CPU {m['cpu_percent_over_run']:.1f} % of one core"
    )
    scrapes = Table(title="last scrape per target (Prometheus's scrape_duration_seconds)")
    for col in ("target", "samples", "scrape ms"):
        scrapes.add_column(col, justify="right")
    for target, took in sorted(m["scrape_s_by_target"].items()):
        scrapes.add_row(target, str(m["samples_by_target"].get(target, "")), f"{took * 1000:.1f}")
    console.print(scrapes)
    out = {"args": {k: str(v) for k, v in vars(args).items()}, **result}
    write_results(args.out, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
