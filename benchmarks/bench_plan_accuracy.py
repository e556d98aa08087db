"""The planner's decode time per token at c=1, from measured CPU numbers, against the real server.

Builds the random-weight demo model at about ``--size-mb`` MB (1000: large enough that reading
the weights, not Python overhead, sets the pace), brings it up with `llamacluster up --local`
(whose measure stage records this machine's memory bandwidth, matmul speed and the fixed cost
of a decode layer's kernel calls), plans the same
model on the recorded numbers (`cluster.stages.measure.measured_cpu_spec`, the spec `up`'s
planner defaults use), then runs `llamacluster bench` at concurrency 1 and compares the plan's
expected decode ms/token with the measured TPOT p50. Prints a table, writes JSON, brings the
cluster down. Target: within 25 %.

    flock /tmp/llamacluster-heavy.lock .venv/bin/python benchmarks/bench_plan_accuracy.py \
        --out bench-results/plan_accuracy.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.bench_netcost import cli, write_results  # noqa: E402 (after the path above)

NAME = "planacc"
TARGET = 0.25


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "bench-results" / "plan_accuracy.json")
    ap.add_argument("--size-mb", type=float, default=1000.0, help="demo model weight size")
    ap.add_argument("--model-dir", type=Path, default=None, help="demo model (built if absent)")
    ap.add_argument("--requests", type=int, default=12, help="measured requests at c=1")
    ap.add_argument("--input-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--target", type=float, default=TARGET, help="allowed relative error")
    ap.add_argument(
        "--eager",
        action="store_true",
        help="serve without vLLM's compile (enforce_eager): a start without the compile's "
        "minutes on a fresh machine, and a slower step than the plan's",
    )
    return ap.parse_args(argv)


def planned_decode_ms(model_dir: Path, device, *, prompt_len: int) -> float:
    """The plan's expected decode ms/token at c=1 on ``device``."""
    from cluster.planner import ClusterShape, PlanOptions, load_model_shape, plan_deployment

    shape = load_model_shape(str(model_dir))
    cluster = ClusterShape(nodes=1, devices_per_node=1, device=device)
    plan = plan_deployment(shape, cluster, PlanOptions(concurrency=1, prompt_len=prompt_len))
    perf = plan.performance.model_dump()
    # The expected figure where the planner has one (measured rates are taken as achieved),
    # else the bound it reports.
    step = (perf.get("expected") or perf)["decode_batch1"]
    return step["total_ms"]


def run(args: argparse.Namespace, workdir: Path) -> dict:
    from cluster.demo_model import ensure_demo_model
    from cluster.device_specs import measured_cpu_device
    from cluster.stages.measure import measured_cpu_spec
    from cluster.state import load_state

    model_dir = ensure_demo_model(
        args.model_dir or workdir / "demo-model", target_size_mb=args.size_mb
    )
    home = workdir / "home"
    env = {**os.environ, "LLAMACLUSTER_HOME": str(home)}
    os.environ["LLAMACLUSTER_HOME"] = str(home)  # for load_state in this process
    up_args = [
        "--local", "--name", NAME, "--model", str(model_dir), "--skip", "monitor",
        "--cpu-kvcache-gb", "1", "--max-model-len", "512",
        "--ray-port", "0", "--dashboard-port", "0", "--api-port", "0",
    ]  # fmt: skip
    if args.eager:
        up_args += ["--engine-arg", "enforce_eager=true"]
    try:
        started = time.monotonic()
        cli("up", *up_args, env=env)
        up_s = time.monotonic() - started
        state = load_state(NAME)
        # Context at the middle of the generation: the bench's TPOT averages over it.
        context = args.input_len + args.output_len // 2
        device = measured_cpu_spec(state.nodes, state.measure)
        if device is None:
            raise RuntimeError("the measure stage recorded nothing")
        expected_ms = planned_decode_ms(model_dir, device, prompt_len=context)
        # The same plan on the plain streaming read instead of the engine kernel's rate.
        cpu = state.measure.cpu[state.nodes[0].name]
        read_only = measured_cpu_device(cpu.model_copy(update={"gemv_gbs": None}))
        read_ms = planned_decode_ms(model_dir, read_only, prompt_len=context)
        out = workdir / "bench"
        cli(
            "bench", "--name", NAME, "-n", str(args.requests), "-c", "1",
            "--input-len", str(args.input_len), "--output-len", str(args.output_len),
            "--tokenizer", str(model_dir), "--warmup", "2", "--no-plots", "--no-progress",
            "-o", str(out), env=env, timeout=1200,
        )  # fmt: skip
        point = json.loads((out / "bench.json").read_text())["points"][0]
    finally:
        if (home / "clusters" / NAME / "state.json").exists():
            cli("down", "--name", NAME, env=env, timeout=300)
    tpot = point["tpot_ms"]["p50"]
    return {
        "model_dir": str(model_dir),
        "weight_mb": args.size_mb,
        "eager": args.eager,
        "up_s": round(up_s, 1),
        "cpu": cpu.model_dump(),
        "device": device.model_dump(),
        "context_tokens": context,
        "expected_decode_ms": expected_ms,
        "layer_overhead_ms": device.layer_overhead_ms,
        "measured_tpot_p50_ms": tpot,
        "measured_tpot_p99_ms": point["tpot_ms"]["p99"],
        "completed": point["completed"],
        "relative_error": (expected_ms - tpot) / tpot,
        "expected_decode_ms_from_read": read_ms,
        "relative_error_from_read": (read_ms - tpot) / tpot,
        "target": args.target,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from rich.console import Console
    from rich.table import Table

    with tempfile.TemporaryDirectory(prefix="planacc-") as tmp:
        row = run(args, Path(tmp))
    cpu = row["cpu"]
    table = Table(title=f"plan vs server, decode at c=1, demo model ~{args.size_mb:g} MB")
    cols = (
        "read GB/s",
        "gemv GB/s",
        "matmul TFLOP/s",
        "layer ms",
        "plan ms/token",
        "TPOT p50 ms",
        "error",
    )
    for col in (*cols, "ok", "plan on read: ms, error"):
        table.add_column(col, justify="right")
    within = abs(row["relative_error"]) <= args.target
    table.add_row(
        f"{cpu['read_gbs']:.1f}",
        f"{cpu['gemv_gbs'] or 0:.1f}",
        f"{cpu['matmul_tflops']:.3g} ({cpu['dtype']})",
        f"{row['layer_overhead_ms']:.3f}",
        f"{row['expected_decode_ms']:.2f}",
        f"{row['measured_tpot_p50_ms']:.2f}",
        f"{row['relative_error']:+.1%}",
        "yes" if within else f"no (target ±{args.target:.0%})",
        f"{row['expected_decode_ms_from_read']:.2f}, {row['relative_error_from_read']:+.1%}",
    )
    Console(width=160).print(table)
    out = {"args": {k: str(v) for k, v in vars(args).items()}, "row": row, "within": within}
    write_results(args.out, out)
    return 0 if within else 1


if __name__ == "__main__":
    sys.exit(main())
