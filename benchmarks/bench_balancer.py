"""What the load balancer costs and how it spreads: HAProxy vs one replica's own port, and the split.

`llamacluster up --local --replicas 2` serves the demo model with two replicas behind HAProxy.
Routing overhead: one replica's own direct-ingress port against the HAProxy endpoint with that
same replica as HAProxy's only server (the other one set to maintenance through HAProxy's admin
socket for this part), side by side in alternating rounds of the bench client's compare mode:
c=1 TTFT p50 (streamed) and c=16 output tokens/s. Distribution: both replicas in HAProxy again,
uniform load through the endpoint, each replica's share from its own
`vllm:request_success_total` (each replica's readiness probe counts there too: a few requests,
reported as measured). Two replicas against one: c=16 output tokens/s through the endpoint with
both replicas in HAProxy and with the second one in maintenance, alternating rounds, and the
CPU seconds each part of the stack (engine workers, engine cores, replicas, HAProxy, the load
generator, the rest) spent per 1000 output tokens in each. Prints a table, writes JSON, brings
the cluster down. Targets: TTFT p50 at most +2 ms, tokens/s at least 0.97x, each replica 40-60 %.

    .venv/bin/python benchmarks/bench_balancer.py --out bench-results/balancer.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.bench_netcost import cli, report  # noqa: E402

TTFT_TARGET_MS = 2.0
TOKS_TARGET_RATIO = 0.97
SHARE_RANGE = (0.40, 0.60)
BACKEND_LINE = re.compile(r"^backend (http-\S+)$", re.M)
SERVER_LINE = re.compile(r"^\s*server (SERVE_REPLICA_\S+) (\S+):(\d+) ", re.M)
SUCCESS = re.compile(r"^vllm:request_success_total\{[^}]*\} ([0-9.e+]+)$", re.M)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "bench-results" / "balancer.json")
    ap.add_argument("--rounds", type=int, default=4, help="alternating rounds per point")
    ap.add_argument("--c1-requests", type=int, default=40, help="c=1 requests per round")
    ap.add_argument("--c16-requests", type=int, default=96, help="c=16 requests per round")
    ap.add_argument("--split-requests", type=int, default=200, help="distribution requests")
    ap.add_argument("--split-concurrency", type=int, default=8)
    ap.add_argument("--input-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=64)
    return ap.parse_args(argv)


def haproxy_table(app_name: str, api_port: int) -> tuple[Path, str, dict[str, int]]:
    """HAProxy's admin socket, the app's backend and each replica's own port, from the config
    Ray wrote for this endpoint."""
    from serve.balancer import private_dir_path

    for cfg in private_dir_path(app_name, api_port).glob("*/haproxy.cfg"):
        text = cfg.read_text()
        servers = {m[0]: int(m[2]) for m in SERVER_LINE.findall(text)}
        backends = BACKEND_LINE.findall(text)
        if servers and backends:
            return cfg.parent / "admin.sock", backends[0], servers
    raise RuntimeError(f"no HAProxy config with replicas for port {api_port}")


def haproxy_command(sock_path: Path, command: str) -> str:
    """One command on HAProxy's admin socket; its answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(sock_path))
        sock.sendall(command.encode() + b"\n")
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks).decode()


def successes(port: int, key: str) -> float:
    """vllm:request_success_total summed, as the replica on ``port`` itself reports it."""
    import httpx

    text = httpx.get(
        f"http://127.0.0.1:{port}/metrics", headers={"Authorization": f"Bearer {key}"}, timeout=30
    ).text
    return sum(float(v) for v in SUCCESS.findall(text))


def wait_all_ready(url: str, timeout_s: float = 900.0) -> None:
    """Until every replica's engine answers (``/ready?all=1``)."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/ready?all=1", timeout=30).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(2)
    raise RuntimeError(f"{url}: not every replica ready after {timeout_s:g} s")


def overhead(direct: str, balanced: str, key: str, model_dir: Path, args) -> dict[str, dict]:
    """c=1 and c=16 through both paths, interleaved rounds (the bench client's compare mode)."""
    from cluster.bench.config import BenchConfig, Endpoint, LoadConfig, WorkloadConfig
    from cluster.bench.runner import run_benchmark

    figures: dict[str, dict] = {}
    for concurrency, count in ((1, args.c1_requests), (16, args.c16_requests)):
        config = BenchConfig(
            endpoints=[
                Endpoint(name="direct", base_url=f"{direct}/v1", api_key=key),
                Endpoint(name="haproxy", base_url=f"{balanced}/v1", api_key=key),
            ],
            workload=WorkloadConfig(
                api="chat",
                input_len=args.input_len,
                output_len=args.output_len,
                tokenizer=str(model_dir),
            ),
            load=LoadConfig(concurrency=[concurrency], num_requests=count, rounds=args.rounds),
        )
        result = run_benchmark(config, keep_records=False)
        for name in ("direct", "haproxy"):
            p = result.point(name, f"c={concurrency}")
            figures.setdefault(name, {})[f"c{concurrency}"] = {
                "ttft_p50_ms": p.ttft_ms.p50,
                "output_tok_s": p.output_throughput,
                "completed": p.completed,
                "failed": p.failed,
            }
    return figures


def distribution(url: str, key: str, ports: dict[str, int], model_dir: Path, args) -> dict:
    """Uniform load through the endpoint; what each replica says it completed."""
    from cluster.bench.config import BenchConfig, Endpoint, LoadConfig, WorkloadConfig
    from cluster.bench.runner import run_benchmark

    before = {name: successes(port, key) for name, port in ports.items()}
    config = BenchConfig(
        endpoints=[Endpoint(name="haproxy", base_url=f"{url}/v1", api_key=key)],
        workload=WorkloadConfig(
            api="chat", input_len=args.input_len, output_len=16, tokenizer=str(model_dir)
        ),
        load=LoadConfig(
            concurrency=[args.split_concurrency],
            num_requests=args.split_requests,
            warmup_requests=0,
        ),
    )
    point = run_benchmark(config, keep_records=False).point(
        "haproxy", f"c={args.split_concurrency}"
    )
    served = {name: successes(port, key) - before[name] for name, port in ports.items()}
    total = sum(served.values()) or 1.0
    return {
        "requests": point.requests,
        "completed": point.completed,
        "failed": point.failed,
        "served": served,
        "share": {name: n / total for name, n in served.items()},
    }


# Which part of the serving stack a process is, by its command line (first match wins).
ROLES = (
    ("engine worker", "RayWorkerProc"),
    ("engine core", "EngineCore"),
    ("replica (gateway, Serve)", "ServeReplica"),
    ("haproxy", "haproxy"),
)


def cpu_seconds_by_role() -> dict[str, float]:
    """CPU seconds (user + system) each role's processes have used so far: the serving
    stack's by ROLES, this process (the load generator), and the rest of the machine."""
    import psutil

    totals: dict[str, float] = {}
    for proc in psutil.process_iter(["pid", "cmdline", "name", "cpu_times"]):
        times = proc.info["cpu_times"]
        if times is None:
            continue
        text = " ".join(proc.info["cmdline"] or [proc.info["name"] or ""])
        if proc.info["pid"] == os.getpid():
            role = "load generator (bench client)"
        else:
            role = next((r for r, mark in ROLES if mark in text), "rest (Ray, system)")
        totals[role] = totals.get(role, 0.0) + times.user + times.system
    return totals


def scaling(url: str, key: str, toggle, model_dir: Path, args) -> dict[str, dict]:
    """c=16 through the endpoint with one replica in HAProxy and with both, alternating rounds
    (``toggle(True)`` parks the second replica, ``toggle(False)`` brings it back); with the CPU
    seconds each part of the stack spent per 1000 output tokens, to show where the time goes."""
    from cluster.bench.config import BenchConfig, Endpoint, LoadConfig, WorkloadConfig
    from cluster.bench.runner import run_benchmark

    runs: dict[str, list[dict]] = {"one": [], "two": []}
    spent: dict[str, dict[str, float]] = {"one": {}, "two": {}}
    tokens = {"one": 0.0, "two": 0.0}
    for r in range(args.rounds):
        order = ("one", "two") if r % 2 == 0 else ("two", "one")
        for arm in order:
            toggle(arm == "one")
            before = cpu_seconds_by_role()
            config = BenchConfig(
                endpoints=[Endpoint(name=arm, base_url=f"{url}/v1", api_key=key)],
                workload=WorkloadConfig(
                    api="chat",
                    input_len=args.input_len,
                    output_len=args.output_len,
                    tokenizer=str(model_dir),
                ),
                load=LoadConfig(concurrency=[16], num_requests=args.c16_requests),
            )
            p = run_benchmark(config, keep_records=False).point(arm, "c=16")
            after = cpu_seconds_by_role()
            for role, seconds in after.items():
                spent[arm][role] = spent[arm].get(role, 0.0) + seconds - before.get(role, 0.0)
            tokens[arm] += p.output_tokens
            runs[arm].append(
                {"output_tok_s": p.output_throughput, "completed": p.completed, "failed": p.failed}
            )
    toggle(False)
    out: dict[str, dict] = {}
    for arm, rows in runs.items():
        rates = sorted(row["output_tok_s"] for row in rows)
        out[arm] = {
            "output_tok_s": rates[len(rates) // 2],
            "rounds": rows,
            "failed": sum(row["failed"] for row in rows),
            "cpu_s_per_1k_tokens": {
                role: 1000 * seconds / tokens[arm] if tokens[arm] else 0.0
                for role, seconds in sorted(spent[arm].items())
            },
        }
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from cluster.demo_model import build_demo_model

    work = Path(tempfile.mkdtemp(prefix="bench-balancer-"))
    home = work / "home"
    env = {**os.environ, "LLAMACLUSTER_HOME": str(home), "COLUMNS": "200"}
    model_dir = build_demo_model(work / "demo-tiny-llama")
    up = ["--local", "--model", str(model_dir), "--tp", "1", "--pp", "1", "--replicas", "2"]
    up += ["--cpu-slots", "2", "--cpu-kvcache-gb", "1", "--skip", "monitor"]
    cli("up", *up, env=env)
    try:
        state = json.loads((home / "clusters" / "local" / "state.json").read_text())
        url = state["server"]["endpoint"]
        key = Path(state["secrets"]["api_key_file"]).read_text().strip()
        app_name = state["server"].get("app_name", "llamacluster")
        wait_all_ready(url)
        admin, backend, ports = haproxy_table(app_name, int(url.rsplit(":", 1)[1]))
        if len(ports) != 2:
            raise RuntimeError(f"expected 2 replicas in HAProxy's table, found {ports}")
        kept, parked = sorted(ports)
        # HAProxy's only server for this part: the replica measured directly.
        haproxy_command(admin, f"set server {backend}/{parked} state maint")
        parked_before = successes(ports[parked], key)
        try:
            figures = overhead(f"http://127.0.0.1:{ports[kept]}", url, key, model_dir, args)
        finally:
            haproxy_command(admin, f"set server {backend}/{parked} state ready")
        # Only its own readiness probes (one per 10 s) may count there meanwhile.
        parked_served = successes(ports[parked], key) - parked_before

        def park(on: bool) -> None:
            state = "maint" if on else "ready"
            haproxy_command(admin, f"set server {backend}/{parked} state {state}")
            time.sleep(1)

        scale = scaling(url, key, park, model_dir, args)
        split = distribution(url, key, ports, model_dir, args)
    finally:
        cli("down", "--name", "local", env=env)

    d1, h1 = figures["direct"]["c1"], figures["haproxy"]["c1"]
    d16, h16 = figures["direct"]["c16"], figures["haproxy"]["c16"]
    ttft_extra = h1["ttft_p50_ms"] - d1["ttft_p50_ms"]
    toks_ratio = h16["output_tok_s"] / d16["output_tok_s"] if d16["output_tok_s"] else 0.0
    scale_ratio = (
        scale["two"]["output_tok_s"] / scale["one"]["output_tok_s"]
        if scale["one"]["output_tok_s"]
        else 0.0
    )
    shares = sorted(split["share"].values())
    verdict = {
        "ttft_p50_extra_ms_ok": ttft_extra <= TTFT_TARGET_MS,
        "tok_s_ratio_ok": toks_ratio >= TOKS_TARGET_RATIO,
        "share_ok": bool(shares) and SHARE_RANGE[0] <= shares[0] <= shares[-1] <= SHARE_RANGE[1],
        "all_succeeded": split["failed"] == 0
        and all(f[c]["failed"] == 0 for f in figures.values() for c in f)
        and all(arm["failed"] == 0 for arm in scale.values()),
    }
    table = [
        "| path | c=1 TTFT p50 ms | c=16 output tok/s | failed |",
        "| --- | --- | --- | --- |",
        f"| replica's own port | {d1['ttft_p50_ms']:.1f} | {d16['output_tok_s']:.0f} | "
        f"{d1['failed'] + d16['failed']} |",
        f"| HAProxy endpoint (same replica) | {h1['ttft_p50_ms']:.1f} | "
        f"{h16['output_tok_s']:.0f} | {h1['failed'] + h16['failed']} |",
        f"| HAProxy vs own port | {ttft_extra:+.1f} ms | {toks_ratio:.2f}x | |",
        f"(the replica in maintenance meanwhile: {parked_served:.0f} completions, its probes)",
        "",
        "| replicas in HAProxy | c=16 output tok/s (median) | failed |",
        "| --- | --- | --- |",
        f"| one | {scale['one']['output_tok_s']:.0f} | {scale['one']['failed']} |",
        f"| two | {scale['two']['output_tok_s']:.0f} | {scale['two']['failed']} |",
        f"| two vs one | {scale_ratio:.2f}x | |",
        "",
        "| CPU seconds per 1000 output tokens | one replica | two replicas |",
        "| --- | --- | --- |",
        *(
            f"| {role} | {scale['one']['cpu_s_per_1k_tokens'].get(role, 0.0):.2f} | "
            f"{scale['two']['cpu_s_per_1k_tokens'].get(role, 0.0):.2f} |"
            for role in sorted(
                set(scale["one"]["cpu_s_per_1k_tokens"]) | set(scale["two"]["cpu_s_per_1k_tokens"])
            )
        ),
        "",
        "| replica | served (own metrics) | share |",
        "| --- | --- | --- |",
    ]
    for i, name in enumerate(sorted(split["served"]), 1):
        table.append(
            f"| replica {i} | {split['served'][name]:.0f} | {100 * split['share'][name]:.0f} % |"
        )
    table.append(
        f"| endpoint | {split['completed']} of {split['requests']} completed | "
        f"{split['failed']} failed |"
    )
    report(
        args,
        table,
        verdict,
        overhead=figures,
        ttft_p50_extra_ms=ttft_extra,
        output_tok_s_ratio=toks_ratio,
        parked_replica_served=parked_served,
        scaling=scale,
        two_vs_one_ratio=scale_ratio,
        distribution=split,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
