"""Engine start on CPU with vLLM's AOT compile on (its default) and off (what the replicas set).

Each start is a fresh process that builds a vLLM engine on the demo model (CPU, tp=1) and
exits; vLLM itself says how long its init took (profile, KV cache, model warm-up: the torch
compile) and whether it read a compiled model back. Rounds alternate the two settings, so
both see the same machine; the first round of each fills its cache. Prints a table, writes JSON.

    .venv/bin/python benchmarks/bench_compile_cache.py --rounds 3 --out bench-results/compile.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from cluster.files import atomic_write  # noqa: E402

# The child: one engine, then out (no generation: the start is what is measured).
CHILD = """\
import sys
from vllm import LLM
if __name__ == "__main__":
    LLM(model=sys.argv[1], max_model_len=512)
"""
INIT = re.compile(r"init engine \(profile, create kv cache, warmup model\) took ([0-9.]+) s")
RELOAD_FAILED = "Compiling model again due to a load failure"
SETTINGS = {"aot on (vLLM default)": None, "aot off (replicas)": "0"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "bench-results" / "compile.json")
    ap.add_argument("--rounds", type=int, default=3, help="starts of each setting")
    ap.add_argument("--model-dir", type=Path, default=None, help="demo model (built if absent)")
    return ap.parse_args(argv)


def one_start(model: Path, aot: str | None, cache: Path) -> dict:
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CACHE_ROOT": str(cache)}
    env["TORCHINDUCTOR_CACHE_DIR"] = str(cache / "inductor")  # not the machine's shared one
    env.pop("VLLM_USE_AOT_COMPILE", None)
    if aot is not None:
        env["VLLM_USE_AOT_COMPILE"] = aot
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(model)],
        env=env, capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    wall = time.monotonic() - started
    said = done.stdout + done.stderr
    init = INIT.search(said)
    if done.returncode != 0 or init is None:
        raise RuntimeError(f"engine start failed (exit {done.returncode}): {said[-2000:]}")
    return {"start_s": wall, "init_s": float(init.group(1)), "reload_failed": RELOAD_FAILED in said}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="lc-compile-") as tmp:
        model = args.model_dir
        if model is None:
            from cluster.demo_model import build_demo_model

            model = build_demo_model(Path(tmp) / "demo-tiny-llama")
        runs: dict[str, list[dict]] = {name: [] for name in SETTINGS}
        for r in range(args.rounds):
            for name, aot in SETTINGS.items():
                # One cache per setting, shared by its rounds (as on a node, across restarts).
                cache = Path(tmp) / f"cache-{aot or 'default'}"
                run = one_start(model, aot, cache)
                runs[name].append(run)
                print(f"round {r + 1} {name}: start {run['start_s']:.1f} s, init "
                      f"{run['init_s']:.1f} s, reload failed: {run['reload_failed']}", flush=True)  # fmt: skip
    rows = []
    for name, got in runs.items():
        later = got[1:] or got
        rows.append({
            "setting": name,
            "first init_s": got[0]["init_s"],
            "later init_s (median)": statistics.median(r["init_s"] for r in later),
            "later start_s (median)": statistics.median(r["start_s"] for r in later),
            "reloads failed": sum(r["reload_failed"] for r in got),
            "runs": got,
        })  # fmt: skip
    print(f"\n{'setting':<24} {'first init s':>12} {'later init s':>12} {'later start s':>13} "
          f"{'reload failed':>13}")  # fmt: skip
    for row in rows:
        print(f"{row['setting']:<24} {row['first init_s']:>12.1f} "
              f"{row['later init_s (median)']:>12.1f} {row['later start_s (median)']:>13.1f} "
              f"{row['reloads failed']:>13}")  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out, json.dumps({"rounds": args.rounds, "rows": rows}, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
