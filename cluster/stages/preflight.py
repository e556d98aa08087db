"""Preflight: every node reachable, alike (OS, Python, devices), addressable, with disk and ports."""

from __future__ import annotations

import ipaddress
import shlex

from cluster import cpu_features, reach
from cluster.errors import ConfigError, RemoteError
from cluster.exposure import exposure_warnings
from cluster.inventory import Node
from cluster.stages.base import ClusterContext, Stage, StageCheck, StageOutcome, Teardown, UpContext
from cluster.state import NodeState, Ports, remote_cluster_dir

# One probe per node prints key=value lines; nothing in it needs root or anything beyond coreutils,
# iproute2 and the system python3. {shared} is the shared dir (the nearest existing parent is
# measured when it does not exist yet).
PROBE_TEMPLATE = r"""
. /etc/os-release 2>/dev/null; echo "os=${{PRETTY_NAME:-unknown}}"
echo "python=$(command -v python3 || true)"
echo "python_version=$(python3 -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])' 2>/dev/null)"
echo "uid=$(id -u)"
echo "home=$HOME"
echo "machine_id=$(cat /etc/machine-id 2>/dev/null || hostname)"
echo "boot_id=$(cat /proc/sys/kernel/random/boot_id 2>/dev/null)"
echo "netns=$(readlink /proc/self/ns/net 2>/dev/null)"
if sudo -n true 2>/dev/null; then echo sudo=yes; else echo sudo=no; fi
echo "cpus=$(nproc)"
echo "numa=$(ls -d /sys/devices/system/node/node[0-9]* 2>/dev/null | wc -l)"
echo "mem_total_kb=$(awk '/^MemTotal:/ {{print $2}}' /proc/meminfo 2>/dev/null)"
echo "arch=$(uname -m)"
echo "cpu_flags=$(grep -m1 -E '^(flags|Features)' /proc/cpuinfo 2>/dev/null | cut -d: -f2 | tr ' ' '\n' | grep -xE '{flags}' | tr '\n' ' ')"
if grep -qw amx_tile /proc/cpuinfo 2>/dev/null; then
  python3 -c 'import ctypes; s = ctypes.CDLL(None).syscall; print("amx_grant=" + ("yes" if s(158, 0x1023, 18) == 0 else "no"))' 2>/dev/null
fi
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader,nounits 2>/dev/null | sed 's/^/gpu=/'
  nvidia-smi 2>/dev/null | sed -n 's/.*CUDA Version: *\([0-9.]*\).*/cuda=\1/p' | head -n 1
fi
ip -o -4 addr show 2>/dev/null | awk '{{print "addr=" $2 " " $4}}'
d={shared}; while [ ! -d "$d" ]; do d=$(dirname "$d"); done
df -Pk "$d" | awk 'NR==2 {{print "disk_free_kb=" $4}}'
"""

# Ports asked as 0 come from a private range above Linux's ephemeral range (32768-60999 by
# default) and clear of Ray's worker ports (its default 10002-19999; up's blocks in 20000-31999):
# no outgoing connection is ever given one of them, so a port preflight chose is still free when
# a later stage binds it. Where the node's ephemeral range reaches into it, the kernel chooses
# (bind to port 0).
PRIVATE_PORT_RANGE = (61000, 65536)
_PORT_PICKER = (
    "import random,socket,sys\n"
    f"lo, hi = {PRIVATE_PORT_RANGE[0]}, {PRIVATE_PORT_RANGE[1]}\n"
    'try: e0, e1 = map(int, open("/proc/sys/net/ipv4/ip_local_port_range").read().split())\n'
    "except (OSError, ValueError): e0, e1 = 32768, 60999\n"
    "private = e1 < lo or e0 >= hi\n"
    "def free(p):\n"
    "    s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
    '    try: s.bind(("", p)); return True\n'
    "    except OSError: return False\n"
    "    finally: s.close()\n"
    "def pick():\n"
    "    if private: return random.randrange(lo, hi)\n"
    '    s=socket.socket(); s.bind(("", 0)); p=s.getsockname()[1]; s.close(); return p\n'
)

# {count} distinct free TCP ports on the head (the ports asked as 0), space-separated; exit 1
# when a few thousand candidates were not enough.
FREE_PORTS_TEMPLATE = (
    "python3 -c '" + _PORT_PICKER + "got = []\n"
    "for _ in range(5000):\n"
    "    p = pick()\n"
    "    if p not in got and free(p): got.append(p)\n"
    "    if len(got) == {count}:\n"
    '        print(" ".join(map(str, got))); sys.exit(0)\n'
    "sys.exit(1)'"
)

# A free port P on the head whose next {span} ports are free too and none of them in {avoid}
# (the API port of several replicas: HAProxy and the replicas take ports above it); exit 1
# when a few hundred candidates all fail.
FREE_PORT_BLOCK_TEMPLATE = (
    "python3 -c '" + _PORT_PICKER + "span, avoid = {span}, {{{avoid}}}\n"
    "for _ in range(300):\n"
    "    p = pick()\n"
    "    block = range(p, p + span + 1)\n"
    "    if p + span <= 65535 and not avoid & set(block) and all(free(q) for q in block):\n"
    "        print(p); sys.exit(0)\n"
    "sys.exit(1)'"
)

# Is a port already taken on the head? (exit 0: free)
PORT_FREE_TEMPLATE = (
    "python3 -c 'import socket,sys\n"
    "s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
    'try: s.bind(("", int(sys.argv[1])))\n'
    "except OSError: sys.exit(1)' {port}"
)

# Which of the given ports are taken on the head: prints them, space-separated (exit 0).
PORTS_TAKEN_TEMPLATE = (
    "python3 -c 'import socket,sys\n"
    "taken=[]\n"
    "for p in sys.argv[1:]:\n"
    "    s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
    '    try: s.bind(("", int(p)))\n'
    "    except OSError: taken.append(p)\n"
    "    s.close()\n"
    'print(" ".join(taken))\' {ports}'
)

MIN_FREE_DISK_GB = 10
# Ray replaces a node IP of 127.0.0.1 by the host's own address (other loopback addresses stay),
# so a node known as 127.0.0.1 (`--local`) uses the host's first non-loopback address instead.
RAY_RESOLVES = "127.0.0.1"


def probe_command(shared_dir: str) -> str:
    """The preflight probe for a node with ``shared_dir`` as the shared directory."""
    return PROBE_TEMPLATE.format(
        shared=shlex.quote(shared_dir), flags="|".join(cpu_features.RELEVANT_FLAGS)
    ).strip()


def parse_probe(text: str) -> dict[str, list[str]]:
    """``key=value`` lines into a dict of lists (a key may repeat: gpu=, addr=)."""
    facts: dict[str, list[str]] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            facts.setdefault(key.strip(), []).append(value.strip())
    return facts


def _first(facts: dict[str, list[str]], key: str, default: str = "") -> str:
    return facts.get(key, [default])[0]


def pick_address(node: Node, addrs: list[str]) -> tuple[str, str]:
    """(private IP, interface) for a node from its ``ip -o -4 addr`` lines (``iface a.b.c.d/n``).

    The inventory's private IP wins, then the SSH host when it is an address of the node, then
    the first non-loopback address. The interface is the one whose network holds the address
    (127.0.0.2 sits on ``lo`` through 127.0.0.1/8).
    """
    nets = []
    for entry in addrs:
        iface, _, cidr = entry.partition(" ")
        try:
            nets.append((iface, ipaddress.ip_interface(cidr)))
        except ValueError:
            continue

    def iface_of(ip: str) -> str | None:
        addr = ipaddress.ip_address(ip)
        exact = [i for i, n in nets if n.ip == addr]
        if exact:
            return exact[0]
        holding = [i for i, n in nets if addr in n.network]
        return holding[0] if holding else None

    for candidate in (node.private_ip, node.host):
        if candidate is None or candidate == RAY_RESOLVES:
            continue
        try:
            ipaddress.ip_address(candidate)
        except ValueError:
            continue
        iface = iface_of(candidate)
        if iface is not None:
            return candidate, iface
        if candidate == node.private_ip:
            raise ConfigError(
                f"{node.label}: private IP {candidate} from the inventory is not an address of the node",
                hint="fix the second field of its inventory line (see `ip -o -4 addr` on the node)",
            )
    for iface, net in nets:
        if not net.ip.is_loopback:
            return str(net.ip), iface
    raise ConfigError(
        f"{node.label}: no usable IPv4 address found",
        hint="give the node's private IP as the second field of its inventory line",
    )


def node_state_from_probe(
    node: Node, facts: dict[str, list[str]], *, device: str, cpu_slots: int | None
) -> NodeState:
    """A NodeState from the probe's facts (pure: tested without a node)."""
    ip, iface = pick_address(node, facts.get("addr", []))
    uid = _first(facts, "uid", "-1")
    sudo = "" if uid == "0" else ("sudo -n" if _first(facts, "sudo") == "yes" else None)
    gpus = [g for g in facts.get("gpu", []) if g]
    kind = "gpu" if (device == "gpu" or (device == "auto" and gpus)) else "cpu"
    info: dict[str, str] = {"cpus": _first(facts, "cpus"), "numa_nodes": _first(facts, "numa")}
    info["arch"] = _first(facts, "arch")
    info["cpu_flags"] = " ".join(sorted(cpu_features.parse_flags(_first(facts, "cpu_flags"))))
    if "amx_grant" in facts:
        info["amx_grant"] = _first(facts, "amx_grant")
    if kind == "gpu":
        if not gpus:
            raise ConfigError(
                f"{node.label}: --device gpu but nvidia-smi lists no GPU",
                hint="install the NVIDIA driver, or pass --device cpu",
            )
        names = {g.split(",")[0].strip() for g in gpus}
        info["gpu"] = ", ".join(sorted(names))
        info["memory_mib"] = ",".join(sorted({g.split(",")[1].strip() for g in gpus}))
        info["driver"] = ",".join(sorted({g.split(",")[2].strip() for g in gpus}))
        info["cuda"] = _first(facts, "cuda")
        devices = len(gpus)
    else:
        devices = cpu_slots or max(1, int(_first(facts, "numa", "1") or 1))
    info["disk_free_gb"] = f"{int(_first(facts, 'disk_free_kb', '0') or 0) / 2**20:.1f}"
    mem_kb = _first(facts, "mem_total_kb")
    if mem_kb.isdigit():
        # CPU worker slots share it: `--replicas auto` counts the slots it holds.
        info["mem_total_gb"] = f"{int(mem_kb) / 2**20:.1f}"
    return NodeState(
        name=node.name,
        label=node.label,
        host=node.host,
        private_ip=ip,
        interface=iface,
        python=_first(facts, "python") or None,
        home=_first(facts, "home") or None,
        machine_id=_first(facts, "machine_id") or None,
        boot_id=_first(facts, "boot_id") or None,
        user=node.user,
        port=node.port,
        net_namespace=_first(facts, "netns") or None,
        os=_first(facts, "os") or None,
        sudo=sudo,
        devices=devices,
        device_kind=kind,
        device_info=info,
        versions={"python": _first(facts, "python_version")},
    )


def replica_side_ports(api: int, proxy: int, replicas: int) -> dict[str, list[int]]:
    """The head's ports several replicas need besides the API, by what takes them: HAProxy's
    statistics page and Prometheus exporter, and the replicas' own range (serve.config's
    rules: the server derives them from the API port)."""
    from pydantic import ValidationError

    from cluster.errors import validation_error
    from serve.config import ServeConfig, balancer_side_ports

    try:
        config = ServeConfig(model="-", port=api, proxy_port=proxy, num_replicas=replicas)
    except ValidationError as exc:
        raise validation_error(
            exc, ServeConfig, what=f"{replicas} replicas on API port {api}: "
        ) from None
    stats, metrics = balancer_side_ports(config)
    return {
        "HAProxy statistics": [stats],
        "HAProxy metrics": [metrics],
        "replicas": config.replica_ports,
    }


def replica_port_span(num_replicas: int | str, nodes: list[NodeState]) -> int:
    """How many ports above the API port several replicas may take (HAProxy's two and the
    replicas' range: serve.config's rules): for an integer count, its own; for auto, the most
    the recorded device slots can hold; 0 for one replica."""
    most = sum(n.devices for n in nodes) if num_replicas == "auto" else int(num_replicas)
    if most <= 1:
        return 0
    proxy = 1  # any port: only the span matters here
    ports = replica_side_ports(1000, proxy, most)
    return max(p for group in ports.values() for p in group) - 1000


def free_port_block(ctx: UpContext, span: int, avoid: list[int]) -> int | None:
    """A free port on the head with the next ``span`` ports free too and clear of ``avoid``
    (FREE_PORT_BLOCK_TEMPLATE); None when none was found."""
    block = ctx.run_head(
        FREE_PORT_BLOCK_TEMPLATE.format(span=span, avoid=",".join(map(str, avoid)) or "-1"),
        what="choosing a free block of ports for the replicas",
        check=False,
    )
    out = block.stdout.strip()
    return int(out) if block.ok and out.isdigit() else None


def move_api_port(ctx: UpContext, replicas: int) -> bool:
    """Move the recorded API port (asked as 0, nothing served on it) to a free block with room
    for ``replicas`` above it; says so. False when no such block was found."""
    ports = ctx.state.ports
    assert ports is not None
    span = replica_port_span(replicas, ctx.state.nodes)
    others = [v for k, v in ports.model_dump().items() if k != "api" and isinstance(v, int)]
    moved = free_port_block(ctx, span, others)
    if moved is None:
        return False
    ctx.reporter.info(
        f"API port {ports.api} (chosen free earlier) has replica ports in use above it now: "
        f"moved to {moved}"
    )
    ctx.state.ports = ports.model_copy(update={"api": moved})
    return True


def api_port_movable(ctx: UpContext) -> bool:
    """The API port is of the system's choosing (asked as 0) and nothing was served on it yet:
    preflight may move it to another free block."""
    return ctx.config.api_port == 0 and ctx.state.server.config_digest is None


def check_replica_ports(ctx: UpContext, replicas: int, *, may_move: bool = True) -> None:
    """Refuse (ConfigError naming each taken port and what needs it) unless the ports
    ``replicas`` > 1 need are free on the head, as the API port must be; those the running
    server's own replicas and balancer hold (the recorded replica count) are not asked.
    ``may_move``: an API port of the system's choosing with nothing served on it moves to a free
    block instead (preflight only: the ports are its section of the state)."""
    ports = ctx.state.ports
    if replicas <= 1 or ports is None:
        return
    proxy = ports.serve_proxy or ports.api + 2
    wanted = replica_side_ports(ports.api, proxy, replicas)
    server = ctx.state.server
    running = 1
    if server.config_digest is not None:
        running = server.endpoint_replicas
    ours = (
        {p for group in replica_side_ports(ports.api, proxy, running).values() for p in group}
        if running > 1
        else set()
    )
    every = [p for group in wanted.values() for p in group if p not in ours]
    if not every:
        return
    res = ctx.run_head(
        PORTS_TAKEN_TEMPLATE.format(ports=" ".join(map(str, every))),
        what="checking the replicas' ports",
    )
    taken = {int(p) for p in res.stdout.split() if p.isdigit()}
    if not taken:
        return
    movable = api_port_movable(ctx)
    if may_move and movable and move_api_port(ctx, replicas):
        # Ports of the system's choosing, nothing deployed on them yet: the ones above the API
        # port were taken since (an outgoing connection's port, say). A fresh block instead.
        check_replica_ports(ctx, replicas, may_move=False)
        return
    named = [
        f"{port} ({what})" for what, group in wanted.items() for port in group if port in taken
    ]
    first, last = wanted["replicas"][0], wanted["replicas"][-1]
    rerun = (
        "rerun `llamacluster up` (preflight moves a port it chose itself to a free block), "
        if movable
        else ""
    )
    raise ConfigError(
        f"{replicas} replicas need ports that are in use on the head {ctx.head.label}: "
        + ", ".join(named),
        hint=f"{rerun}stop what holds them, or pass another --api-port (HAProxy takes api+3 and "
        f"api+4, the replicas api+10 upward: now {first}-{last}), or fewer --replicas",
    )


def cpu_kernels_of(node: NodeState) -> cpu_features.CpuKernels | None:
    """The CPU kernels vLLM will run on a node, from its recorded flags (None: not probed)."""
    info = node.device_info
    if not info.get("arch"):
        return None
    grant = info.get("amx_grant")
    return cpu_features.engine_kernels(
        set(info.get("cpu_flags", "").split()),
        arch=info["arch"],
        amx_grant=None if grant is None else grant == "yes",
    )


def require_engine_cpus(nodes: list[NodeState]) -> list[str]:
    """Refuse (ConfigError, one line naming each node and what it lacks) when a CPU node cannot
    run vLLM's CPU kernels; return notes on nodes that run slower kernels than their CPU could
    (AMX refused by the kernel)."""
    problems, notes = [], []
    for n in nodes:
        kernels = cpu_kernels_of(n)
        if kernels is None or n.device_kind != "cpu":
            continue
        if kernels.problem:
            problems.append(f"{n.label}: {kernels.problem}")
        if kernels.note:
            notes.append(f"{n.label}: {kernels.note}")
    if problems:
        raise ConfigError(
            "the engine cannot run on these CPUs: " + "; ".join(problems),
            hint="use x86 CPUs with AVX2 or newer (or ARM/POWER), or GPU nodes with --device gpu",
        )
    return notes


def check_alike(nodes: list[NodeState]) -> list[str]:
    """Differences between nodes that break a shared env or a tp×pp group, one line each."""
    problems = []

    def differ(what: str, values: dict[str, str]) -> None:
        if len(set(values.values())) > 1:
            listing = ", ".join(f"{k}: {v or '?'}" for k, v in values.items())
            problems.append(f"{what} differs ({listing})")

    differ("python3 path", {n.label: n.python or "" for n in nodes})
    differ("python3 version", {n.label: n.versions.get("python", "") for n in nodes})
    differ("device kind", {n.label: n.device_kind for n in nodes})
    if all(n.device_kind == "gpu" for n in nodes):
        for key in ("gpu", "memory_mib", "driver", "cuda"):
            differ(key, {n.label: n.device_info.get(key, "") for n in nodes})
    return problems


class Preflight(Stage):
    """SSH, OS, Python, sudo, devices, addresses, disk, ports: refuse early with a clear line."""

    name = "preflight"
    title = "nodes reachable and alike (ssh, OS, python, devices, network, disk, ports)"
    sections = ("nodes", "ports")

    def check(self, ctx: ClusterContext) -> StageCheck:
        """Every node answers over SSH."""
        results = ctx.run("true", what="ssh reachable?", timeout=30, check=False)
        per_node = {
            n.label: "reachable" if r.ok else f"unreachable ({r.tail(1)})"
            for n, r in results.items()
        }
        down = [n.label for n, r in results.items() if not r.ok]
        if down:
            return StageCheck(False, f"unreachable: {', '.join(down)}", per_node)
        return StageCheck(True, f"{len(results)} node(s) reachable", per_node)

    def teardown(self, ctx: ClusterContext, how: Teardown) -> str | None:
        """With --purge: remove this cluster's private directory (token, key) on every node."""
        if not how.purge:
            return None
        ctx.run(
            lambda n: f"rm -rf {shlex.quote(remote_cluster_dir(ctx.state, n.name))}",
            what="removing the cluster's files on the nodes",
            timeout=30,
            check=False,
        )
        return "the cluster's token and key files removed from every node"

    def plan(self, ctx: UpContext) -> dict[str, list[str]]:
        shared = str(ctx.state.shared_dir)
        plan = {n.label: [probe_command(shared)] for n in ctx.cluster}
        plan[ctx.head.label].append(FREE_PORTS_TEMPLATE.format(count=5) + "   # ports asked as 0")
        if not ctx.cluster.workers:
            return plan

        def ip(node: Node) -> str:
            rec = ctx.state.node(node.name)
            return (rec.private_ip if rec else None) or node.private_ip or node.host

        gcs = ctx.state.ports.ray_gcs if ctx.state.ports else ctx.config.ray_port
        for n in ctx.cluster:
            others = [o for o in ctx.cluster if o is not n]
            addresses = [f"{ip(ctx.head)}:{gcs or '<ray-port>'}"] if n is not ctx.head else []
            for o in others:
                addresses += [f"{ip(o)}:<its probe port>", f"{ip(o)}:<its Ray worker-range port>"]
            plan[n.label] += [
                reach.listen_command(ip(n), peers=len(others))
                + "   # prints its ports and pid; up until every peer connected",
                reach.connect_command(addresses),
                reach.stop_listener_command("<pid>"),
            ]
        return plan

    def run(self, ctx: UpContext) -> StageOutcome:
        cfg = ctx.config
        shared = str(ctx.state.shared_dir)
        results = ctx.run(
            probe_command(shared), what="preflight probe (ssh reachable?)", timeout=60
        )
        nodes = [
            node_state_from_probe(
                n, parse_probe(results[n].stdout), device=cfg.device, cpu_slots=cfg.cpu_slots
            )
            for n in ctx.cluster
        ]
        problems = check_alike(nodes)
        if problems:
            raise ConfigError(
                "nodes are not alike: " + "; ".join(problems),
                hint="use the same OS image, python3 and driver on every node",
            )
        for note in require_engine_cpus(nodes):
            ctx.reporter.warn(note)
        for n in nodes:
            if not n.python:
                raise RemoteError(
                    f"{n.label}: no python3 on PATH", hint="apt-get install python3 python3-venv"
                )
            free = float(n.device_info.get("disk_free_gb", "0"))
            if free < MIN_FREE_DISK_GB:
                ctx.reporter.warn(f"{n.label}: only {free:.1f} GiB free under {shared}")
        if self._needs_root(ctx):
            missing = [n.label for n in nodes if n.sudo is None]
            if missing:
                raise ConfigError(
                    f"{', '.join(missing)}: not root and no passwordless sudo (needed by the "
                    "storage/cache stages)",
                    hint="log in as root, allow `sudo -n` for the SSH user, or --skip cache",
                )
        ctx.state.nodes = nodes
        for n in nodes:
            kernels = cpu_kernels_of(n)
            kind = (
                f"{n.devices} × {n.device_info.get('gpu', 'GPU')}"
                if n.device_kind == "gpu"
                else f"{n.devices} CPU slot(s) ({n.device_info.get('cpus')} cores"
                + (f"; {kernels.describe()}" if kernels else "")
                + ")"
            )
            ctx.reporter.node(
                n.label,
                f"{n.os}, python {n.versions.get('python')}, {kind}, {n.private_ip} on "
                f"{n.interface}, {n.device_info.get('disk_free_gb')} GiB free",
            )
        ports_changed = self._choose_ports(ctx)
        asked = cfg.num_replicas
        if asked != "auto" and not ctx.state.more_models:
            check_replica_ports(ctx, int(asked))
        elif api_port_movable(ctx):
            # `--replicas auto`, and several models, are checked by the serve stage once the
            # planner has chosen; an API port of the system's choosing with nothing served on it
            # yet is checked here for the most replicas the slots hold, and moved if that block
            # was taken since (the serve stage may not move it: the ports are this stage's).
            check_replica_ports(ctx, sum(n.devices for n in ctx.state.nodes))
        self._check_reachability(ctx)
        # Ports already listening (a running cluster) that answer on a public address: warned
        # with the rule that closes each; never a failure.
        for line in exposure_warnings(ctx.state):
            ctx.reporter.warn(line)
        total = sum(n.devices for n in nodes)
        return StageOutcome(
            "done" if ports_changed else "unchanged",
            f"{len(nodes)} node(s), {total} device slot(s)",
        )

    @staticmethod
    def _needs_root(ctx: UpContext) -> bool:
        cfg = ctx.config
        if cfg.local or cfg.test_root:
            return False
        return "cache" not in cfg.skip or (cfg.nfs_server == "head" and "storage" not in cfg.skip)

    @staticmethod
    def _choose_ports(ctx: UpContext) -> bool:
        """Keep recorded ports; else take the asked ones (checked free) or free ones for 0.

        The monitor's port is chosen with the others unless the monitor stage is skipped; a
        cluster whose ports were chosen without it gets it by the first `up` that runs it."""
        cfg = ctx.config
        recorded = ctx.state.ports
        want_monitor = "monitor" not in cfg.skip
        if recorded is not None and (recorded.monitor is not None or not want_monitor):
            return False
        asked: dict[str, int] = {}
        if recorded is None:
            asked = {
                "ray_gcs": cfg.ray_port,
                "dashboard": cfg.dashboard_port,
                "api": cfg.api_port,
                "serve_proxy": 0,  # unused by clients: any free port
                "ray_client": 0,
            }
        if want_monitor:
            asked["monitor"] = cfg.monitor_port
        zero = [k for k, v in asked.items() if v == 0]
        if zero:
            out = ctx.run_head(
                FREE_PORTS_TEMPLATE.format(count=len(zero)), what="choosing free ports"
            ).stdout.split()
            asked.update(dict(zip(zero, map(int, out), strict=True)))
        # With several models the replicas are any split of the device slots: as for auto.
        count = "auto" if ctx.state.more_models else cfg.num_replicas
        if "api" in zero and (span := replica_port_span(count, ctx.state.nodes)):
            # Several replicas take ports above the API's: a free block, clear of the others.
            block = free_port_block(ctx, span, [v for k, v in asked.items() if k != "api"])
            if block is not None:
                asked["api"] = block
        for key, port in asked.items():
            if key in zero:
                continue
            res = ctx.run_head(PORT_FREE_TEMPLATE.format(port=port), what="port check", check=False)
            if not res.ok:
                raise ConfigError(
                    f"port {port} ({key}) is already in use on the head {ctx.head.label}",
                    hint=f"pass another --{key.replace('_gcs', '').replace('_', '-')}-port "
                    "(0 picks a free one)",
                )
        ctx.state.ports = Ports(**asked) if recorded is None else recorded.model_copy(update=asked)
        return True

    @staticmethod
    def _check_reachability(ctx: UpContext) -> None:
        """Every node reaches every other one on a kernel-chosen port and a Ray worker-range
        port (a listener runs on each node for a few seconds), and the workers reach the head's
        GCS port; one error names every blocked pair, its port and the range to open."""
        if not ctx.cluster.workers:
            return
        recs = {n.name: ctx.node_state(n) for n in ctx.cluster}
        ips = {name: str(rec.private_ip) for name, rec in recs.items()}
        gcs = ctx.state.ports.ray_gcs if ctx.state.ports else 6379
        peers = len(recs) - 1
        started = ctx.run(
            lambda n: reach.listen_command(ips[n.name], peers=peers),
            what="starting port probe listeners",
            timeout=30,
            check=False,
        )
        listeners = {
            n.name: lis
            for n, res in started.items()
            if (lis := reach.parse_listener(res.stdout)) is not None
        }
        results: dict[str, list[tuple[reach.Target, str]]] | None = None
        try:
            missing = [
                f"{n.label} (exit {r.returncode}): {r.tail(2) or r.tail(2, stream='stdout') or '-'}"
                for n, r in started.items()
                if n.name not in listeners
            ]
            if missing:
                raise RemoteError(
                    "could not start the port probe listener on " + "; ".join(missing),
                    hint="each node needs python3 and its private IP bindable",
                )
            targets = reach.plan_targets(ips, listeners, head=ctx.head.name, gcs_port=gcs)
            tried = ctx.run(
                lambda n: reach.connect_command([t.address for t in targets[n.name]]),
                what="connecting between nodes",
                timeout=30,
            )
            results = {
                n.name: reach.parse_verdicts(res.stdout, targets[n.name])
                for n, res in tried.items()
            }
        finally:
            # A listener every peer reached has ended by itself; stop the others now.
            waiting = reach.unfinished_listeners(listeners, results)
            if waiting:
                ctx.run(
                    lambda n: reach.stop_listener_command(listeners[n.name].pid),
                    what="stopping port probe listeners",
                    nodes=[n for n in ctx.cluster if n.name in waiting],
                    timeout=30,
                    check=False,
                )
        report = reach.blocked_report(results, ips=ips, listeners=listeners, gcs_port=gcs)
        if report is not None:
            raise RemoteError(report[0], hint=report[1])
        lo, hi = reach.open_range(listeners)
        ctx.reporter.info(
            f"TCP open between all {len(recs)} nodes both ways: GCS port {gcs} (workers → "
            f"head), a kernel-chosen and a Ray worker port on each node (range {lo}-{hi})"
        )
