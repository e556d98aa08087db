"""Start, check and stop the Ray nodes of one cluster (used by `up`, `down` and the test fixture)."""

from __future__ import annotations

import json
import logging
import shlex
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

from cluster.errors import ConfigError, NotReadyError, RemoteError
from cluster.ray_start import AGENT_NOT_LISTENING
from cluster.remote import RemoteCall
from cluster.remote_ray import MODULE as REMOTE_RAY
from cluster.remote_ray import NodesRequest, PortsRequest
from cluster.runner import LineSink, Result, Runner, shell_join

log = logging.getLogger(__name__)

HEAD_RESOURCE = "llamacluster_head"
"""Custom resource only the head advertises (1 unit): pins the serving replica to the head."""

PASSTHROUGH_ENV = (
    "GLOO_SOCKET_IFNAME",
    "NCCL_SOCKET_IFNAME",
    "VLLM_HOST_IP",
    "VLLM_CPU_KVCACHE_SPACE",
)
"""Variables the Ray daemons (and so every worker they spawn) must carry; preflight sets them.
They also keep vLLM's transports on the private network: Gloo and NCCL bind the named interface,
vLLM's ZeroMQ sockets ``VLLM_HOST_IP`` (what Ray and torch cannot bind: docs/SECURITY.md)."""

# Unix sockets live under <temp-dir>/session_<date>_<pid>/sockets/<name>.<n>: about 70 bytes
# after the temp dir, of the kernel's 107.
MAX_TEMP_DIR_LEN = 36
# Worker ports come from a private block below Linux's ephemeral range (32768+), so they never
# race with ports handed out for port 0, and blocks of several nodes on one host never overlap.
WORKER_BLOCK_RANGE = (20000, 32000)
WORKER_BLOCK_SIZE = 64


@dataclass(frozen=True)
class RayNodePorts:
    """Every port a Ray node listens on; ``None`` leaves Ray's default (fixed or random)."""

    node_manager: int | None = None
    object_manager: int | None = None
    metrics_export: int | None = None
    dashboard_agent_listen: int | None = None  # Ray's default is the fixed 52365
    dashboard_agent_grpc: int | None = None
    runtime_env_agent: int | None = None
    min_worker: int | None = None  # Ray's default range is the fixed 10002-19999
    max_worker: int | None = None


@dataclass(frozen=True)
class RayHeadPorts:
    """Ports only the head listens on; Ray's defaults (6379, 8265, 10001) are fixed."""

    gcs: int = 6379
    dashboard: int = 8265
    client_server: int = 10001


@dataclass(frozen=True)
class RayNodeSpec:
    """One Ray node: its cluster-facing IP, what it advertises, its ports, and where its copy
    of the cluster token lives (None: the cluster's ``token_path``)."""

    ip: str
    num_gpus: int
    num_cpus: int | None = None
    resources: Mapping[str, float] = field(default_factory=dict)
    ports: RayNodePorts = field(default_factory=RayNodePorts)
    token_path: str | None = None


@dataclass(frozen=True)
class RayClusterSpec:
    """Everything needed to start one Ray cluster; ``nodes[0]`` is the head.

    ``temp_dir`` and ``token_path`` are per cluster, so clusters sharing a host never share
    sessions, sockets or tokens. ``temp_dir`` is the same path on every node; ``token_path`` is
    the head's token file and every node's unless its RayNodeSpec names its own (a node's home
    may differ). ``env`` is passed to every node's Ray daemons (see PASSTHROUGH_ENV).
    """

    name: str
    temp_dir: str
    token_path: str
    nodes: tuple[RayNodeSpec, ...]
    head_ports: RayHeadPorts = field(default_factory=RayHeadPorts)
    env: Mapping[str, str] = field(default_factory=dict)
    ray_bin: str = "ray"
    #: The command that runs Ray's CLI for ``ray start`` (default: ``ray_bin``). `up` gives
    #: ``python -m cluster.ray_start``: the same CLI, with the raylet told its agent's port.
    ray_cli: tuple[str, ...] = ()
    python: str = "python3"
    object_store_memory: int | None = None
    #: Variables for the head's daemons only (the dashboard's RAY_PROMETHEUS_HOST).
    head_env: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.nodes:
            raise ConfigError("a Ray cluster needs at least one node")
        if len(self.temp_dir) > MAX_TEMP_DIR_LEN:
            raise ConfigError(
                f"Ray temp dir {self.temp_dir!r} is {len(self.temp_dir)} characters long",
                hint=f"use at most {MAX_TEMP_DIR_LEN}: Ray's unix socket paths under it are "
                "limited to 107 bytes",
            )

    @property
    def head(self) -> RayNodeSpec:
        """The head's spec."""
        return self.nodes[0]

    def node_token_path(self, index: int) -> str:
        """The token file of node ``index`` (0 is the head) on that node."""
        return self.nodes[index].token_path or self.token_path

    @property
    def address(self) -> str:
        """The GCS address workers and drivers join (``ip:port``)."""
        return f"{self.head.ip}:{self.head_ports.gcs}"

    @property
    def dashboard_url(self) -> str:
        """The dashboard, bound to 127.0.0.1 on the head (reach it through an SSH tunnel)."""
        return f"http://127.0.0.1:{self.head_ports.dashboard}"


def ray_node_env(spec: RayClusterSpec, index: int = 0) -> dict[str, str]:
    """Environment of ``ray start`` on node ``index`` (travels on stdin, never on a command
    line). It names the token's file, never the token."""
    env = {
        "RAY_AUTH_MODE": "token",  # every client and node must present the cluster's token
        "RAY_AUTH_TOKEN_PATH": spec.node_token_path(index),
        "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",  # must be set before the daemons start
        "RAY_USAGE_STATS_ENABLED": "0",
        # Ray runs its workers at nice 15 by default. Here the workers are the server: the Serve
        # replica (the API), its vLLM engine core and the engine's workers. At nice 15 they yield
        # the cores to every ordinary process of the node (docs/BENCHMARKS.md, "Process
        # priority"); plain vLLM runs its API server and engine core at normal priority.
        "RAY_worker_niceness": "0",
    }
    env.update(spec.env)
    if index == 0:
        env.update(spec.head_env)
    return env


def _port_flags(ports: RayNodePorts) -> list[str]:
    flags = {
        "--node-manager-port": ports.node_manager,
        "--object-manager-port": ports.object_manager,
        "--metrics-export-port": ports.metrics_export,
        "--dashboard-agent-listen-port": ports.dashboard_agent_listen,
        "--dashboard-agent-grpc-port": ports.dashboard_agent_grpc,
        "--runtime-env-agent-port": ports.runtime_env_agent,
        "--min-worker-port": ports.min_worker,
        "--max-worker-port": ports.max_worker,
    }
    return [str(x) for flag, value in flags.items() if value is not None for x in (flag, value)]


def _common_flags(
    spec: RayClusterSpec, node: RayNodeSpec, resources: Mapping[str, float]
) -> list[str]:
    argv = [
        "--node-ip-address",
        node.ip,
        "--num-gpus",
        str(node.num_gpus),
        "--temp-dir",
        spec.temp_dir,
        "--disable-usage-stats",
    ]
    if node.num_cpus is not None:
        argv += ["--num-cpus", str(node.num_cpus)]
    if resources:
        argv += ["--resources", json.dumps(dict(resources), sort_keys=True)]
    if spec.object_store_memory is not None:
        argv += ["--object-store-memory", str(spec.object_store_memory)]
    return argv + _port_flags(node.ports)


def ray_start_head_argv(spec: RayClusterSpec) -> list[str]:
    """``ray start --head`` for ``spec.nodes[0]``: dashboard on 127.0.0.1, the head resource."""
    head = spec.head
    return [
        *(spec.ray_cli or (spec.ray_bin,)),
        "start",
        "--head",
        "--port",
        str(spec.head_ports.gcs),
        "--dashboard-host",
        "127.0.0.1",
        "--dashboard-port",
        str(spec.head_ports.dashboard),
        "--ray-client-server-port",
        str(spec.head_ports.client_server),
        *_common_flags(spec, head, {**head.resources, HEAD_RESOURCE: 1}),
    ]


def ray_start_worker_argv(spec: RayClusterSpec, node: RayNodeSpec) -> list[str]:
    """``ray start --address`` joining ``node`` to the head of ``spec``."""
    return [
        *(spec.ray_cli or (spec.ray_bin,)),
        "start",
        "--address",
        spec.address,
        *_common_flags(spec, node, node.resources),
    ]


def ray_start_argv(spec: RayClusterSpec, index: int) -> list[str]:
    """The start command of node ``index`` (0 is the head)."""
    node = spec.nodes[index]
    return ray_start_head_argv(spec) if index == 0 else ray_start_worker_argv(spec, node)


def sid_file(spec: RayClusterSpec, node: RayNodeSpec) -> str:
    """Where a node records its Ray session id (a copy of what the controller records)."""
    return f"{spec.temp_dir}/llamacluster-{node.ip}.sid"


# The cluster's Ray temp dir sits at a fixed path under /tmp, where anyone may create a name
# first. It must be a real directory (not a symlink), owned by this user and closed to others
# (0700: Ray keeps its sockets, logs and session files there); the files written into it here
# must not be symlinks either. Anything else: one line on stderr, exit 2, nothing written.
_TEMP_DIR_GUARD = """\
t={temp_dir}
if [ -L "$t" ]; then echo "Ray temp dir $t is a symlink: refusing it (remove it and run again)" >&2; exit 2; fi
mkdir -p -m 0700 "$t" || exit 2
if [ -L "$t" ] || [ ! -d "$t" ]; then echo "Ray temp dir $t is not a directory: refusing it" >&2; exit 2; fi
if [ "$(stat -c %u "$t")" != "$(id -u)" ]; then echo "Ray temp dir $t belongs to uid $(stat -c %u "$t"), not to $(id -un): refusing it (remove it and run again)" >&2; exit 2; fi
chmod 0700 "$t" || exit 2
for f in {files}; do
  if [ -L "$f" ]; then echo "$f is a symlink: refusing to write through it (remove it and run again)" >&2; exit 2; fi
done"""


def temp_dir_guard(temp_dir: str, files: Sequence[str] = ()) -> str:
    """Shell text that makes ``temp_dir`` a 0700 directory of this user, or exits 2 with one
    line: a symlink, a non-directory or another user's directory is refused, and so is any of
    ``files`` (paths the caller will write) that is a symlink."""
    return _TEMP_DIR_GUARD.format(
        temp_dir=shell_join([temp_dir]), files=shell_join(list(files)) if files else '""'
    )


# Runs `ray start` as the leader of a new session, so every Ray process of the node (daemons,
# agents, workers, replicas) shares that session id and can be stopped by it and only it. Its
# output goes to a file: daemons inherit the descriptors, and an inherited SSH pipe would keep
# the connection open forever.
_START_TEMPLATE = """\
unset RAY_AUTH_TOKEN
{guard}
test -s "$RAY_AUTH_TOKEN_PATH" || {{ echo "token file $RAY_AUTH_TOKEN_PATH is missing or empty" >&2; exit 2; }}
log={log}
setsid --wait bash -c 'echo $$ > "$1"; shift; exec "$@"' _ {sid_file} {argv} > "$log" 2>&1 < /dev/null
rc=$?
cat "$log"
echo "LLAMACLUSTER_RAY_SID=$(cat {sid_file} 2>/dev/null)"
exit $rc
"""

# The same start under the node's supervisor (cluster/supervisor.py): it leads a new session
# (its pid is the session id of every Ray process it starts), runs `ray start` once and writes
# "<sid> <exit code>" to the status file, then stays to restart Ray. Detached like the daemons:
# output to a file, stdin from /dev/null.
_SUPERVISED_TEMPLATE = """\
unset RAY_AUTH_TOKEN
{guard}
test -s "$RAY_AUTH_TOKEN_PATH" || {{ echo "token file $RAY_AUTH_TOKEN_PATH is missing or empty" >&2; exit 2; }}
status={status}
rm -f "$status"
{python} -m cluster.supervisor run --temp-dir {temp_dir} --status-file "$status" --log {log} -- {argv} > {sup_log} 2>&1 < /dev/null &
pid=$!
for _ in $(seq {polls}); do
  [ -s "$status" ] && break
  kill -0 $pid 2>/dev/null || break
  sleep 0.5
done
cat {log} 2>/dev/null
echo "LLAMACLUSTER_RAY_SID=$pid"
read -r _ rc < "$status" 2>/dev/null || {{ echo "the supervisor ended before Ray started: $(tail -n 5 {sup_log})"; exit 1; }}
exit $rc
"""

# TERM every process of the session, wait, then KILL what is left. Never `ray stop`: that
# stops every Ray process of the user on the host, other clusters included.
_STOP_TEMPLATE = """\
sid={sid}
{ours}
pids=$(members)
if [ -z "$pids" ]; then echo "no process left in session $sid"; exit 0; fi
if ! ours; then
  echo "session $sid is not this cluster's (no process of it names {temp}): left alone"; exit 0
fi
echo "stopping $(echo $pids | wc -w) process(es) of session $sid"
kill -TERM $pids 2>/dev/null
for _ in $(seq {polls}); do
  sleep 0.25
  pids=$(members)
  [ -z "$pids" ] && exit 0
done
echo "killing what ignored TERM: $(ps -o comm= -p "$(echo $pids | tr ' ' ,)" | tr '\\n' ' ')" >&2
kill -KILL $pids 2>/dev/null
for _ in $(seq 60); do
  sleep 0.25
  [ -z "$(members)" ] && exit 0
done
echo "still alive after KILL: $(members | tr '\\n' ' ')" >&2
exit 1
"""


@dataclass(frozen=True)
class RayNodeHandle:
    """A started Ray node: where it runs and the session id of all its processes.

    Plain data, so the cluster state can store it (``asdict``) and ``down`` can rebuild it.
    """

    node: str
    ip: str
    session_id: int
    head: bool = False
    #: This cluster's Ray temp dir: a session is this cluster's only while a process of it names
    #: the dir (after a reboot the same session id can belong to anything).
    temp_dir: str | None = None
    #: The session leader is the node's supervisor (cluster/supervisor.py), which restarts Ray.
    supervised: bool = False

    def to_dict(self) -> dict:
        """JSON-ready form for the cluster state file."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping) -> RayNodeHandle:
        """Rebuild from ``to_dict`` output."""
        return cls(
            node=str(data["node"]),
            ip=str(data["ip"]),
            session_id=int(data["session_id"]),
            head=bool(data.get("head", False)),
            temp_dir=data.get("temp_dir"),
            supervised=bool(data.get("supervised", False)),
        )


def start_ray_node(
    runner: Runner,
    spec: RayClusterSpec,
    index: int,
    *,
    timeout: float = 180,
    retries: int = 1,
    on_line: LineSink | None = None,
    supervise: bool = False,
) -> RayNodeHandle:
    """Start node ``index`` of ``spec`` through ``runner`` and return its handle.

    Ray gives a raylet a fixed 30 s to register; on a busy host that can pass, so that one
    failure is retried (after stopping what the failed try left). Any other failure raises
    RemoteError with the tail of Ray's output. ``on_line`` receives Ray's output (``-v``).
    ``supervise``: under the node's supervisor process, which starts Ray again when its raylet
    is gone (``spec.python`` must import this project).
    """
    node = spec.nodes[index]
    command = (
        start_supervised_command(spec, index, timeout=timeout)
        if supervise
        else start_ray_node_command(spec, index)
    )
    for attempt in range(retries + 1):
        result = runner.run(
            command, env=ray_node_env(spec, index), timeout=timeout, on_line=on_line
        )
        sid = _parse_sid(result.stdout)
        if result.ok and sid is not None:
            return RayNodeHandle(
                node=runner.label,
                ip=node.ip,
                session_id=sid,
                head=index == 0,
                temp_dir=spec.temp_dir,
                supervised=supervise,
            )
        if sid is not None:  # ray start failed half-way: leave nothing of it behind
            stop_ray_node(runner, sid, temp_dir=spec.temp_dir, supervised=supervise)
        if not any(m in result.stdout for m in RETRIED) or attempt == retries:
            break
        log.info("%s: Ray node timed out starting; starting it again", runner.label)
        time.sleep(2.0 * (attempt + 1))  # let the host's load settle a little first
    role = "head" if index == 0 else "worker"
    raise RemoteError(
        f"ray start ({role} {node.ip}) failed on {runner.label} with exit "
        f"{result.returncode}: {result.tail(8, stream='stdout') or result.tail(8)}",
        hint=f"see {spec.temp_dir}/session_latest/logs on that node",
    )


#: What `ray start` prints when the node's raylet did not register with the GCS within 30 s.
STARTUP_TIMEOUT = "timed out during startup"
#: The failed starts tried again: those two timeouts (cluster/ray_start.py).
RETRIED = (STARTUP_TIMEOUT, AGENT_NOT_LISTENING)


_SECRET_WORDS = ("TOKEN", "KEY", "SECRET", "PASSWORD")


def ray_start_display(spec: RayClusterSpec, index: int) -> str:
    """``ray start`` of node ``index`` as one line for a person (``-v``, ``--dry-run``): its
    environment, then the command. The token travels as a file path; a variable that looks like
    a secret (other than a ``..._PATH``) would show as ``***``."""
    env = [
        f"{k}=***"
        if any(w in k for w in _SECRET_WORDS) and not k.endswith("_PATH")
        else shell_join([f"{k}={v}"])
        for k, v in ray_node_env(spec, index).items()
    ]
    return " ".join([*env, shell_join(ray_start_argv(spec, index))])


def start_ray_node_command(spec: RayClusterSpec, index: int) -> str:
    """The shell text that starts node ``index`` under its own session (see _START_TEMPLATE)."""
    node = spec.nodes[index]
    log = f"{spec.temp_dir}/llamacluster-start-{node.ip}.log"
    return _START_TEMPLATE.format(
        guard=temp_dir_guard(spec.temp_dir, [log, sid_file(spec, node)]),
        log=shell_join([log]),
        sid_file=shell_join([sid_file(spec, node)]),
        argv=shell_join(ray_start_argv(spec, index)),
    )


def start_supervised_command(spec: RayClusterSpec, index: int, *, timeout: float = 180) -> str:
    """The shell text that starts node ``index`` under its supervisor (see _SUPERVISED_TEMPLATE);
    it waits up to ``timeout`` for the first ``ray start``."""
    node = spec.nodes[index]
    temp = spec.temp_dir
    status, log = (
        f"{temp}/llamacluster-supervisor-{node.ip}.status",
        f"{temp}/llamacluster-start-{node.ip}.log",
    )
    return _SUPERVISED_TEMPLATE.format(
        guard=temp_dir_guard(temp, [status, log, supervisor_log(spec, node)]),
        temp_dir=shell_join([temp]),
        status=shell_join([status]),
        python=shell_join([spec.python]),
        log=shell_join([log]),
        sup_log=shell_join([supervisor_log(spec, node)]),
        argv=shell_join(ray_start_argv(spec, index)),
        polls=max(1, int(timeout / 0.5)),
    )


def supervisor_log(spec: RayClusterSpec, node: RayNodeSpec) -> str:
    """Where a node's supervisor writes what it did (restarts, failed starts), on that node."""
    return f"{spec.temp_dir}/llamacluster-supervisor-{node.ip}.log"


def _parse_sid(stdout: str) -> int | None:
    for line in reversed(stdout.splitlines()):
        if line.startswith("LLAMACLUSTER_RAY_SID="):
            value = line.split("=", 1)[1].strip()
            return int(value) if value.isdigit() else None
    return None


# Shell functions over session $sid: `members` lists its live processes of this user (zombies,
# stat Z, only wait for their parent to reap them); `ours` succeeds when one of them names the
# cluster's Ray temp dir on its command line (gcs_server, raylet, the agents all do).
_MEMBERS_TEMPLATE = r"""
members() {{ ps -eo pid=,sid=,uid=,stat= | awk -v s="$sid" -v u="$(id -u)" '$2 == s && $3 == u && $4 !~ /^Z/ {{ print $1 }}'; }}
ours() {{
  for p in $(members); do
    tr '\0' ' ' < /proc/$p/cmdline 2>/dev/null | grep -qF -- {temp} && return 0
  done
  return 1
}}
""".strip()


def session_alive_command(session_id: int, temp_dir: str) -> str:
    """Exit 0 while session ``session_id`` has a live process of this user that names
    ``temp_dir`` (this cluster's Ray temp dir); a session id reused by anything else is not."""
    sid = int(session_id)
    ours = _MEMBERS_TEMPLATE.format(temp=shlex.quote(temp_dir))
    return f"sid={sid}\n{ours}\nours"


def raylet_alive_command(session: int | str, temp_dir: str) -> str:
    """Exit 0 while a raylet of session ``session`` (an id, or shell text printing one) runs as
    this user and names ``temp_dir``: the node's Ray, not only its supervisor, is there."""
    sid = str(int(session)) if isinstance(session, int) else f"$({session})"
    members = _MEMBERS_TEMPLATE.format(temp=shlex.quote(temp_dir))
    return (
        f"sid={sid}\n{members}\n"
        "for p in $(members); do\n"
        '  [ "$(cat /proc/$p/comm 2>/dev/null)" = raylet ] || continue\n'
        f"  tr '\\0' ' ' < /proc/$p/cmdline 2>/dev/null | grep -qF -- {shlex.quote(temp_dir)} && exit 0\n"
        "done\nexit 1"
    )


# TERM the supervisor by its pid (only when it is one: its own session leader whose command line
# names cluster.supervisor and the cluster's temp dir), and wait for it to end.
_STOP_SUPERVISOR_TEMPLATE = """\
pid={pid}
[ -r /proc/$pid/cmdline ] || {{ echo "supervisor $pid not running"; exit 0; }}
cmd=$(tr '\\0' ' ' < /proc/$pid/cmdline)
if [ "$(ps -o sid= -p $pid | tr -d ' ')" != "$pid" ] || [ "$(ps -o uid= -p $pid | tr -d ' ')" != "$(id -u)" ] \\
   || ! echo "$cmd" | grep -qF -- cluster.supervisor || ! echo "$cmd" | grep -qF -- {temp}; then
  echo "process $pid is not this cluster's supervisor: left alone"; exit 0
fi
kill -TERM $pid
for _ in $(seq 40); do kill -0 $pid 2>/dev/null || {{ echo "supervisor $pid stopped"; exit 0; }}; sleep 0.25; done
kill -KILL $pid 2>/dev/null; echo "supervisor $pid killed (ignored TERM)"
"""


def stop_supervisor_command(pid: int, temp_dir: str) -> str:
    """Shell text that stops the node supervisor ``pid`` (TERM, then KILL after 10 s), only when
    it is this cluster's; its Ray is stopped separately, by the session."""
    if int(pid) <= 1:
        raise ValueError(f"refusing to stop pid {pid}")
    # A subshell: its exits end this step only, so the session stop that follows still runs.
    text = _STOP_SUPERVISOR_TEMPLATE.format(pid=int(pid), temp=shlex.quote(temp_dir))
    return f"(\n{text})\n"


def stop_session_command(session_id: int, marker: str, *, grace_s: float = 10) -> str:
    """Shell text that stops exactly the processes of session ``session_id`` of this user:
    TERM, wait ``grace_s``, then KILL; only when a process of it names ``marker`` (a Ray temp
    dir, the monitor's directory) on its command line, else nothing is signalled. A session
    with no process left is a success (safe to repeat)."""
    sid = int(session_id)
    if sid <= 1:
        raise ValueError(f"refusing to stop session {sid}")
    polls = max(1, int(grace_s / 0.25))
    return _STOP_TEMPLATE.format(
        sid=sid,
        polls=polls,
        ours=_MEMBERS_TEMPLATE.format(temp=shlex.quote(marker)),
        temp=shlex.quote(marker),
    )


def stop_ray_node(
    runner: Runner,
    session_id: int | RayNodeHandle,
    *,
    temp_dir: str | None = None,
    grace_s: float = 10,
    supervised: bool = False,
) -> Result:
    """Stop exactly the processes of one Ray node's session: TERM, wait ``grace_s``, KILL.

    Only this user's processes, and only when the session is this cluster's (a process of it
    names ``temp_dir``, taken from the handle when given one); otherwise nothing is signalled.
    ``supervised`` (or a supervised handle): the session leader is the node's supervisor; it is
    stopped first, by its pid, so it cannot start Ray again meanwhile.
    Safe to repeat: a session with no process left is a success.
    """
    if isinstance(session_id, RayNodeHandle):
        temp_dir = temp_dir or session_id.temp_dir
        supervised = supervised or session_id.supervised
        sid = session_id.session_id
    else:
        sid = int(session_id)
    if not temp_dir:
        raise ValueError(
            "stopping a Ray session needs the cluster's temp dir (to prove it is ours)"
        )
    script = stop_session_command(sid, temp_dir, grace_s=grace_s)
    if supervised:
        script = stop_supervisor_command(sid, temp_dir) + script
    return runner.run(script, timeout=grace_s + 45)


_PORTS_PER_NODE = 6  # node manager, object manager, metrics, agent http/grpc, runtime env
_PORTS_PER_HEAD = 3  # gcs, dashboard, ray client server


def ports_call(
    python: str, *, nodes: int = 1, with_head: bool = True, block_size: int = WORKER_BLOCK_SIZE
) -> RemoteCall:
    """The ``ports`` call of ``allocate_ports`` (also the ``--dry-run`` line)."""
    lo, hi = WORKER_BLOCK_RANGE
    request = PortsRequest(
        count=nodes * _PORTS_PER_NODE + (_PORTS_PER_HEAD if with_head else 0),
        blocks=nodes,
        block_size=block_size,
        lo=lo,
        hi=hi,
    )
    return RemoteCall(python, REMOTE_RAY, "ports", request)


def allocate_ports(
    runner: Runner,
    *,
    nodes: int = 1,
    with_head: bool = True,
    python: str,
    block_size: int = WORKER_BLOCK_SIZE,
) -> tuple[RayHeadPorts | None, list[RayNodePorts]]:
    """Free ports for ``nodes`` Ray nodes that share the host of ``runner`` (and the head ports
    when ``with_head``), picked on that host in one go so no two of them collide.

    ``python`` runs ``cluster.remote_ray ports`` there: an interpreter that imports this project
    (the shared env's).
    """
    reply = ports_call(python, nodes=nodes, with_head=with_head, block_size=block_size).run(
        runner.run, timeout=60
    )
    reply.result.check(what="allocating free ports")
    data = reply.value(what="allocating free ports")
    singles: list[int] = data["singles"]
    head = None
    if with_head:
        head = RayHeadPorts(gcs=singles[0], dashboard=singles[1], client_server=singles[2])
        singles = singles[_PORTS_PER_HEAD:]
    per_node = []
    for i, start in enumerate(data["blocks"]):
        p = singles[i * _PORTS_PER_NODE : (i + 1) * _PORTS_PER_NODE]
        per_node.append(
            RayNodePorts(
                node_manager=p[0],
                object_manager=p[1],
                metrics_export=p[2],
                dashboard_agent_listen=p[3],
                dashboard_agent_grpc=p[4],
                runtime_env_agent=p[5],
                min_worker=start,
                max_worker=start + block_size - 1,
            )
        )
    return head, per_node


@dataclass(frozen=True)
class RayNodeState:
    """One node as the GCS sees it."""

    ip: str
    alive: bool
    resources: Mapping[str, float]

    @property
    def gpus(self) -> float:
        """Device slots the node advertises."""
        return float(self.resources.get("GPU", 0))


def nodes_call(
    python: str, address: str, expected: Mapping[str, float], *, timeout: float
) -> RemoteCall:
    """The ``nodes`` call of ``wait_for_nodes``: poll the GCS at ``address`` from the head until
    every IP of ``expected`` has its device slots (also the ``--dry-run`` line)."""
    request = NodesRequest(
        address=address,
        node_ip=address.rsplit(":", 1)[0],
        timeout_s=timeout,
        expected=dict(expected),
    )
    return RemoteCall(python, REMOTE_RAY, "nodes", request)


def wait_for_nodes(
    address: str,
    expected_nodes: Sequence[str],
    expected_gpus: Mapping[str, float] | float | None = None,
    *,
    token_path: str,
    timeout: float = 120,
    runner: Runner | None = None,
    python: str,
) -> dict[str, RayNodeState]:
    """Wait until every node IP in ``expected_nodes`` is alive in the cluster at ``address``
    with its device slots (``expected_gpus``: per IP, or a total), else raise NotReadyError
    naming the missing nodes and slots.

    Runs ``cluster.remote_ray nodes`` with ``python`` (the shared env's) on ``runner`` (the
    head; default: this machine) as a token-authenticated driver.
    Returns each expected node's state, keyed by the address it was expected under (Ray
    registers 127.0.0.1 under the host's own address; ``state.ip`` says which).
    """
    from cluster.runner import LocalRunner

    runner = runner or LocalRunner()
    if isinstance(expected_gpus, Mapping):
        per_node = {ip: float(expected_gpus.get(ip, 0)) for ip in expected_nodes}
    else:
        per_node = {ip: 0.0 for ip in expected_nodes}
    reply = nodes_call(python, address, per_node, timeout=timeout).run(
        runner.run,
        env={"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": token_path},
        timeout=timeout + 60,
    )
    if not reply.ok or reply.data is None:
        result = reply.result
        raise NotReadyError(
            f"could not read the Ray cluster state at {address} (exit {result.returncode}): "
            f"{result.tail(5)}",
            hint="check that the head is up (`llamacluster status`) and the token file is right",
        )
    seen = reply.data
    nodes = [RayNodeState(**n) for n in seen["nodes"]]
    ray_ip = seen["resolved"]  # expected address -> the address Ray registered it under
    alive = {n.ip: n for n in nodes if n.alive}
    found = {ip: alive[ray_ip[ip]] for ip in expected_nodes if ray_ip[ip] in alive}
    problems = []
    for ip in expected_nodes:
        if ip not in found:
            problems.append(f"{ip} has not joined")
        elif found[ip].gpus < per_node[ip]:
            problems.append(f"{ip} has {found[ip].gpus:g} of {per_node[ip]:g} device slots")
    if isinstance(expected_gpus, int | float) and not problems:
        total = sum(state.gpus for state in found.values())
        if total < expected_gpus:
            problems.append(f"the cluster has {total:g} of {expected_gpus:g} device slots")
    if problems:
        raise NotReadyError(
            f"Ray cluster at {address} not complete after {timeout:g} s: " + "; ".join(problems),
            hint="check those nodes' Ray logs (`llamacluster logs`) and that they reach the "
            "head's private IP",
        )
    return found


# Run with the env's python on the head, with no token anywhere in its environment: one GET of
# each node's dashboard agent (a path that is not one of Ray's public health checks) and one
# GCS call. Prints {"agents": {url: status}, "gcs": grpc status name} as one JSON line. A node
# registers before its agent listens (cluster/ray_start.py): a refused connection is tried again
# until the wait (argv[2], seconds, for all agents together) is over.
_AUTH_PROBE = """\
import json, sys, time, urllib.error, urllib.request
import grpc
from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc
gcs, deadline, urls = sys.argv[1], time.monotonic() + float(sys.argv[2]), sys.argv[3:]
out = {"agents": {}, "gcs": None}
for url in urls:
    while True:
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                out["agents"][url] = r.status
        except urllib.error.HTTPError as e:
            out["agents"][url] = e.code
        except OSError as e:
            if isinstance(getattr(e, "reason", e), ConnectionRefusedError) and time.monotonic() < deadline:
                time.sleep(0.5)
                continue
            out["agents"][url] = "unreachable: %s" % e
        break
try:
    with grpc.insecure_channel(gcs) as ch:
        gcs_service_pb2_grpc.NodeInfoGcsServiceStub(ch).GetAllNodeInfo(
            gcs_service_pb2.GetAllNodeInfoRequest(), timeout=10)
    out["gcs"] = "OK"
except grpc.RpcError as e:
    out["gcs"] = e.code().name
print(json.dumps(out))
"""
#: What a request without the token must get: the agent's 401/403, the GCS's UNAUTHENTICATED.
REFUSED_HTTP = (401, 403)
REFUSED_GRPC = "UNAUTHENTICATED"


def auth_probe_command(spec: RayClusterSpec, *, agent_wait_s: float = 90) -> str:
    """Shell text for the head: requests to every node's dashboard agent and to the GCS without
    a token (see _AUTH_PROBE; an agent not listening yet gets ``agent_wait_s``);
    ``unauthenticated_access`` reads its output."""
    urls = [
        f"http://{_url_host(n.ip)}:{n.ports.dashboard_agent_listen or 52365}/api/v0/tasks"
        for n in spec.nodes
    ]
    return "env -u RAY_AUTH_TOKEN -u RAY_AUTH_TOKEN_PATH RAY_AUTH_MODE=disabled " + shell_join(
        [spec.python, "-c", _AUTH_PROBE, spec.address, f"{agent_wait_s:g}", *urls]
    )


def _url_host(ip: str) -> str:
    return f"[{ip}]" if ":" in ip else ip


def unauthenticated_access(stdout: str) -> list[str]:
    """What answered the probe without a token (empty: every endpoint refused it)."""
    try:
        got = json.loads(stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return [f"the probe printed no result: {stdout.strip()[-200:]!r}"]
    open_ = [
        f"dashboard agent {url} answered {status} without a token"
        for url, status in got.get("agents", {}).items()
        if status not in REFUSED_HTTP
    ]
    if got.get("gcs") != REFUSED_GRPC:
        open_.append(f"the GCS answered {got.get('gcs')} to a call without a token")
    return open_
