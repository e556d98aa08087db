"""Ray: head and workers through cluster.ray_nodes (token auth, own session per node), and back."""

from __future__ import annotations

import base64
import shlex
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, replace
from itertools import groupby

from cluster import supervisor as sup
from cluster.errors import NotReadyError, RemoteError
from cluster.ray_nodes import (
    RETRIED,
    RayClusterSpec,
    RayHeadPorts,
    RayNodeHandle,
    RayNodePorts,
    RayNodeSpec,
    allocate_ports,
    auth_probe_command,
    nodes_call,
    ports_call,
    ray_node_env,
    ray_start_argv,
    ray_start_display,
    raylet_alive_command,
    start_ray_node,
    start_ray_node_command,
    start_supervised_command,
    stop_ray_node,
    temp_dir_guard,
    unauthenticated_access,
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
    """Exit 0 while the node's Ray runs: a raylet of this user in that session names this
    cluster's temp dir (a session id reused after a reboot does not count, nor a supervisor
    whose Ray is gone)."""
    return raylet_alive_command(session_id, temp_dir)


def record_alive_command(rec: RayNode, sudo: str = "") -> str | None:
    """``ray_alive_command`` for a node's record: a systemd unit's Ray is found by the unit's
    main pid (it changes with every restart), any other by the recorded session."""
    if rec.temp_dir is None:
        return None
    if rec.supervisor == "systemd" and rec.unit:
        show = (
            f"{sudo + ' ' if sudo else ''}systemctl show -p MainPID --value {shlex.quote(rec.unit)}"
        )
        return raylet_alive_command(show, rec.temp_dir)
    if rec.session is None:
        return None
    return ray_alive_command(rec.session, rec.temp_dir)


# Exit 0 when systemd manages this machine and can be driven (PID 1 is systemd, its runtime
# directory exists, systemctl is there); print the user Ray should run as.
SYSTEMD_USABLE = (
    'test -d /run/systemd/system && [ "$(cat /proc/1/comm 2>/dev/null)" = systemd ] '
    "&& command -v systemctl >/dev/null && id -un"
)


def systemd_commands(unit: str, sudo: str = "") -> dict[str, list[str]]:
    """The systemctl lines per step of a node's unit: ``start`` (after writing it), ``stop``
    (`down`), ``purge`` (after removing it)."""
    s = f"{sudo} " if sudo else ""
    u = shlex.quote(unit)
    return {
        "start": [
            f"{s}systemctl daemon-reload",
            f"{s}systemctl enable {u}",
            f"{s}systemctl restart {u}",
        ],
        "stop": [f"{s}systemctl disable --now {u}"],
        "purge": [f"{s}systemctl daemon-reload"],
    }


def node_unit(ctx: UpContext, spec: RayClusterSpec, index: int, user: str) -> tuple[str, str]:
    """Name and text of node ``index``'s systemd unit: its ``ray start`` and environment."""
    rec = ctx.state.nodes[index]
    name = sup.unit_name(ctx.state.name, cluster_key(ctx.state.name), rec.name)
    text = sup.unit_text(
        cluster=ctx.state.name,
        node=rec.name,
        user=user,
        argv=ray_start_argv(spec, index),
        env=ray_node_env(spec, index),
        temp_dir=spec.temp_dir,
    )
    return name, text


def unit_file_command(
    command: str, root: str, name: str, *, text: str | None = None, python: str, sudo: str
) -> str:
    """``install-unit``/``remove-unit`` of cluster/supervisor.py on a node (source on stdin)."""
    args = ["--root", root, "--name", name]
    if text is not None:
        args += ["--text-b64", base64.b64encode(text.encode()).decode()]
    return sup.script_command(command, *args, python=python, sudo=sudo)


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
        ray_cli=ray_cli(python),
        python=python,
        head_env=head_env(p),
    )


def ray_cli(python: str) -> tuple[str, ...]:
    """How the nodes run ``ray start``: Ray's CLI through cluster/ray_start.py, which tells the
    raylet its dashboard agent's port (else a slow agent start aborts the raylet)."""
    return (python, "-m", "cluster.ray_start")


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
    ctx: UpContext,
    runner: Runner,
    spec: RayClusterSpec,
    index: int,
    *,
    retries: int = 1,
    supervise: bool = False,
) -> RayNodeHandle:
    """Start node ``index`` (under its supervisor process with ``supervise``): with ``-v`` its
    ``ray start`` line (env, then command; the token only as a file path) is shown first and
    Ray's output as it comes."""
    ctx.reporter.command(runner.label, ray_start_display(spec, index))
    return start_ray_node(
        runner,
        spec,
        index,
        timeout=180,
        retries=retries,
        on_line=ctx.reporter.on_line,
        supervise=supervise,
    )


#: Tries of one node's `ray start`, each on freshly picked ports (see RayCluster._start).
START_TRIES = 3


def _sudo(ctx: ClusterContext, name: str) -> str:
    rec = ctx.state.node(name)
    return rec.sudo if rec is not None and rec.sudo else ""


def _system_python(ctx: ClusterContext, name: str) -> str:
    rec = ctx.state.node(name)
    return rec.python if rec is not None and rec.python else "python3"


#: After the server has drained (``down``), Ray's processes hold nothing worth waiting for, and
#: some of them (gcs_server, the autoscaler monitor, actors) ignore TERM for longer than 10 s.
DOWN_GRACE_S = 2.0


def stop_ray(ctx: ClusterContext, runners: list[Runner], *, grace_s: float = 10.0) -> list[str]:
    """Stop this cluster's Ray on ``runners``' nodes (the workers together, then the head): a
    systemd unit is stopped and disabled, a supervisor process stopped by its pid, then the Ray
    session by its id (TERM, ``grace_s``, KILL); the stopped nodes' records are dropped. Returns
    the labels of the nodes stopped."""
    head = ctx.state.head.name if ctx.state.head else None
    workers = [r for r in runners if r.node.name != head]
    with ThreadPoolExecutor(max_workers=max(1, min(16, len(workers)))) as pool:
        stopped = [
            label for label in pool.map(lambda r: _stop_ray_on(ctx, r, grace_s), workers) if label
        ]
    stopped += [
        label for r in runners if r.node.name == head and (label := _stop_ray_on(ctx, r, grace_s))
    ]
    ctx.state.save()
    return stopped


def _stop_ray_on(ctx: ClusterContext, runner: Runner, grace_s: float) -> str | None:
    """Stop this cluster's Ray on one node; its label when stopped."""
    rec = ctx.state.ray.nodes.get(runner.node.name)
    if rec is None:
        return None
    if rec.supervisor == "systemd" and rec.unit and ctx.state.access.system_root == "/":
        for line in systemd_commands(rec.unit, _sudo(ctx, runner.node.name))["stop"]:
            res = runner.run(line, timeout=120)
            if not res.ok:
                ctx.reporter.node(runner.label, f"{line}: {res.tail(1)}", ok=False)
        ctx.reporter.node(runner.label, f"unit {rec.unit} stopped and disabled")
    if rec.session is None:
        return None
    if not rec.temp_dir:
        ctx.reporter.warn(
            f"{runner.label}: no Ray temp dir on record; session {rec.session} left alone"
        )
        return None
    res = stop_ray_node(
        runner,
        rec.session,
        temp_dir=rec.temp_dir,
        supervised=rec.supervisor == "process",
        grace_s=grace_s,
    )
    if not res.ok:
        ctx.reporter.node(runner.label, f"could not stop ray: {res.tail(1)}", ok=False)
        return None
    ctx.reporter.node(runner.label, f"ray stopped (session {rec.session})")
    rec.session = None
    return runner.label


def remove_units(ctx: ClusterContext) -> list[str]:
    """Remove the systemd unit written for each node (exactly that file, under the recorded
    system root); returns the labels of the nodes whose unit went."""
    root = ctx.state.access.system_root
    removed = []
    for runner in ctx.runners:
        rec = ctx.state.ray.nodes.get(runner.node.name)
        if rec is None or not rec.unit:
            continue
        name = runner.node.name
        sudo = _sudo(ctx, name) if root == "/" else ""
        command = unit_file_command(
            "remove-unit", root, rec.unit, python=_system_python(ctx, name), sudo=sudo
        )
        res = runner.run(command, stdin=sup.script_source(), timeout=60)
        if not res.ok:
            ctx.reporter.node(runner.label, f"could not remove {rec.unit}: {res.tail(1)}", ok=False)
            continue
        if root == "/":
            for line in systemd_commands(rec.unit, sudo)["purge"]:
                runner.run(line, timeout=60)
        ctx.reporter.node(runner.label, f"unit {rec.unit} removed")
        rec.unit = None
        removed.append(runner.label)
    ctx.state.save()
    return removed


def ray_alive(ctx: ClusterContext) -> dict[str, bool]:
    """Per node name: does this cluster's Ray (its raylet) run there?"""
    alive: dict[str, bool] = {}
    for runner in ctx.runners:
        rec = ctx.state.ray.nodes.get(runner.node.name)
        command = (
            record_alive_command(rec, _sudo(ctx, runner.node.name)) if rec is not None else None
        )
        alive[runner.node.name] = bool(command and runner.run(command, timeout=30).ok)
    return alive


def registered(ctx: ClusterContext, *, timeout: float = 10) -> str | None:
    """What the head's GCS says is missing (a node not alive there, missing device slots), or
    None when every node is registered."""
    state = ctx.state
    head = state.head
    if head is None or state.ports is None or not state.env.dir or not state.ray.head_token_path:
        return "no Ray on record"
    try:
        wait_for_nodes(
            f"{head.private_ip}:{state.ports.ray_gcs}",
            [str(n.private_ip) for n in state.nodes],
            {str(n.private_ip): n.devices for n in state.nodes},
            token_path=state.ray.head_token_path,
            timeout=timeout,
            runner=ctx.head_runner,
            python=env_python(state.env.dir),
        )
    except NotReadyError as exc:
        return exc.message
    return None


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

        def running(name: str) -> str:
            rec = ctx.state.ray.node(name)
            how = {"systemd": f", unit {rec.unit}", "process": ", supervised"}.get(
                str(rec.supervisor), ""
            )
            return f"ray running (session {rec.session}{how})"

        per_node = {
            n.label: running(n.name) if alive[n.name] else "ray stopped" for n in ctx.cluster
        }
        stopped = [n.label for n in ctx.cluster if not alive[n.name]]
        if stopped:
            return StageCheck(False, f"Ray stopped on {', '.join(stopped)}", per_node)
        missing = registered(ctx)
        if missing:
            return StageCheck(False, missing, per_node)
        return StageCheck(
            True, f"Ray running on {len(alive)} node(s), all registered with the head", per_node
        )

    def teardown(self, ctx: ClusterContext, how: Teardown) -> str | None:
        """Stop exactly this cluster's Ray processes on every node (units, supervisors, then
        sessions); ``--purge`` also removes the systemd units written for the nodes."""
        stopped = stop_ray(ctx, ctx.runners, grace_s=DOWN_GRACE_S)
        removed = remove_units(ctx) if how.purge else []
        done = [f"Ray stopped on {', '.join(stopped)}"] if stopped else []
        done += [f"units removed on {', '.join(removed)}"] if removed else []
        return "; ".join(done) or None

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
                *self._plan_start(ctx, spec, i),
            ]
        spec = cluster_spec(ctx)
        expected = {n.ip: float(n.num_gpus) for n in spec.nodes}
        plan[ctx.head.label].append(
            nodes_call(spec.python, spec.address, expected, timeout=300).display(
                "until every node and its device slots are registered"
            )
        )
        return plan

    @staticmethod
    def _plan_start(ctx: UpContext, spec: RayClusterSpec, index: int) -> list[str]:
        """``--dry-run`` lines of one node's start: plain, or (``--supervise``) a unit where
        systemd runs, else the supervisor process."""
        if not ctx.config.supervise:
            return start_ray_node_command(spec, index).strip().splitlines()
        rec = ctx.state.nodes[index] if index < len(ctx.state.nodes) else None
        name = rec.name if rec else ctx.cluster.nodes[index].name
        unit = sup.unit_name(ctx.state.name, cluster_key(ctx.state.name), name)
        root = str(ctx.config.system_root)
        python = rec.python if rec and rec.python else "python3"
        sudo = "" if ctx.config.test_root else (rec.sudo if rec and rec.sudo else "")
        write = unit_file_command("install-unit", root, unit, python=python, sudo=sudo)
        lines = [
            f"{SYSTEMD_USABLE}   # systemd here? then:",
            f"{write} --text-b64 <the unit: ray start ... --block, Restart=on-failure>",
        ]
        if not ctx.config.test_root:
            lines += systemd_commands(unit, sudo)["start"]
        lines.append("# else (no systemd, or files only under a test root): the supervisor process")
        return lines + start_supervised_command(spec, index).strip().splitlines()

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
            ctx.reporter.info("the head's Ray is gone: every node's Ray starts again")
            stop_ray(ctx, [r for r, a in zip(ctx.runners, alive, strict=True) if a])
            alive = [False] * len(alive)
        elif any(alive):
            lost = [r.label for r, a in zip(ctx.runners, alive, strict=True) if not a]
            kept = [r.label for r, a in zip(ctx.runners, alive, strict=True) if a]
            ctx.reporter.info(
                f"repairing {', '.join(lost)}: its Ray is gone; "
                f"{', '.join(kept)} keep their running Ray untouched"
            )
        # What is left of a lost node's Ray (a supervisor between restarts, a daemon that
        # outlived its raylet) goes first, by its recorded ids, so two never run side by side.
        stop_ray(ctx, [r for r, a in zip(ctx.runners, alive, strict=True) if not a])
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
            mode = self._supervisor(ctx, runner, rec)
            node = ray.nodes[rec.name]
            if mode is not None and mode[0] == "systemd":
                spec = node_spec(ctx, rec)
                node.temp_dir, node.supervisor = spec.temp_dir, "systemd"
                node.unit = self._write_unit(ctx, runner, spec, i, mode[1])
                node.session = self._start_unit(ctx, runner, node)
            else:
                if mode is not None and ctx.config.test_root:
                    # Files only under a test root: the unit is written, Ray runs under the
                    # supervisor process (no systemctl runs there).
                    node.unit = self._write_unit(ctx, runner, node_spec(ctx, rec), i, mode[1])
                spec, handle = self._start(ctx, runner, rec, i, supervise=mode is not None)
                node.session, node.temp_dir = handle.session_id, spec.temp_dir
                node.supervisor = "process" if mode is not None else None
            node.boot_id, node.host, node.machine_id = rec.boot_id, rec.host, rec.machine_id
            ctx.state.save()  # recorded at once: `down` can stop it even if a later step fails
            started.append(runner.node.name)
            how = {"systemd": f", unit {node.unit}", "process": ", supervised"}.get(
                str(node.supervisor), ""
            )
            ctx.reporter.node(
                runner.label,
                f"ray started (session {node.session}{how}, "
                f"{rec.devices} {rec.device_kind} slot(s))",
            )
        self._wait(ctx, timeout=300)  # a loaded host takes minutes to register a node
        return StageOutcome("done", f"started on {', '.join(started)}; every node registered")

    @staticmethod
    def _supervisor(ctx: UpContext, runner: Runner, rec: NodeState) -> tuple[str, str] | None:
        """How this node's Ray is kept running: ``("systemd", user)`` where systemd runs and
        can be driven (root or ``sudo -n``), ``("process", user)`` elsewhere (and always under a
        test root or with ``--local``); None with ``--no-supervise``."""
        if not ctx.config.supervise:
            return None
        found = runner.run(SYSTEMD_USABLE, timeout=30)
        user = found.stdout.strip().splitlines()[-1] if found.ok and found.stdout.strip() else ""
        # A test root runs no service command; `--local` installs no system unit on this machine.
        if not user or ctx.config.test_root or ctx.state.local:
            return ("process", user or rec.user or "")
        if rec.sudo is None:
            ctx.reporter.warn(
                f"{runner.label}: systemd runs but neither root nor `sudo -n`: Ray is kept "
                "running by a supervisor process instead of a unit (not started at boot)"
            )
            return ("process", user)
        return ("systemd", user)

    @staticmethod
    def _write_unit(
        ctx: UpContext, runner: Runner, spec: RayClusterSpec, index: int, user: str
    ) -> str:
        """Write node ``index``'s unit under the system root (exactly one file of its own; the
        same text again changes nothing); returns its name."""
        rec = ctx.state.nodes[index]
        name, text = node_unit(ctx, spec, index, user or "root")
        root = str(ctx.config.system_root)
        command = unit_file_command(
            "install-unit",
            root,
            name,
            text=text,
            python=_system_python(ctx, rec.name),
            sudo="" if ctx.config.test_root else _sudo(ctx, rec.name),
        )
        ctx.reporter.command(runner.label, command.split(" --text-b64 ")[0] + " --text-b64 ...")
        res = runner.run(command, stdin=sup.script_source(), timeout=60)
        res.check(what=f"writing the Ray unit {name} on {runner.label}")
        return name

    @staticmethod
    def _start_unit(ctx: UpContext, runner: Runner, node: RayNode) -> int:
        """Enable and (re)start the node's unit, wait for its raylet; return the unit's main
        pid (the session id of its Ray, until systemd restarts it)."""
        assert node.unit and node.temp_dir
        # The unit's own `mkdir -p` would take whatever sits at the path: check it first.
        runner.run(temp_dir_guard(node.temp_dir), timeout=30).check(
            what=f"the Ray temp dir on {runner.label}"
        )
        sudo = _sudo(ctx, runner.node.name)
        for line in systemd_commands(node.unit, sudo)["start"]:
            ctx.reporter.command(runner.label, line)
            runner.run(line, timeout=120).check(what=f"{line} on {runner.label}")
        alive = record_alive_command(node, sudo)
        assert alive is not None
        show = f"{sudo + ' ' if sudo else ''}systemctl show -p MainPID --value {shlex.quote(node.unit)}"
        wait = f"for _ in $(seq 360); do ( {alive} ) && exec {show}; sleep 0.5; done; exit 1"
        res = runner.run(wait, timeout=240)
        if not res.ok or not res.stdout.strip().isdigit():
            journal = runner.run(
                f"{sudo + ' ' if sudo else ''}journalctl -u {shlex.quote(node.unit)} -n 8 --no-pager",
                timeout=30,
            )
            raise RemoteError(
                f"Ray of unit {node.unit} did not start on {runner.label}: {journal.tail(8)}",
                hint=f"see `journalctl -u {node.unit}` on that node",
            )
        return int(res.stdout.strip().splitlines()[-1])

    def _start(
        self, ctx: UpContext, runner: Runner, rec: NodeState, index: int, *, supervise: bool
    ) -> tuple[RayClusterSpec, RayNodeHandle]:
        """Start node ``index``; when Ray says the node "timed out during startup" (its raylet
        never registered: one of the ports picked for it taken by something else between
        picking and starting; a slow dashboard agent no longer causes it, see ray_cli), or its
        dashboard agent never listened (its port taken), pick fresh ports for that node and
        start again, up to START_TRIES times. Retrying on the same ports would fail the same
        way."""
        for attempt in range(1, START_TRIES + 1):
            spec = node_spec(ctx, rec)
            try:
                return spec, start_node(ctx, runner, spec, index, retries=0, supervise=supervise)
            except RemoteError as exc:
                if not any(m in exc.message for m in RETRIED) or attempt == START_TRIES:
                    raise
                ctx.reporter.warn(
                    f"{runner.label}: Ray timed out starting (try {attempt} of "
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
    def _prove_auth(ctx: UpContext) -> None:
        """Requests without the token, from the head, to every node's dashboard agent and the
        GCS: each must be refused (401/403, UNAUTHENTICATED), or `up` stops here."""
        res = ctx.run_head(
            auth_probe_command(cluster_spec(ctx)),
            what="requests to Ray without its token",
            timeout=180,  # the probe's own wait for agents still starting is 90 s
            check=False,
        )
        problems = unauthenticated_access(res.stdout)
        if problems:
            raise RemoteError(
                "Ray answers without its token: " + "; ".join(problems),
                hint="check that every node's Ray runs with RAY_AUTH_MODE=token (see the "
                "`ray start` lines with -v) and run `up` again",
            )
        ctx.reporter.info("the dashboard agents and the GCS refuse requests without the token")

    @staticmethod
    def _wait(ctx: UpContext, *, timeout: float) -> None:
        """Every node registered, then the token proved required (see _prove_auth)."""
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
        RayCluster._prove_auth(ctx)
