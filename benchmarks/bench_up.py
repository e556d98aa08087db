"""`llamacluster up --local` against the engine's own load time, side by side, with `up`'s stages.

Each round, alone on the machine and in turn: plain vLLM's OpenAI server started with the same
engine arguments `up` deploys (`vllm_cli_args` of the same ServeConfig values: demo model, CPU KV
space, Ray executor on a one-node Ray cluster started beforehand) and timed until /health answers
200, then stopped; then `llamacluster up
--local` timed until it returns (the server answers /ready), its per-stage seconds read from the
cluster's state, a second `up` with nothing to do, and `down`. Prints a table, writes JSON.
Targets: `up` adds at most 15 s to the engine's load; a second `up` at most 10 s; `down` at most
10 s.

    .venv/bin/python benchmarks/bench_up.py --rounds 2 --out bench-results/up.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.bench_server import start_plain_vllm, stop_session, wait_ready  # noqa: E402

UP_OVERHEAD_TARGET_S = 15.0
SECOND_UP_TARGET_S = 10.0
DOWN_TARGET_S = 10.0
CLI = [str(Path(sys.executable).parent / "llamacluster")]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "bench-results" / "up.json")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds")
    return ap.parse_args(argv)


def timed(cmd: list[str], *, env: dict[str, str], log: Path) -> float:
    """Run ``cmd`` to the end (output to ``log``); its wall time; a failure stops the benchmark."""
    started = time.monotonic()
    with log.open("a") as out:
        rc = subprocess.run(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, check=False)
    if rc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[1:3])} failed (exit {rc.returncode}); see {log}")
    return time.monotonic() - started


def engine_load_s(values: dict, *, work: Path, port: int) -> float:
    """Plain vLLM with the same engine arguments: seconds from start to /health 200. Its Ray
    executor joins a one-node loopback Ray cluster started beforehand (Ray's start is not the
    engine's load; `up` counts its own). ``values["cpu_threads"]``, when given, is the compute
    threads of its worker, as `up` sets them (OMP_NUM_THREADS)."""
    from serve.config import load_config
    from tests.support.ray_cluster import start_loopback_ray_cluster

    config = load_config(**values, no_auth=True)
    cluster = start_loopback_ray_cluster(nodes=1, slots_per_node=1)
    try:
        env = {**cluster.env, "VLLM_CPU_KVCACHE_SPACE": str(values["cpu_kvcache_space_gb"])}
        if config.cpu_threads is not None:
            env["OMP_NUM_THREADS"] = str(config.cpu_threads)
        return _time_to_health(config, env=env, work=work, port=port)
    finally:
        cluster.stop()


def _time_to_health(config, *, env: dict[str, str], work: Path, port: int) -> float:
    started = time.monotonic()
    proc = start_plain_vllm(config, port=port, env=env, log=work / "vllm.log")
    try:
        wait_ready(f"http://127.0.0.1:{port}/health")
        return time.monotonic() - started
    finally:
        stop_session(proc)


def stage_seconds(home: Path) -> dict[str, float]:
    """The seconds of each stage of the last `up`, from the cluster's recorded state."""
    state = json.loads((home / "clusters" / "local" / "state.json").read_text())
    return {name: rec["seconds"] for name, rec in state.get("stages", {}).items()}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from cluster.demo_model import build_demo_model
    from cluster.measure import engine_threads
    from cluster.stages.serve import default_cpu_kvcache_gb
    from tests.support.server import free_port

    work = Path(tempfile.mkdtemp(prefix="bench-up-"))
    home = work / "home"
    env = {**os.environ, "LLAMACLUSTER_HOME": str(home)}
    log = work / "cli.log"
    model_dir = build_demo_model(home / "demo-model")
    values = {
        "model": str(model_dir),
        "device": "cpu",
        "cpu_kvcache_space_gb": default_cpu_kvcache_gb(),
        # What `up --local` gives its one worker: the cores less its slot.
        "cpu_threads": engine_threads(len(os.sched_getaffinity(0)), 1),
    }
    rounds = []
    for r in range(args.rounds):
        engine = engine_load_s(values, work=work, port=free_port())
        up = timed([*CLI, "up", "--local", "--model", str(model_dir)], env=env, log=log)
        stages = stage_seconds(home)
        again = timed([*CLI, "up", "--local", "--model", str(model_dir)], env=env, log=log)
        down = timed([*CLI, "down", "--name", "local"], env=env, log=log)
        rounds.append(
            {"engine_load_s": engine, "up_s": up, "stages_s": stages, "second_up_s": again}
            | {"down_s": down, "up_overhead_s": up - engine}
        )
        print(
            f"round {r + 1}: engine {engine:.1f} s, up {up:.1f} s (+{up - engine:.1f}), "
            f"second up {again:.1f} s, down {down:.1f} s",
            flush=True,
        )

    def med(key: str) -> float:
        return statistics.median(x[key] for x in rounds)

    stage_names = list(rounds[-1]["stages_s"])
    table = [
        "| round | engine load s | up s | up - engine s | second up s | down s | "
        + " | ".join(f"{s} s" for s in stage_names)
        + " |",
        "| --- " * (6 + len(stage_names)) + "|",
    ]
    for i, x in enumerate(rounds, 1):
        table.append(
            f"| {i} | {x['engine_load_s']:.1f} | {x['up_s']:.1f} | {x['up_overhead_s']:+.1f} | "
            f"{x['second_up_s']:.1f} | {x['down_s']:.1f} | "
            + " | ".join(f"{x['stages_s'].get(s, 0):.1f}" for s in stage_names)
            + " |"
        )
    verdict = {
        "up_overhead_ok": med("up_overhead_s") <= UP_OVERHEAD_TARGET_S,
        "second_up_ok": med("second_up_s") <= SECOND_UP_TARGET_S,
        "down_ok": med("down_s") <= DOWN_TARGET_S,
    }
    print("\n".join(table))
    print(json.dumps(verdict))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"rounds": rounds, "targets": verdict}, indent=2))
    os.replace(tmp, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
