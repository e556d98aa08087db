"""Download speed-up: `llamacluster download` on 1..N loopback nodes vs `hf download` on one node.

The loopback hub caps each client identity (the node tag in the User-Agent; `hf download` has
none and is capped by its address) at the same bandwidth, as separate machines with their own
uplinks would be. The demo model is scaled to a few hundred MB in 16+ shards. All runs happen
side by side in one process run; a table is printed and JSON written. Disk use stays at the
source model plus one copy; everything is removed at the end.

    .venv/bin/python benchmarks/bench_download.py                   # 300 MB, 16 shards, 8 MB/s
    .venv/bin/python benchmarks/bench_download.py --size-mb 300 --shards 16 --rate-mb 8 --nodes 1,2,3,4
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TARGET_FACTOR = 0.8  # speed-up on N nodes must be at least 0.8 x N


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The benchmark's flags (see the module docstring for the usual command)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=float, default=300, help="demo model weight size")
    ap.add_argument("--shards", type=int, default=16, help="safetensors shards (16 or more)")
    ap.add_argument("--rate-mb", type=float, default=8.0, help="hub cap per node, MB/s")
    ap.add_argument("--nodes", default="1,2,3,4", help="node counts to run")
    ap.add_argument("--downloader", default="hf_transfer", choices=["hf_transfer", "hub"])
    ap.add_argument("--skip-hf", action="store_true", help="do not run the `hf download` baseline")
    ap.add_argument("--out", default="bench-results/bench_download.json", help="JSON output")
    ap.add_argument("--workdir", default=None, help="scratch directory (default: a temp dir)")
    ap.add_argument(
        "--serve-hub", nargs=3, metavar=("DIR", "REPO", "RATE_MB"), help=argparse.SUPPRESS
    )
    return ap.parse_args(argv)


def run_hf_download(repo: str, target: Path, env: dict[str, str]) -> float:
    """`hf download REPO --local-dir DIR` (huggingface_hub's CLI) on one node; wall seconds."""
    hf = Path(sys.executable).with_name("hf")
    started = time.monotonic()
    subprocess.run(
        [str(hf), "download", repo, "--local-dir", str(target)],
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return time.monotonic() - started


def serve_hub(source: str, repo: str, rate_mb: float) -> int:
    """Child mode: serve ``source`` as ``repo`` with a per-identity cap until stdin closes.

    The hub runs in its own process so its threads do not share a GIL with the controller.
    """
    from tests.support.hub import LoopbackHub

    hub = LoopbackHub().start()
    served = hub.add_repo(repo, source)
    hub.faults.limit_bandwidth(rate_mb * 1e6)
    total = sum(f.size for f in served.files.values())
    print(json.dumps({"url": hub.url, "files": len(served.files), "bytes": total}), flush=True)
    sys.stdin.read()
    hub.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    """Build the model, serve it capped, run every configuration; exit 1 if a target is missed."""
    args = parse_args(argv)
    if args.serve_hub:
        return serve_hub(*args.serve_hub[:2], float(args.serve_hub[2]))
    from rich.console import Console
    from rich.table import Table

    from cluster.demo_model import build_demo_model

    console = Console()
    counts = [int(x) for x in args.nodes.split(",") if x.strip()]
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-download-"))
    work.mkdir(parents=True, exist_ok=True)
    repo = "bench/demo-llama-large"
    rows: list[dict] = []
    hub_proc: subprocess.Popen | None = None
    try:
        t0 = time.monotonic()
        source = build_demo_model(
            work / "source", seed=1, target_size_mb=args.size_mb, num_shards=args.shards
        )
        built_s = time.monotonic() - t0
        hub_proc = subprocess.Popen(
            [sys.executable, __file__, "--serve-hub", str(source), repo, str(args.rate_mb)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert hub_proc.stdout is not None
        info = json.loads(hub_proc.stdout.readline())
        total = info["bytes"]
        # huggingface_hub reads HF_ENDPOINT at import: set it before anything imports it.
        os.environ.update({"HF_ENDPOINT": info["url"], "HF_HUB_DISABLE_TELEMETRY": "1"})
        from cluster.download.controller import download_model
        from cluster.download.node import FetchSettings
        from cluster.inventory import Node
        from cluster.runner import LocalRunner

        console.print(
            f"model: {info['files']} files, {total / 1e6:.1f} MB (built in {built_s:.1f} s); "
            f"hub cap {args.rate_mb} MB/s per node"
        )

        def clean(target: Path) -> None:
            shutil.rmtree(target, ignore_errors=True)

        if not args.skip_hf:
            target = work / "hf"
            seconds = run_hf_download(repo, target, dict(os.environ))
            rows.append({"tool": "hf download", "nodes": 1, "seconds": seconds, "bytes": total})
            clean(target)
        for n in counts:
            target = work / f"llc-{n}"
            runners = [
                LocalRunner(Node(index=i, host=f"127.0.0.{i + 1}", local=True)) for i in range(n)
            ]
            started = time.monotonic()
            result = download_model(
                repo,
                target=str(target),
                runners=runners,
                settings=FetchSettings(downloader=args.downloader),
            )
            seconds = time.monotonic() - started
            loads = [a.total_bytes for a in result.plan.nodes]
            rows.append(
                {
                    "tool": "llamacluster",
                    "nodes": n,
                    "seconds": seconds,
                    "bytes": result.manifest.total_bytes if result.manifest else 0,
                    "max_node_bytes": max(loads),
                    "min_node_bytes": min(loads),
                }
            )
            clean(target)
    finally:
        if hub_proc is not None:
            if hub_proc.stdin is not None:
                hub_proc.stdin.close()
            try:
                hub_proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                hub_proc.kill()
                hub_proc.wait()
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)

    base = next(
        (r["seconds"] for r in rows if r["tool"].startswith("llamacluster") and r["nodes"] == 1),
        None,
    )
    hf = next((r["seconds"] for r in rows if r["tool"] == "hf download"), None)
    table = Table(
        title=f"download {total / 1e6:.0f} MB, {args.shards} shards, {args.rate_mb} MB/s per "
        f"node, llamacluster with {args.downloader}"
    )
    for col in (
        "tool",
        "nodes",
        "seconds",
        "MB/s",
        "speed-up vs 1 node",
        "vs hf download",
        "target",
        "ok",
    ):
        table.add_column(col, justify="left" if col == "tool" else "right")
    all_ok = True
    for r in rows:
        r["mb_per_s"] = r["bytes"] / r["seconds"] / 1e6
        r["speedup_vs_1"] = (
            base / r["seconds"] if base and r["tool"].startswith("llamacluster") else None
        )
        r["speedup_vs_hf"] = hf / r["seconds"] if hf else None
        r["target"] = TARGET_FACTOR * r["nodes"] if r["tool"].startswith("llamacluster") else None
        r["ok"] = (
            None
            if r["target"] is None or r["speedup_vs_1"] is None
            else r["speedup_vs_1"] >= r["target"]
        )
        all_ok = all_ok and r["ok"] is not False
        table.add_row(
            r["tool"],
            str(r["nodes"]),
            f"{r['seconds']:.1f}",
            f"{r['mb_per_s']:.1f}",
            "-" if r["speedup_vs_1"] is None else f"{r['speedup_vs_1']:.2f}x",
            "-" if r["speedup_vs_hf"] is None else f"{r['speedup_vs_hf']:.2f}x",
            "-" if r["target"] is None else f">= {r['target']:.1f}x",
            "-" if r["ok"] is None else ("yes" if r["ok"] else "NO"),
        )
    console.print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "model_bytes": total, "rows": rows}, indent=2))
    console.print(f"wrote {out}")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
