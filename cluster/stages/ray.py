"""Ray: head and workers through cluster.ray_nodes (token auth, own session per node), and back."""

from __future__ import annotations

import shlex
from dataclasses import asdict, replace
from itertools import groupby

from cluster.errors import RemoteError
from cluster.ray_nodes import (
    STARTUP_TIMEOUT,
    RayClusterSpec,
    RayHeadPorts,
    RayNodeHandle,
    RayNodePorts,
    RayNodeSpec,
    allocate_ports,
    nodes_call,
    ports_call,
    ray_start_display,
    session_alive_command,
    start_ray_node,
    start_ray_node_command,
    stop_ray_node,
    wait_for_nodes,
)
from cluster.runner import Runner
from cluster.stages.base import ClusterContext, Stage, StageCheck, StageOutcome, Teardown, UpContext
from cluster.stages.env import env_dir_for, env_python
from cluster.stages.serve import default_cpu_kvcache_gb
from cluster.state import (
    TOKEN_FILE,
    ClusterState,
    NodeState,
    Ports,
    RayNode,
    cluster_key,
    remote_cluster_dir,
)

# Exit 0 while a process of the node's Ray session is alive.
# The stdout/stderr files of the server replica and the vLLM workers: Ray writes each worker's
# actor name in the first lines of its files. The replica's files hold the engine's own output,
# with the workers of other nodes forwarded there.
_ENGINE_FILES = (
    "$(grep -l -m1 -E '^:actor_name:(ServeReplica|RayWorkerProc)' "
    "worker-*.out worker-*.err 2>/dev/null)"
)
_IN_LOGS = "cd {temp}/session_latest/logs 2>/dev/null "
# The Serve controller's and proxy's logs, plus the engine files.
LOGS_TEMPLATE = (
    _IN_LOGS + '|| {{ echo "no Ray logs under {temp} yet" >&2; exit 1; }}; '
    "set -- serve/*.log " + _ENGINE_FILES + "; "
    'tail -n {lines} {follow} "$@"'
)
# The last exception line in the engine files, less vLLM's "see root cause above" wrapper:
# what to say when the engine does not start.
ROOT_CAUSE_TEMPLATE = (
    _IN_LOGS + "|| exit 0; cat /dev/null " + _ENGINE_FILES + " "
    "| grep -o -E '[A-Z][A-Za-z0-9_.]*(Error|Exception): .*' "
    "| grep -v -e 'Engine core initialization failed' | tail -n 1 | cut -c1-300"
)


def ray_temp_dir(cluster_name: str) -> str:
    """A short Ray temp dir for this cluster, the same path on every node.

    Keyed by the controller's state directory, not just the name: two people (or test runs)
    with different LLAMACLUSTER_HOMEs may both call their cluster ``local`` on one host. Ray's
    socket paths must stay under 107 bytes, so the key is hashed.
    """
    return f"/tmp/lc-{cluster_key(cluster_name)}"


def ray_alive_command(session_id: int, temp_dir: str) -> str:
    """Exit 0 while the node's Ray session runs: a process of this user in that session names
    this cluster's temp dir (a session id reused after a reboot does not count)."""
    return session_alive_command(session_id, temp_dir)


def root_cause_command(temp_dir: str) -> str:
    """Print the last exception line the engine left in the head's logs (nothing if none)."""
    return ROOT_CAUSE_TEMPLATE.format(temp=shlex.quote(temp_dir))


def serve_logs_command(temp_dir: str, *, follow: bool, lines: int) -> str:
    """Tail (or follow) the Serve controller, replica and engine logs on the head."""
    return LOGS_TEMPLATE.format(
        lines=int(lines), follow="-F" if follow else "", temp=shlex.quote(temp_dir)
    )


def node_env(rec: NodeState, cpu_kvcache_gb: int | None) -> dict[str, str]:
    """The per-node variables Ray's daemons carry to every worker (interface, address, KV size)."""
    env: dict[str, str] = {}
    if rec.private_ip:
        env["VLLM_HOST_IP"] = rec.private_ip
    if rec.interface:
        env["GLOO_SOCKET_IFNAME"] = rec.interface
        env["NCCL_SOCKET_IFNAME"] = rec.interface
    if rec.device_kind == "cpu":
        env["VLLM_CPU_KVCACHE_SPACE"] = str(cpu_kvcache_gb or default_cpu_kvcache_gb())
    return env


def node_token_path(state: ClusterState, node_name: str) -> str:
    """Where the Ray token lives on node ``node_name``: this cluster's private dir under that
    node's own home (as preflight recorded it; homes differ between nodes)."""
    return f"{remote_cluster_dir(state, node_name)}/{TOKEN_FILE}"


def token_path(ctx_or_state: ClusterContext | ClusterState) -> str:
    """Where the Ray token lives on the head (drivers there join with it)."""
    state = ctx_or_state.state if isinstance(ctx_or_state, ClusterContext) else ctx_or_state
    return node_token_path(state, state.head.name if state.head else "head")


def cluster_spec(ctx: UpContext) -> RayClusterSpec:
    """The RayClusterSpec of this cluster from the recorded nodes and ports (for a dry run
    before preflight chose the ports: the ports asked for)."""
    p = ctx.state.ports or Ports(
        ray_gcs=ctx.config.ray_port,
        dashboard=ctx.config.dashboard_port,
        api=ctx.config.api_port,
        monitor=None if "monitor" in ctx.config.skip else ctx.config.monitor_port,
    )
    nodes = []
    for n in ctx.cluster:
        rec = ctx.state.node(n.name) or NodeState(
            name=n.name, label=n.label, host=n.host, private_ip=n.private_ip or n.host, devices=1
        )
        nodes.append(
            RayNodeSpec(
                ip=str(rec.private_ip),
                num_gpus=rec.devices,
                ports=RayNodePorts(**ctx.state.ray.node(n.name).ports),
                token_path=node_token_path(ctx.state, n.name),
            )
        )
    head = ctx.state.nodes[0] if ctx.state.nodes else None
    python = env_python(env_dir_for(ctx))
    return RayClusterSpec(
        name=ctx.state.name,
        temp_dir=ray_temp_dir(ctx.state.name),
        token_path=token_path(ctx),
        nodes=tuple(nodes),
        head_ports=RayHeadPorts(
            gcs=p.ray_gcs, dashboard=p.dashboard, client_server=p.ray_client or 10001
        ),
        env=node_env(head, ctx.config.cpu_kvcache_gb) if head else {},
        ray_bin=python.rsplit("/", 1)[0] + "/ray",
        python=python,
        head_env=head_env(p),
    )


def head_env(ports: Ports) -> dict[str, str]:
    """What only the head's Ray daemons get: the address of the monitor's Prometheus (the
    dashboard and Serve read it at start; the port is chosen by preflight, so Ray can be told
    before the monitor stage starts Prometheus)."""
    if ports.monitor is None:
        return {}
    return {"RAY_PROMETHEUS_HOST": f"http://127.0.0.1:{ports.monitor}"}


def node_spec(ctx: UpContext, rec: NodeState) -> RayClusterSpec:
    """The cluster's spec with the Ray daemon env of node ``rec`` (its interface and address)."""
    return replace(cluster_spec(ctx), env=node_env(rec, ctx.config.cpu_kvcache_gb))


def start_node(
    ctx: UpContext, runner: Runner, spec: RayClusterSpec, index: int, *, retries: int = 1
) -> RayNodeHandle:
    """Start node ``index``: with ``-v`` its ``ray start`` line (env, then command; the token
    only as a file path) is shown first and Ray's output as it comes."""
    ctx.reporter.command(runner.label, ray_start_display(spec, index))
    return start_ray_node(
        runner, spec, index, timeout=180, retries=retries, on_line=ctx.reporter.on_line
    )


#: Tries of one node's `ray start`, each on freshly picked ports (see RayCluster._start).
START_TRIES = 3


def stop_ray(ctx: ClusterContext, runners: list[Runner]) -> list[str]:
    """Stop this cluster's Ray on ``runners``' nodes (workers first) by the recorded session
    ids; the stopped nodes' records are dropped. Returns the labels of the nodes stopped."""
    stopped = []
    for runner in reversed(runners):
        rec = ctx.state.ray.nodes.get(runner.node.name)
        if rec is None or rec.session is None:
            continue
        if not rec.temp_dir:
            ctx.reporter.warn(
                f"{runner.label}: no Ray temp dir on record; session {rec.session} left alone"
            )
            continue
        res = stop_ray_node(runner, rec.session, temp_dir=rec.temp_dir)
        if res.ok:
            ctx.reporter.node(runner.label, f"ray stopped (session {rec.session})")
            rec.session = None
            stopped.append(runner.label)
        else:
            ctx.reporter.node(runner.label, f"could not stop ray: {res.tail(1)}", ok=False)
    ctx.state.save()
    return stopped


def ray_alive(ctx: ClusterContext) -> dict[str, bool]:
    """Per node name: does this cluster's Ray session run there?"""
    alive: dict[str, bool] = {}
    for runner in ctx.runners:
        rec = ctx.state.ray.nodes.get(runner.node.name)
        alive[runner.node.name] = bool(
            rec is not None
            and rec.session is not None
            and rec.temp_dir is not None
            and runner.run(ray_alive_command(rec.session, rec.temp_dir), timeout=30).ok
        )
    return alive


class RayCluster(Stage):
    """Ray head and workers with token auth; wait until every node and its devices are there."""

    name = "ray"
    title = "Ray cluster (token auth, dashboard on 127.0.0.1, direct ingress)"
    sections = ("ray",)

    def check(self, ctx: ClusterContext) -> StageCheck:
        """This cluster's Ray session runs on every node."""
        if not ctx.state.ray.nodes:
            return StageCheck(None, "Ray never started")
        alive = ray_alive(ctx)
        per_node = {
            n.label: (
                f"ray running (session {ctx.state.ray.node(n.name).session})"
                if alive[n.name]
                else "ray stopped"
            )
            for n in ctx.cluster
        }
        stopped = [n.label for n in ctx.cluster if not alive[n.name]]
        if stopped:
            return StageCheck(False, f"Ray stopped on {', '.join(stopped)}", per_node)
        return StageCheck(True, f"Ray running on {len(alive)} node(s)", per_node)

    def teardown(self, ctx: ClusterContext, how: Teardown) -> str | None:
        """Stop exactly this cluster's Ray processes on every node (by their sessions)."""
        stopped = stop_ray(ctx, ctx.runners)
        return f"Ray stopped on {', '.join(stopped)}" if stopped else None

    def plan(self, ctx: UpContext) -> dict[str, list[str]]:
        plan = {}
        for i, n in enumerate(ctx.cluster):
            spec = node_spec(
                ctx,
                ctx.state.node(n.name) or NodeState(name=n.name, label=n.label, host=n.host),
            )
            plan[n.label] = [
                ports_call(spec.python, with_head=False).display(
                    "nodes that share a host: one call for all"
                ),
                f"copy <controller token> -> {spec.node_token_path(i)} (0600)",
                "# " + ray_start_display(spec, i),
                *start_ray_node_command(spec, i).strip().splitlines(),
            ]
        spec = cluster_spec(ctx)
        expected = {n.ip: float(n.num_gpus) for n in spec.nodes}
        plan[ctx.head.label].append(
            nodes_call(spec.python, spec.address, expected, timeout=300).display(
                "until every node and its device slots are registered"
            )
        )
        return plan

    def run(self, ctx: UpContext) -> StageOutcome:
        recs = [ctx.node_state(n) for n in ctx.cluster]
        ray = ctx.state.ray
        for rec in recs:
            found = ray.nodes.get(rec.name)
            if found is not None and not found.same_machine(rec):
                # Another host behind this role, or the node rebooted: the recorded session id
                # may now belong to anything. Forget it (never signal it).
                ctx.reporter.info(f"{rec.label}: Ray record from another host or boot dropped")
                ray.nodes[rec.name] = RayNode()
        alive_by_name = ray_alive(ctx)
        alive = [alive_by_name[n.name] for n in ctx.cluster]
        ray.head_token_path = token_path(ctx)  # the head's: drivers run there
        if all(alive):
            self._wait(ctx, timeout=60)
            return StageOutcome("unchanged", f"{len(recs)} node(s) already in this cluster's Ray")
        if not alive[0] and any(alive):
            # Workers of a dead head cannot rejoin: restart them all.
            stop_ray(ctx, [r for r, a in zip(ctx.runners, alive, strict=True) if a])
            alive = [False] * len(alive)
        self._allocate_ports(ctx, [i for i, a in enumerate(alive) if not a])
        for runner, rec in zip(ctx.runners, recs, strict=True):
            node = ray.nodes.setdefault(rec.name, RayNode())
            node.token_path = node_token_path(ctx.state, rec.name)  # under this node's home
            runner.copy_to(
                str(ctx.state.secrets.ray_token), node.token_path, mode=0o600, timeout=60
            )
        started = []
        for i, (runner, rec) in enumerate(zip(ctx.runners, recs, strict=True)):  # head first
            if alive[i]:
                continue
            spec, handle = self._start(ctx, runner, rec, i)
            node = ray.nodes[rec.name]
            node.session, node.temp_dir = handle.session_id, spec.temp_dir
            node.boot_id, node.host, node.machine_id = rec.boot_id, rec.host, rec.machine_id
            ctx.state.save()  # recorded at once: `down` can stop it even if a later step fails
            started.append(runner.node.name)
            ctx.reporter.node(
                runner.label,
                f"ray started (session {handle.session_id}, {rec.devices} {rec.device_kind} slot(s))",
            )
        self._wait(ctx, timeout=300)  # a loaded host takes minutes to register a node
        return StageOutcome("done", f"started on {', '.join(started)}; every node registered")

    def _start(
        self, ctx: UpContext, runner: Runner, rec: NodeState, index: int
    ) -> tuple[RayClusterSpec, RayNodeHandle]:
        """Start node ``index``; when Ray says the node "timed out during startup" (its raylet
        never registered: most often one of the ports picked for it was taken by something
        else between picking and starting), pick fresh ports for that node and start again,
        up to START_TRIES times. Retrying on the same ports would fail the same way."""
        for attempt in range(1, START_TRIES + 1):
            spec = node_spec(ctx, rec)
            try:
                return spec, start_node(ctx, runner, spec, index, retries=0)
            except RemoteError as exc:
                if STARTUP_TIMEOUT not in exc.message or attempt == START_TRIES:
                    raise
                ctx.reporter.warn(
                    f"{runner.label}: Ray timed out registering (try {attempt} of "
                    f"{START_TRIES}); starting it again on fresh ports"
                )
                self._allocate_ports(ctx, [index])
        raise AssertionError("unreachable")

    @staticmethod
    def _allocate_ports(ctx: UpContext, indexes: list[int]) -> None:
        """Free Ray ports for the nodes to start, picked per host in one go (loopback test
        nodes share a host, so their ports must not collide)."""
        recs = ctx.state.nodes
        key = lambda i: recs[i].machine_id or recs[i].host  # noqa: E731
        for _, group in groupby(sorted(indexes, key=key), key=key):
            members = list(group)
            runner = ctx.runners[members[0]]
            _, ports = allocate_ports(
                runner,
                nodes=len(members),
                with_head=False,
                python=env_python(str(ctx.state.env.dir)),  # the same path on every node
            )
            for i, p in zip(members, ports, strict=True):
                ctx.state.ray.nodes.setdefault(recs[i].name, RayNode()).ports = asdict(p)

    @staticmethod
    def _wait(ctx: UpContext, *, timeout: float) -> None:
        spec = cluster_spec(ctx)
        wait_for_nodes(
            spec.address,
            [n.ip for n in spec.nodes],
            {n.ip: n.num_gpus for n in spec.nodes},
            token_path=spec.token_path,
            timeout=timeout,
            runner=ctx.head_runner,
            python=spec.python,
        )
        for rec in ctx.state.nodes:
            ctx.reporter.node(rec.label, f"registered with {rec.devices} device slot(s)")
