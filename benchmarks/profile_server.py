"""Where each server's CPU goes per output token: this server vs plain vLLM, process by process.

The same setup as `bench_server.py` (same engine arguments, Ray executor, one loopback Ray node,
each server alone on the machine, in turn). For each concurrency it runs a closed-loop streamed
chat load for ``--seconds`` and reads the CPU time (user + system) that the server's processes
(the loopback Ray cluster's process tree, plain vLLM's) and the load client spent meanwhile
(another cluster on the machine is left out), grouped by role: the API process (our Serve replica; plain
vLLM's API server), vLLM's engine core, the Ray worker holding the model, Serve's controller and
proxy, Ray's own daemons, the load client, the rest. Reported as CPU milliseconds per output
token, side by side, with output tokens/s. With ``--py-spy`` each API process and each engine
core are also sampled (py-spy, non-blocking) during the point and their samples grouped by the
package of the leaf frame (self time) and by the innermost frame of ours, Serve's, vLLM's or the
web stack's (the owner).
Also the seconds each role waited on a run queue for a core (the scheduler's statistics); the
load client runs with its CPU priority raised, as `llamacluster bench` does
(``--client-priority plain`` leaves it, to see what a client that waits for a core does to the
figures). Prints tables, writes JSON (and the raw py-spy stacks in ``<out>-stacks/``).

    flock /tmp/llamacluster-heavy.lock .venv/bin/python benchmarks/profile_server.py \\
        --concurrency 16 64 --seconds 40 --py-spy --out bench-results/profile-server.json
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.bench_netcost import write_results  # noqa: E402
from benchmarks.bench_server import chat_load, loopback_bed, serving  # noqa: E402

# Roles by what a process's command line starts with or contains (first match wins).
ROLES = (
    ("api", ("ray::ServeReplica", "vllm.entrypoints.openai.api_server")),
    ("engine_core", ("VLLM::EngineCore",)),
    ("ray_worker", ("ray::RayWorkerProc",)),
    ("serve_control", ("ray::ServeController", "ray::ProxyActor", "ray::HAProxyManager")),
    ("ray_daemons", ("gcs_server", "raylet", "dashboard", "log_monitor", "runtime_env")),
)
# Packages a py-spy frame's file is put in, by how its path (relative to sys.path) starts.
PACKAGES = (
    ("ours: serve/", ("serve/",)),
    ("ray.serve", ("ray/serve/",)),
    ("ray (core)", ("ray/",)),
    ("vllm entrypoints", ("vllm/entrypoints/",)),
    ("vllm engine client", ("vllm/v1/engine/",)),
    ("vllm (other)", ("vllm/",)),
    ("starlette/fastapi", ("starlette/", "fastapi/")),
    ("uvicorn/h11/httptools", ("uvicorn/", "h11/", "httptools/")),
    ("prometheus", ("prometheus_client/", "prometheus_fastapi_instrumentator/")),
    ("pydantic", ("pydantic/", "pydantic_core/")),
    ("zmq/msgspec", ("zmq/", "msgspec/")),
    ("asyncio/uvloop", ("asyncio/", "uvloop/")),
    ("logging", ("logging/",)),
)
FRAME_FILE = re.compile(r"\((.*?):\d+\)$")
OWNERS = (
    "ours: serve/",
    "ray.serve",
    "vllm entrypoints",
    "vllm engine client",
    "starlette/fastapi",
    "uvicorn/h11/httptools",
    "ray (core)",
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "bench-results" / "profile-server.json")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--seconds", type=float, default=40.0, help="measured seconds per point")
    ap.add_argument("--input-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument(
        "--py-spy", action="store_true", help="sample the API process and engine core with py-spy"
    )
    ap.add_argument(
        "--servers",
        nargs="+",
        choices=("vllm", "llamacluster"),
        default=["vllm", "llamacluster"],
        help="which servers to measure (both for the side-by-side tables)",
    )
    ap.add_argument(
        "--cpu-threads", type=int, default=None, help="as bench_server.py (default: what up sets)"
    )
    ap.add_argument(
        "--client-priority",
        choices=("raised", "plain"),
        default="raised",
        help="the load client's CPU priority while it measures: raised as `llamacluster bench` "
        "does (cluster/bench/priority.py), or left as it is",
    )
    return ap.parse_args(argv)


def role_of(cmdline: str, own_pids: set[int], pid: int) -> str:
    """The role of one process by its command line; the load client by its pid."""
    if pid in own_pids:
        return "load_client"
    for role, marks in ROLES:
        if any(mark in cmdline for mark in marks):
            return role
    return "other"


def cluster_roots(temp_dir: str) -> set[int]:
    """The loopback Ray cluster's own daemons: processes whose command line names its temp
    directory (its workers are their descendants; another cluster on the machine is left out)."""
    import psutil

    roots = set()
    for proc in psutil.process_iter(["cmdline"]):
        if any(temp_dir in part for part in proc.info["cmdline"] or []):
            roots.add(proc.pid)
    return roots


def tree(roots: set[int]) -> set[int]:
    """``roots`` and every descendant of them still running."""
    import psutil

    members = set(roots)
    for pid in roots:
        try:
            members.update(child.pid for child in psutil.Process(pid).children(recursive=True))
        except psutil.NoSuchProcess:
            continue
    return members


def cpu_times(members: set[int]) -> dict[int, tuple[str, float]]:
    """The (command line, user + system CPU seconds) of each running process of ``members``."""
    import psutil

    out = {}
    for pid in members:
        try:
            proc = psutil.Process(pid)
            times = proc.cpu_times()
            out[pid] = (" ".join(proc.cmdline()), times.user + times.system)
        except psutil.NoSuchProcess:
            continue
    return out


def thread_times(members: set[int]) -> dict[tuple[int, int], float]:
    """CPU seconds of every thread of the API, engine core and Ray worker processes."""
    import psutil

    out = {}
    for pid, (cmdline, _) in cpu_times(members).items():
        if role_of(cmdline, set(), pid) not in ("api", "engine_core", "ray_worker"):
            continue
        try:
            for thread in psutil.Process(pid).threads():
                out[(pid, thread.id)] = thread.user_time + thread.system_time
        except psutil.NoSuchProcess:
            continue
    return out


def run_queue_wait(members: set[int]) -> dict[int, float]:
    """Seconds each process of ``members`` (all its threads) has waited on a run queue for a
    core, from the scheduler's statistics (``/proc/PID/task/TID/schedstat``)."""
    out = {}
    for pid in members:
        total = 0
        try:
            for tid in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{tid}/schedstat") as fh:
                    total += int(fh.read().split()[1])
        except (OSError, ValueError, IndexError):
            continue
        out[pid] = total / 1e9
    return out


def busy_threads(before: dict, after: dict, members_now: dict, wall_s: float) -> dict:
    """Per role: the threads that used at least 5 % of a core over the window, their share."""
    roles: dict[str, list[float]] = collections.defaultdict(list)
    for (pid, tid), spent in after.items():
        share = (spent - before.get((pid, tid), 0.0)) / wall_s
        if share >= 0.05:
            roles[role_of(members_now.get(pid, ("", 0.0))[0], set(), pid)].append(round(share, 2))
    return {role: sorted(shares, reverse=True) for role, shares in roles.items()}


def cpu_by_role(before: dict, after: dict, own_pids: set[int]) -> dict[str, float]:
    """CPU seconds per role between two snapshots (processes started meanwhile: all of theirs)."""
    roles: dict[str, float] = collections.defaultdict(float)
    for pid, (cmdline, spent) in after.items():
        start = before.get(pid, (cmdline, 0.0))[1]
        roles[role_of(cmdline, own_pids, pid)] += max(0.0, spent - start)
    return dict(roles)


# The processes py-spy samples, by role.
SAMPLED = ("api", "engine_core")


def role_pid(role: str, members: set[int]) -> int:
    """The one process of ``role`` among ``members`` (the API process: our Serve replica, or
    plain vLLM's API server; the engine core)."""
    marks = dict(ROLES)[role]
    found = [
        pid
        for pid, (cmdline, _) in cpu_times(members).items()
        if any(mark in cmdline for mark in marks)
    ]
    if len(found) != 1:
        raise RuntimeError(f"expected one {role} process ({' or '.join(marks)}), found {found}")
    return found[0]


def package_of(frame: str) -> str:
    """The package a collapsed-stack frame ``func (path:line)`` belongs to, by its path."""
    found = FRAME_FILE.search(frame)
    path = found[1] if found else ""
    for name, starts in PACKAGES:
        if path.startswith(starts):
            return name
    return "other"


def summarize_stacks(path: Path) -> dict:
    """py-spy's raw (collapsed) output: the share of samples per package of the leaf frame
    (``self``), per owner (``owner``: the innermost frame on the stack that is ours, Serve's,
    vLLM's or the web stack's: who asked for the work the leaf does), and the top leaves."""
    self_time: collections.Counter[str] = collections.Counter()
    owner: collections.Counter[str] = collections.Counter()
    leaves: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        frames = stack.split(";")
        packages = [package_of(frame) for frame in frames]
        total += count
        self_time[packages[-1]] += count
        leaves[frames[-1]] += count
        owner[next((p for p in reversed(packages) if p in OWNERS), "other")] += count
    if not total:
        return {"samples": 0, "self": {}, "owner": {}, "top_leaves": {}}
    return {
        "samples": total,
        "self": {k: v / total for k, v in self_time.most_common()},
        "owner": {k: v / total for k, v in owner.most_common()},
        "top_leaves": {k: v / total for k, v in leaves.most_common(25)},
    }


def server_total(per_role: dict[str, float]) -> float:
    """The server's own figure: every role but the load client (py-spy counts there too)."""
    return sum(v for role, v in per_role.items() if role != "load_client")


def one_point(server, base_url, api_key, concurrency, args, model_dir, stacks_dir, roots):
    """A closed-loop load for ``--seconds`` at one concurrency; CPU by role (the processes of
    ``roots``' trees and this one's), tokens/s, stacks."""
    from cluster.bench.priority import NOT_RAISED, raised_priority
    from cluster.bench.runner import run_benchmark

    def config(load: dict):
        return chat_load(
            base_url, api_key, args, model_dir, concurrency=[concurrency], warmup_requests=0, **load
        )

    # Warm up outside the measured window (its CPU would count against no measured token).
    run_benchmark(config({"num_requests": 2 * concurrency}), keep_records=False)
    spies: dict[str, subprocess.Popen] = {}
    stacks = {role: stacks_dir / f"{server}-c{concurrency}-{role}.txt" for role in SAMPLED}
    if args.py_spy:
        stacks_dir.mkdir(parents=True, exist_ok=True)
        py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        for role in SAMPLED:
            spies[role] = subprocess.Popen(
                [
                    py_spy, "record", "--pid", str(role_pid(role, tree(roots))), "--rate", "50",
                    "--nonblocking", "--format", "raw", "--output", str(stacks[role]),
                    "--duration", str(int(args.seconds)),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )  # fmt: skip
    own = {os.getpid(), *(spy.pid for spy in spies.values())}
    members = tree(roots) | own
    before = cpu_times(members)
    threads_before = thread_times(members)
    waits_before = run_queue_wait(members)
    started = time.monotonic()
    priority = raised_priority() if args.client_priority == "raised" else nullcontext("plain")
    try:
        with priority as raised:
            result = run_benchmark(config({"duration_s": args.seconds}), keep_records=False)
        wall = time.monotonic() - started
        waits = run_queue_wait(members)
        after = cpu_times(tree(roots) | own)
        threads = busy_threads(threads_before, thread_times(set(after)), after, wall)
        for spy in spies.values():
            spy.wait(timeout=args.seconds + 120)
    finally:
        for spy in spies.values():
            if spy.poll() is None:
                spy.kill()
                spy.wait()
    roles = cpu_by_role(before, after, own)
    waited: dict[str, float] = collections.defaultdict(float)
    for pid, seconds in waits.items():
        role = role_of(after.get(pid, before.get(pid, ("", 0.0)))[0], own, pid)
        waited[role] += max(0.0, seconds - waits_before.get(pid, 0.0))
    point = result.point("server", f"c={concurrency}")
    tokens = point.output_tokens
    figures = {
        "output_tokens": tokens,
        "output_tokens_per_s": point.output_throughput,
        "failed": point.failed,
        "client_priority": raised or NOT_RAISED,
        "wall_s": wall,
        "cpu_s": roles,
        "run_queue_wait_s": dict(waited),
        "busy_threads_core_share": threads,
        "cpu_ms_per_token": {k: 1000 * v / tokens for k, v in roles.items()} if tokens else {},
        "server_cpu_ms_per_token": server_total(
            {k: 1000 * v / tokens for k, v in roles.items()} if tokens else {}
        ),
    }
    for role in spies:
        if stacks[role].exists():
            figures.setdefault("py_spy", {})[role] = {
                **summarize_stacks(stacks[role]),
                "file": str(stacks[role]),
            }
    return figures


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    runs: dict[str, dict[int, dict]] = {}
    stacks_dir = args.out.with_name(f"{args.out.stem}-stacks")
    with loopback_bed("profile-server-", args.cpu_threads) as bed:
        roots = cluster_roots(bed.cluster.spec.temp_dir)
        for server in args.servers:
            with serving(server, bed, "vllm.log") as (url, key, plain_pid):
                server_roots = roots | ({plain_pid} if plain_pid else set())
                runs[server] = {
                    c: one_point(server, url, key, c, args, bed.model_dir, stacks_dir, server_roots)
                    for c in args.concurrency
                }
            print(f"{server} measured", flush=True)

    roles = [r for r, _ in ROLES] + ["load_client", "other"]
    servers = list(runs)
    lines = []
    for c in args.concurrency:
        per_token = {server: runs[server][c]["cpu_ms_per_token"] for server in servers}
        lines += [
            f"c={c}: CPU ms per output token by process role",
            "| role | " + " | ".join(servers) + " |",
            "| --- |" + " ---: |" * len(servers),
        ]
        for role in roles:
            lines.append(
                f"| {role} | "
                + " | ".join(f"{per_token[s].get(role, 0.0):.3f}" for s in servers)
                + " |"
            )
        lines.append(
            "| server (all but the load client) | "
            + " | ".join(f"{server_total(per_token[s]):.3f}" for s in servers)
            + " |"
        )
        lines.append(
            "| load client: seconds waiting for a core | "
            + " | ".join(
                f"{runs[s][c]['run_queue_wait_s'].get('load_client', 0.0):.1f}" for s in servers
            )
            + " |"
        )
        lines.append(
            "| output tok/s | "
            + " | ".join(f"{runs[s][c]['output_tokens_per_s']:.0f}" for s in servers)
            + " |"
        )
        lines.append("")
        for server in servers:
            busy = runs[server][c]["busy_threads_core_share"]
            lines.append(f"{server} threads using ≥ 5 % of a core (share of a core): {busy}")
            for role, spy in runs[server][c].get("py_spy", {}).items():
                for kind, title in (("self", "self time by package"), ("owner", "by owner")):
                    shares = ", ".join(
                        f"{k} {100 * v:.0f} %" for k, v in spy[kind].items() if v >= 0.02
                    )
                    lines.append(f"{server} {role}, {title}: {shares}")
        lines.append("")
    print("\n".join(lines))
    write_results(args.out, {"args": {k: str(v) for k, v in vars(args).items()}, "runs": runs})
    if args.py_spy:
        print(f"py-spy stacks: {stacks_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
