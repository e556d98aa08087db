"""Self-healing under injected faults: detection, recovery and what clients saw, fault by fault.

Brings up a real two-node cluster with `llamacluster up` over SSH, each node a network
namespace of this host with its own `eth0`, sshd and /dev/shm (tests/support/netns.py; needs
root), one CPU worker slot per node and the demo model with tp=2 (or pp=2), so the engine's
group spans both nodes. A steady streamed load (the bench client's `send_request`, concurrency
4, a 503 answered by waiting its Retry-After) runs the whole time while each fault is injected:

- ``worker_sigkill``: SIGKILL one vLLM worker process (``ray::RayWorkerProc``) on the worker node;
- ``worker_sigstop``: SIGSTOP it for the stall timeout + 5 s, then SIGCONT;
- ``iface_down``: the worker's `eth0` down for 30 s (inside its namespace), then up;
- ``ray_kill_supervised``: every Ray process of the worker node killed, its supervisor kept;
- ``ray_kill_then_up``: the same with the supervisor killed too, then `llamacluster up`;
- ``replica_kill``: the Serve replica process on the head killed;
- ``node_lost_replan`` (with ``--on-node-loss replan``): the worker node's supervisor and Ray
  killed and the node kept away for ``--node-away`` seconds: the server serves with the
  planner's smaller layout on the head alone; then `llamacluster up` brings the node back and
  the server moves back to the full layout (``moved_back_s``: from that `up` to the first
  completion of the full engine).

Processes are found by the cluster's own state only: the Ray session id `up` recorded for each
node (every Ray process of a node is in that session). Per fault: seconds to detection (the
first `/health` that is not ok, or the first failed request, after the fault), seconds to the
first successful completion of a request sent after detection, requests failed (by kind), hung
requests (no token and no end for longer than the stall timeout + 5 s; must be 0) and streams in
flight that ended with an SSE error event. Prints a table, writes JSON, brings the cluster down.

    sudo flock /tmp/llamacluster-heavy.lock .venv/bin/python benchmarks/bench_faults.py \
        --stall-timeout 10 --out bench-results/faults.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.bench_netcost import cli, write_results  # noqa: E402 (after the path above)

if TYPE_CHECKING:
    from tests.support.netns import NetnsHosts

NAME = "faults"
FAULTS = (
    "worker_sigkill",
    "worker_sigstop",
    "iface_down",
    "ray_kill_supervised",
    "ray_kill_then_up",
    "replica_kill",
    "node_lost_replan",
)
IFACE_DOWN_S = 30.0


def _layout(text: str) -> tuple[int, int]:
    """``TxP`` with T × P = 2 (one worker on each of the two nodes)."""
    if text not in ("2x1", "1x2"):
        raise argparse.ArgumentTypeError(f"{text!r}: use 2x1 (tp=2) or 1x2 (pp=2)")
    tp, pp = text.split("x")
    return int(tp), int(pp)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "bench-results" / "faults.json")
    ap.add_argument("--faults", default=",".join(FAULTS), help="comma separated, in this order")
    ap.add_argument(
        "--layout", type=_layout, default="2x1", help="tp x pp across the two nodes: 2x1 or 1x2"
    )
    ap.add_argument("--stall-timeout", type=float, default=10.0, help="the server's stall limit")
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--output-len", type=int, default=32, help="tokens per request")
    ap.add_argument("--recover-timeout", type=float, default=600.0, help="per fault, seconds")
    ap.add_argument("--model-dir", type=Path, default=None, help="demo model (built if absent)")
    ap.add_argument(
        "--on-node-loss", choices=("wait", "replan"), default="wait", help="`up`'s setting"
    )
    ap.add_argument(
        "--node-away",
        type=float,
        default=60.0,
        help="node_lost_replan: seconds the node stays away",
    )
    return ap.parse_args(argv)


# --- the cluster and its processes (by the recorded state only) --------------------------------


@dataclass
class FaultCluster:
    """A running two-node cluster: its namespace hosts, controller home and `up` arguments."""

    hosts: NetnsHosts
    home: Path
    env: dict[str, str]
    up_args: list[str]
    name: str = NAME

    def state(self) -> dict:
        """The controller's recorded state of this cluster."""
        return json.loads((self.home / "clusters" / self.name / "state.json").read_text())

    def session(self, node: str) -> int:
        """The Ray session id `up` recorded for ``node`` (``head``, ``worker1``)."""
        return int(self.state()["ray"]["nodes"][node]["session"])

    def up(self) -> str:
        """`llamacluster up` with the arguments of the first bring-up."""
        return cli("up", *self.up_args, env=self.env)


def start_cluster(
    workdir: Path,
    model_dir: Path,
    *,
    tp: int,
    pp: int,
    stall_timeout: float,
    name: str = NAME,
    skip: tuple[str, ...] = ("cache", "monitor"),
    hosts: NetnsHosts | None = None,
    on_node_loss: str = "wait",
) -> FaultCluster:
    """`up` on two namespace nodes (``hosts``, or two new ones): supervised Ray, the server
    with tp × pp."""
    from tests.support.netns import start_netns_hosts

    home = workdir / "home"
    env = {**os.environ, "LLAMACLUSTER_HOME": str(home), "VLLM_CPU_KVCACHE_SPACE": "1"}
    hosts = hosts or start_netns_hosts(2)
    inventory = workdir / "ips.txt"
    inventory.write_text(hosts.inventory_text())
    up_args = [
        "--ips", str(inventory), "--name", name, "--ssh-key", str(hosts.client_key),
        "--known-hosts", str(workdir / "known_hosts"), "--model", str(model_dir),
        "--shared-dir", str(workdir / "shared"), "--env", sys.prefix,
        *[x for s in skip for x in ("--skip", s)],
        "--cpu-slots", "1", "--cpu-kvcache-gb", "1", "--max-model-len", "512",
        "--tp", str(tp), "--pp", str(pp), "--stall-timeout", f"{stall_timeout:g}",
        "--ray-port", "0", "--dashboard-port", "0", "--api-port", "0", "--monitor-port", "0",
        "--on-node-loss", on_node_loss,
    ]  # fmt: skip
    cluster = FaultCluster(hosts=hosts, home=home, env=env, up_args=up_args, name=name)
    try:
        cluster.up()
    except BaseException:
        stop_cluster(cluster)
        raise
    return cluster


def stop_cluster(cluster: FaultCluster) -> None:
    """`down` (when a state exists), then the namespace nodes with whatever is left in them."""
    try:
        if (cluster.home / "clusters" / cluster.name / "state.json").exists():
            with contextlib.suppress(Exception):
                cli("down", "--name", cluster.name, env=cluster.env, timeout=300)
    finally:
        cluster.hosts.stop()


def session_pids(sid: int, needle: str = "") -> list[int]:
    """Pids of session ``sid`` (not its leader) whose command line contains ``needle``."""
    from cluster.supervisor import session_members

    return sorted(p for p, _, cmd in session_members(sid) if p != sid and needle in cmd)


def kill_pids(pids: list[int], sig: int = signal.SIGKILL) -> None:
    """Signal exactly these pids (gone ones are skipped)."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def vllm_worker_pid(cluster: FaultCluster, node: str = "worker1") -> int:
    """The vLLM Ray worker process on ``node`` (in that node's recorded Ray session)."""
    pids = [p for p in session_pids(cluster.session(node)) if _cmd(p).startswith("ray::RayWorker")]
    if not pids:
        raise RuntimeError(f"no vLLM worker process in {node}'s Ray session")
    return pids[0]


def _cmd(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


# --- steady load and /health, recorded with one clock --------------------------------------------


@dataclass
class Sample:
    """One finished request: its start and end (perf_counter), outcome and longest silence."""

    started: float
    finished: float
    ok: bool
    kind: str | None
    tokens: int
    max_gap_s: float
    detail: str | None = None
    ttft_s: float | None = None
    status: int | None = None


@dataclass
class Load:
    """Closed-loop streamed load plus a /health poller, on an event loop of its own thread."""

    base_url: str
    api_key: str
    model: str
    concurrency: int = 4
    output_len: int = 32
    request_timeout_s: float = 120.0
    samples: list[Sample] = field(default_factory=list)
    health: list[tuple[float, str]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        """Start sending (returns at once)."""
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop sending and wait for the requests in flight (bounded by their timeout)."""
        self._stop.set()
        if self._thread:
            self._thread.join(self.request_timeout_s + 10)

    def successes_since(self, t: float) -> list[Sample]:
        """Successful requests sent after ``t``."""
        return [s for s in list(self.samples) if s.ok and s.started > t]

    async def _main(self) -> None:
        import aiohttp

        connector = aiohttp.TCPConnector(limit=self.concurrency + 4)
        async with aiohttp.ClientSession(connector=connector) as client:
            await asyncio.gather(
                self._poll_health(client), *(self._loop(client, i) for i in range(self.concurrency))
            )

    async def _loop(self, client, index: int) -> None:
        from cluster.bench.client import RequestRecord, send_request
        from cluster.bench.config import Endpoint
        from cluster.bench.workload import BenchRequest

        endpoint = Endpoint(name="faults", base_url=self.base_url, api_key=self.api_key)
        n = 0
        while not self._stop.is_set():
            n += 1
            record = RequestRecord(index=n, endpoint="faults", point=str(index), round=0)
            request = BenchRequest(
                max_tokens=self.output_len, prompt=f"Tell a story, part {index}-{n}."
            )
            await send_request(
                client, endpoint, request, record, api="chat", model=self.model,
                ignore_eos=True, timeout_s=self.request_timeout_s,
            )  # fmt: skip
            self.samples.append(_sample(record))
            if not record.ok:
                await asyncio.sleep(1.0)  # the server's Retry-After (1 s), or a refused connect

    async def _poll_health(self, client) -> None:
        import aiohttp

        url = self.base_url.removesuffix("/v1") + "/health"
        while not self._stop.is_set():
            try:
                async with client.get(url, timeout=aiohttp.ClientTimeout(total=2)) as r:
                    status = (await r.json(content_type=None)).get("status", f"http_{r.status}")
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
                status = f"unreachable ({type(exc).__name__})"
            self.health.append((time.perf_counter(), str(status)))
            await asyncio.sleep(0.25)


def _sample(record) -> Sample:
    """A request record as a sample; the longest silence counts from the start, between token
    chunks, and from the last chunk to the end (an error or the finish)."""
    marks = [0.0, *record.token_chunk_times, record.finished_at - record.started_at]
    gap = max(b - a for a, b in itertools.pairwise(marks))
    return Sample(
        started=record.started_at,
        finished=record.finished_at,
        ok=record.ok,
        kind=record.error_kind,
        tokens=len(record.token_chunk_times),
        max_gap_s=gap,
        detail=record.error_detail,
        ttft_s=record.ttft_s,
        status=record.status,
    )


def load_for(cluster: FaultCluster, *, concurrency: int, output_len: int) -> Load:
    """A load against this cluster's endpoint with its own API key and served name."""
    return load_from_state(cluster.state(), concurrency=concurrency, output_len=output_len)


def load_from_state(state: dict, *, concurrency: int, output_len: int) -> Load:
    """A load against the endpoint a cluster's recorded state names (its key, served name)."""
    key = Path(state["secrets"]["api_key_file"]).read_text().split()[0]
    return Load(
        base_url=state["server"]["endpoint"] + "/v1",
        api_key=key,
        model=state["server"]["served_name"],
        concurrency=concurrency,
        output_len=output_len,
    )


# --- one fault --------------------------------------------------------------------------------


def wait_steady(load: Load, *, timeout_s: float, successes: int = 4) -> None:
    """Until ``successes`` requests sent from now on have succeeded and /health says ok."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout_s:
        healthy = load.health and load.health[-1][1] == "ok"
        if healthy and len(load.successes_since(t0)) >= successes:
            return
        time.sleep(0.5)
    raise RuntimeError(f"the server did not serve steadily within {timeout_s:.0f}s")


def measure_fault(
    load: Load,
    inject: Callable[[], None],
    *,
    stall_timeout: float,
    recover_timeout: float,
    settle_s: float = 5.0,
) -> dict:
    """Inject a fault under ``load`` (already steady) and measure what followed.

    ``inject`` may block (a fault that lasts, a repair it runs); recovery is waited for after
    it returned, and is the first success of a request sent after the fault was detected."""
    t_fault, wall_fault = time.perf_counter(), time.time()
    inject()
    injected_s = time.perf_counter() - t_fault
    t_detect = t_recover = None
    deadline = time.perf_counter() + recover_timeout
    while time.perf_counter() < deadline:
        t_detect = _detected_at(load, t_fault)
        oks = load.successes_since(t_detect if t_detect is not None else t_fault)
        if oks and (t_detect is not None or time.perf_counter() - t_fault > 30):
            t_recover = min(s.finished for s in oks)
            break
        time.sleep(0.5)
    time.sleep(settle_s)  # requests in flight at recovery finish and are counted
    end = time.perf_counter()
    window = [s for s in list(load.samples) if s.finished >= t_fault and s.started <= end]
    failed = [s for s in window if not s.ok]
    hung_limit = stall_timeout + 5.0
    return {
        "detect_s": None if t_detect is None else round(t_detect - t_fault, 1),
        "recover_s": None if t_recover is None else round(t_recover - t_fault, 1),
        "inject_s": round(injected_s, 1),
        "requests": len(window),
        "failed": len(failed),
        "failed_by_kind": dict(Counter(str(s.kind) for s in failed)),
        "hung": sum(1 for s in window if s.max_gap_s > hung_limit),
        "max_gap_s": round(max((s.max_gap_s for s in window), default=0.0), 1),
        "stream_error_events": sum(1 for s in failed if s.kind == "stream_error"),
        "streams_cut_without_event": sum(
            1 for s in failed if s.kind in ("disconnect", "timeout") and s.tokens
        ),
        "health_seen": sorted({h for t, h in list(load.health) if t >= t_fault}),
        "answering_again_s": _answering_again(load, t_fault),
        "recovered": t_recover is not None,
        "server_restarts": server_restarts(load, since=wall_fault),
    }


def server_restarts(load: Load, *, since: float) -> list[dict]:
    """The server's own restart history (its /health) from wall time ``since`` on."""
    import datetime as dt
    import urllib.error
    import urllib.request

    url = load.base_url.removesuffix("/v1") + "/health"
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {load.api_key}"})
    try:
        with urllib.request.urlopen(request, timeout=5) as r:
            history = json.loads(r.read()).get("restarts") or []
    except urllib.error.HTTPError as exc:  # 503 while restarting: the body is still /health's
        history = json.loads(exc.read() or b"{}").get("restarts") or []
    except (OSError, ValueError) as exc:
        return [{"error": f"/health unreadable: {exc}"}]
    return [h for h in history if dt.datetime.fromisoformat(h["time"]).timestamp() >= since - 1.0]


def _answering_again(load: Load, t_fault: float) -> float | None:
    """Seconds from the fault until the endpoint answered /health again after it refused
    connections (a replaced replica listening again); None when it never refused."""
    refused = False
    for t, h in list(load.health):
        if t <= t_fault:
            continue
        if h.startswith("unreachable"):
            refused = True
        elif refused:
            return round(t - t_fault, 1)
    return None


def controller_port_quarantine(cluster: FaultCluster) -> str | None:
    """RAY_SERVE_PORT_QUARANTINE_S as the Serve controller process on the head has it."""
    for pid in session_pids(cluster.session("head"), "ServeController"):
        with contextlib.suppress(OSError):
            for item in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                if item.startswith(b"RAY_SERVE_PORT_QUARANTINE_S="):
                    return item.split(b"=", 1)[1].decode()
            return "unset"
    return None


def _detected_at(load: Load, t_fault: float) -> float | None:
    """First sign after the fault: a /health that is not ok, or a request ending in an error."""
    marks = [t for t, h in list(load.health) if t > t_fault and h != "ok"]
    marks += [s.finished for s in list(load.samples) if s.finished > t_fault and not s.ok]
    return min(marks) if marks else None


def injector(fault: str, cluster: FaultCluster, *, stall_timeout: float) -> Callable[[], None]:
    """The action of ``fault`` on ``cluster`` (processes picked from its recorded sessions)."""

    def worker_sigkill() -> None:
        kill_pids([vllm_worker_pid(cluster)])

    def worker_sigstop() -> None:
        pid = vllm_worker_pid(cluster)
        kill_pids([pid], signal.SIGSTOP)
        time.sleep(stall_timeout + 5.0)
        kill_pids([pid], signal.SIGCONT)

    def iface_down() -> None:
        hosts = cluster.hosts
        hosts.run_in(1, "ip", "link", "set", "eth0", "down")
        try:
            time.sleep(IFACE_DOWN_S)
        finally:
            hosts.run_in(1, "ip", "link", "set", "eth0", "up")

    def ray_kill_supervised() -> None:
        kill_pids(session_pids(cluster.session("worker1")))

    def node_lost_replan() -> None:
        sid = cluster.session("worker1")
        kill_pids([sid])  # the supervisor leads the session: the node stays away
        time.sleep(0.5)
        kill_pids(session_pids(sid))

    def ray_kill_then_up() -> None:
        sid = cluster.session("worker1")
        kill_pids([sid])  # the supervisor leads the session
        time.sleep(0.5)
        kill_pids(session_pids(sid))
        cluster.up()

    def replica_kill() -> None:
        pids = session_pids(cluster.session("head"), "ServeReplica")
        if not pids:
            raise RuntimeError("no Serve replica process in the head's Ray session")
        kill_pids(pids)

    actions = {f.__name__: f for f in (worker_sigkill, worker_sigstop, iface_down,
                                       ray_kill_supervised, ray_kill_then_up, replica_kill,
                                       node_lost_replan)}  # fmt: skip
    return actions[fault]


def move_back(
    cluster: FaultCluster,
    load: Load,
    *,
    node_away_s: float,
    recover_timeout: float,
    stall_timeout: float,
) -> dict:
    """After ``node_lost_replan`` served degraded: keep the node away a while, bring it back with
    `up`, and time the server's move back to the full layout (its ``node_returned`` restart)."""
    time.sleep(node_away_s)
    degraded = [r for r in server_restarts(load, since=0) if r.get("layout")]
    t_up, wall_up = time.perf_counter(), time.time()
    cluster.up()
    up_s = time.perf_counter() - t_up
    deadline = t_up + recover_timeout
    moved = None
    back: list[dict] = []
    while time.perf_counter() < deadline:
        back = [
            r
            for r in server_restarts(load, since=wall_up)
            if r.get("cause") == "node_returned" and r.get("outcome") == "recovered"
        ]
        if back:
            moved = time.perf_counter() - t_up
            break
        time.sleep(1.0)
    window = [s for s in list(load.samples) if s.finished >= t_up]
    return {
        "degraded_layout": degraded[-1]["layout"] if degraded else None,
        "repair_up_s": round(up_s, 1),
        "moved_back_s": None if moved is None else round(moved, 1),
        # The move back itself: from the server seeing the node back to the full engine's
        # first good probe (a restart of its own, inside the `up` above).
        "move_back_down_s": back[0].get("down_s") if back else None,
        "failed_during_move_back": sum(1 for s in window if not s.ok),
        "hung_during_move_back": sum(1 for s in window if s.max_gap_s > stall_timeout + 5.0),
    }


def run_faults(
    cluster: FaultCluster,
    faults: list[str],
    *,
    stall_timeout: float,
    concurrency: int,
    output_len: int,
    recover_timeout: float,
    node_away_s: float = 60.0,
) -> list[dict]:
    """One row per fault, injected in order under one steady load."""
    load = load_for(cluster, concurrency=concurrency, output_len=output_len)
    load.start()
    rows = []
    try:
        for fault in faults:
            try:
                wait_steady(load, timeout_s=recover_timeout)
            except RuntimeError as exc:
                rows.append({"fault": fault, "error": f"not steady before the fault: {exc}"})
                continue
            print(f"{time.strftime('%H:%M:%S')} injecting {fault}", flush=True)
            try:
                row = measure_fault(
                    load,
                    injector(fault, cluster, stall_timeout=stall_timeout),
                    stall_timeout=stall_timeout,
                    recover_timeout=recover_timeout,
                )
            except RuntimeError as exc:
                row = {"error": str(exc)[-2000:]}
            if fault == "replica_kill":
                row["controller_port_quarantine_s"] = controller_port_quarantine(cluster)
            if fault == "node_lost_replan" and "error" not in row:
                row.update(move_back(cluster, load, node_away_s=node_away_s,
                                     recover_timeout=recover_timeout,
                                     stall_timeout=stall_timeout))  # fmt: skip
            rows.append({"fault": fault, **row})
            print(json.dumps(rows[-1]), flush=True)
    finally:
        load.stop()
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from rich.console import Console
    from rich.table import Table

    from cluster.demo_model import build_demo_model

    faults = [f for f in args.faults.split(",") if f]
    unknown = sorted(set(faults) - set(FAULTS))
    if unknown:
        print(
            f"unknown fault(s) {', '.join(unknown)}: --faults takes a comma-separated list of "
            f"{', '.join(FAULTS)}",
            file=sys.stderr,
        )
        return 2
    tp, pp = args.layout
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="faults-") as tmp:
        model_dir = args.model_dir
        if model_dir is None or not (model_dir / "config.json").exists():
            model_dir = build_demo_model(model_dir or Path(tmp) / "demo-tiny-llama")
        cluster = start_cluster(
            Path(tmp),
            model_dir,
            tp=tp,
            pp=pp,
            stall_timeout=args.stall_timeout,
            on_node_loss=args.on_node_loss,
        )
        up_s = time.monotonic() - started
        print(f"up: {up_s:.0f} s", flush=True)
        try:
            rows = run_faults(
                cluster,
                faults,
                stall_timeout=args.stall_timeout,
                concurrency=args.concurrency,
                output_len=args.output_len,
                recover_timeout=args.recover_timeout,
                node_away_s=args.node_away,
            )
        finally:
            stop_cluster(cluster)
    table = Table(title=f"faults under load (tp={tp} × pp={pp}, c={args.concurrency}, "
                        f"stall timeout {args.stall_timeout:g} s)")  # fmt: skip
    cols = ["fault", "detect s", "first ok s", "failed", "hung", "SSE error", "cut", "requests"]
    for col in cols:
        table.add_column(col, justify="right")
    for r in rows:
        if "error" in r:
            table.add_row(r["fault"], "error: " + r["error"].splitlines()[0][:80], *[""] * 6)
            continue
        table.add_row(
            r["fault"],
            "–" if r["detect_s"] is None else f"{r['detect_s']:.1f}",
            "not recovered" if r["recover_s"] is None else f"{r['recover_s']:.1f}",
            str(r["failed"]),
            str(r["hung"]),
            str(r["stream_error_events"]),
            str(r["streams_cut_without_event"]),
            str(r["requests"]),
        )
    Console(width=160).print(table)
    out = {"args": {k: str(v) for k, v in vars(args).items()}, "up_s": round(up_s, 1), "rows": rows}
    write_results(args.out, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
