"""A rolling model update under steady load: failed requests, the longest gap, the update's time.

For two replicas and for one, in turn, alone on the machine: `llamacluster up --local` serves demo
model A as "demo"; `llamacluster bench --name local -c 4` runs for a fixed window and saves every
request; 10 s into the window `up --model B` (same served name) rolls the update out. From the
saved requests: failed requests, the longest time between two successful completions, and the
update's wall time. With one replica the downtime (the longest gap) is set against the engine's
own load time, measured in the same run (plain vLLM, same engine arguments: bench_up.py).
Targets: no failed request with two replicas; with one, a gap at most 5 s beyond the engine's load.

    .venv/bin/python benchmarks/bench_rolling.py --out bench-results/rolling.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.bench_netcost import CLI, cli, report  # noqa: E402

ONE_REPLICA_EXTRA_TARGET_S = 5.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "bench-results" / "rolling.json")
    ap.add_argument("--replicas", default="2,1", help="replica counts to measure, in order")
    ap.add_argument("--window-s", type=float, default=180.0, help="load window around the update")
    ap.add_argument("--lead-s", type=float, default=10.0, help="load before the update starts")
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--output-len", type=int, default=16)
    return ap.parse_args(argv)


def gaps(records: list[dict]) -> dict:
    """Failed requests (by status or error kind) and the longest time between two successful
    completions (seconds), from the bench client's saved requests."""
    done = sorted(r["started_at"] + (r.get("e2e_s") or 0.0) for r in records if r.get("ok"))
    longest = max((b - a for a, b in itertools.pairwise(done)), default=0.0)
    kinds = Counter(str(r.get("status") or r.get("error_kind")) for r in records if not r.get("ok"))
    return {
        "requests": len(records),
        "failed": sum(kinds.values()),
        "failed_by_kind": dict(kinds),
        "longest_gap_s": longest,
    }


def measure(replicas: int, models: tuple[Path, Path], *, args, env, work: Path) -> dict:
    """One update from model A to B under load with ``replicas`` replicas."""
    common = ["--local", "--tp", "1", "--pp", "1", "--replicas", str(replicas)]
    common += ["--served-model-name", "demo", "--skip", "monitor", "--cpu-kvcache-gb", "1"]
    common += ["--cpu-slots", str(max(1, replicas))]
    cli("up", "--model", str(models[0]), *common, env=env)
    out_dir = work / f"bench-{replicas}"
    bench = subprocess.Popen(
        [
            *CLI,
            "bench",
            "--name",
            "local",
            "--model",
            "demo",
            "-c",
            str(args.concurrency),
            "--duration",
            f"{args.window_s:g}s",
            "--output-len",
            str(args.output_len),
            "--save-requests",
            "--no-plots",
            "--no-progress",
            "-o",
            str(out_dir),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    try:
        time.sleep(args.lead_s)
        started = time.monotonic()
        said = cli("up", "--model", str(models[1]), *common, env=env)
        update_s = time.monotonic() - started
        threads = deployed_threads(Path(env["LLAMACLUSTER_HOME"]))
        if bench.wait(timeout=args.window_s + 600) != 0:
            raise RuntimeError("the bench client failed; see its output directory")
    finally:
        if bench.poll() is None:
            bench.kill()
        cli("down", "--name", "local", env=env)
    if update_s + args.lead_s > args.window_s:
        raise RuntimeError(f"the update took {update_s:.0f} s: raise --window-s")
    saved = sorted(out_dir.glob("*-requests.jsonl"))
    records = [json.loads(line) for line in saved[-1].read_text().splitlines() if line.strip()]
    row = {"replicas": replicas, "update_s": update_s, "rolling": "rolling update" in said}
    return row | {"cpu_threads": threads} | gaps(records)


def deployed_threads(home: Path) -> int | None:
    """The compute threads `up` gave each engine worker (from the cluster's recorded state)."""
    state = json.loads((home / "clusters" / "local" / "state.json").read_text())
    return ((state.get("server") or {}).get("deployed") or {}).get("cpu_threads")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from benchmarks.bench_up import engine_load_s
    from cluster.demo_model import build_demo_model
    from tests.support.server import free_port

    work = Path(tempfile.mkdtemp(prefix="bench-rolling-"))
    env = {**os.environ, "LLAMACLUSTER_HOME": str(work / "home"), "COLUMNS": "200"}
    rows = []
    for replicas in (int(x) for x in args.replicas.split(",")):
        # Models of their own per count (new paths): vLLM finds no compiled graph of them yet.
        models = (
            build_demo_model(work / f"model-a-{replicas}"),
            build_demo_model(work / f"model-b-{replicas}", seed=1),
        )
        row = measure(replicas, models, args=args, env=env, work=work)
        if replicas == 1:
            # Like for like: the same threads, and a copy of model B at a new path, so that the
            # plain engine finds the compile caches as the update's engine did (vLLM keys its
            # compiled graphs by the model's path: none yet; the kernels model A built: warm).
            fresh = build_demo_model(work / f"model-b-plain-{len(rows)}", seed=1)
            values = {"model": str(fresh), "device": "cpu", "cpu_kvcache_space_gb": 1}
            values["cpu_threads"] = row["cpu_threads"]
            row["engine_load_s"] = engine_load_s(values, work=work, port=free_port())
        rows.append(row)
        print(json.dumps(row), flush=True)
    table = [
        "| replicas | update s | requests | failed | longest gap s | engine load s |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        load = f"{r['engine_load_s']:.1f}" if "engine_load_s" in r else "-"
        table.append(
            f"| {r['replicas']} | {r['update_s']:.1f} | {r['requests']} | {r['failed']} | "
            f"{r['longest_gap_s']:.1f} | {load} |"
        )
    verdict = {}
    for r in rows:
        if r["replicas"] > 1:
            verdict[f"no_failures_{r['replicas']}"] = r["failed"] == 0
        elif "engine_load_s" in r:
            extra = r["longest_gap_s"] - r["engine_load_s"]
            verdict["one_replica_gap_extra_s"] = round(extra, 1)
            verdict["one_replica_ok"] = extra <= ONE_REPLICA_EXTRA_TARGET_S
    report(args, table, verdict, rows=rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
