"""CPU an idle engine worker uses, by readiness-probe interval (device=cpu).

Each probe is a step of the engine; after every step vLLM's CPU worker busy-waits on its
shared-memory queue for a second before it sleeps. This starts a one-node loopback Ray cluster,
deploys the server on the demo model once per setting, lets it settle, then reads the worker's
CPU time from /proc over a window with no requests. A setting is BASE or BASE:IDLE, the
server's ready_probe_interval_s and ready_probe_idle_interval_s (the interval doubles while
idle up to IDLE; BASE alone: IDLE = BASE, a fixed interval). Prints a table, writes JSON.

    .venv/bin/python benchmarks/bench_idle_probe.py --intervals 10,10:60 --settle-s 80 \
        --window-s 120 --out bench-results/idle.json
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

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from cluster.files import atomic_write  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "bench-results" / "idle.json")
    ap.add_argument(
        "--intervals",
        default="10,10:60",
        help="probe settings, comma separated: BASE (fixed) or BASE:IDLE (doubling up to IDLE)",
    )
    ap.add_argument("--settle-s", type=float, default=15.0)
    ap.add_argument("--window-s", type=float, default=30.0)
    return ap.parse_args(argv)


def cpu_ticks(pid: int) -> int:
    """User + system CPU time of ``pid`` in clock ticks."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def worker_pids(sessions: list[int]) -> list[int]:
    out = subprocess.run(["ps", "-eo", "pid=,sid=,args="], capture_output=True, text=True).stdout
    return [
        int(line.split()[0])
        for line in out.splitlines()
        if "RayWorkerProc" in line and int(line.split()[1]) in sessions
    ]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from cluster.demo_model import build_demo_model
    from tests.support.ray_cluster import start_loopback_ray_cluster
    from tests.support.server import running_server

    hz = os.sysconf("SC_CLK_TCK")
    rows = []
    with tempfile.TemporaryDirectory(prefix="lc-idle-") as tmp:
        model = build_demo_model(Path(tmp) / "demo-tiny-llama")
        cluster = start_loopback_ray_cluster(nodes=1, slots_per_node=1)
        try:
            for setting in args.intervals.split(","):
                base, _, idle = setting.partition(":")
                interval, idle_s = float(base), float(idle or base)
                with running_server(
                    cluster,
                    model,
                    ready_probe_interval_s=interval,
                    ready_probe_idle_interval_s=idle_s,
                ):
                    time.sleep(args.settle_s)
                    pids = worker_pids(cluster.session_ids)
                    before = {p: cpu_ticks(p) for p in pids}
                    time.sleep(args.window_s)
                    used = sum(cpu_ticks(p) - before[p] for p in pids) / hz / args.window_s
                rows.append({"probe_interval_s": interval, "probe_idle_interval_s": idle_s,
                             "workers": len(pids),
                             "idle_worker_core_pct": round(100 * used / max(len(pids), 1), 1)})  # fmt: skip
                print(f"probe every {setting} s: {rows[-1]['idle_worker_core_pct']} % of a core",
                      flush=True)  # fmt: skip
        finally:
            cluster.stop()
    print(f"\n{'probe interval s':>16} {'idle cap s':>10} {'idle worker, % of a core':>26}")
    for row in rows:
        print(
            f"{row['probe_interval_s']:>16g} {row['probe_idle_interval_s']:>10g} "
            f"{row['idle_worker_core_pct']:>26}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out, json.dumps({"window_s": args.window_s, "rows": rows}, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
