"""Node-to-node TCP reachability on the ports Ray, Gloo/NCCL and vLLM open (used by preflight)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from cluster.ray_nodes import WORKER_BLOCK_RANGE
from cluster.runner import shell_join

#: Marks the listener's command line, so the stop command kills only a listener it started.
LISTENER_MARK = "llamacluster-port-probe"
#: Seconds one connection attempt may take before the port counts as dropped by a firewall.
CONNECT_TIMEOUT_S = 3.0
#: Seconds a listener lives at most (it exits earlier once every peer has connected).
LISTENER_LIFE_S = 30.0

# Listens on the node's private IP on a kernel-chosen port (from the ephemeral range, where
# Gloo/NCCL, vLLM's master port and Ray's node ports come from) and on a free port of the range
# `up` takes Ray's worker ports from; prints both and the ephemeral range, then forks a detached
# child (own session, stdio on /dev/null so the SSH session can end) that accepts until every
# peer has connected to both ports or its life is over.
_LISTEN_SCRIPT = r"""
import os, random, select, socket, sys, time
mark, ip, lo, hi, expect, life = sys.argv[1], sys.argv[2], *map(float, sys.argv[3:7])
def listen(port):
    s = socket.socket()
    s.bind((ip, port))
    s.listen(128)
    return s
socks = [listen(0)]
for _ in range(200):
    try:
        socks.append(listen(random.randrange(int(lo), int(hi))))
        break
    except OSError:
        continue
else:
    sys.exit("no free port in %d-%d on %s" % (lo, hi - 1, ip))
try:
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        local = "-".join(f.read().split())
except OSError:
    local = "?"
pid = os.fork()
if pid:
    print("ephemeral=%d" % socks[0].getsockname()[1])
    print("worker=%d" % socks[1].getsockname()[1])
    print("local_range=" + local)
    print("pid=%d" % pid)
    sys.stdout.flush()
    os._exit(0)
os.setsid()
null = os.open(os.devnull, os.O_RDWR)
for fd in (0, 1, 2):
    os.dup2(null, fd)
deadline, seen = time.monotonic() + life, 0
while seen < expect * len(socks) and deadline > time.monotonic():
    ready, _, _ = select.select(socks, [], [], max(0.0, deadline - time.monotonic()))
    for s in ready:
        s.accept()[0].close()
        seen += 1
"""

# Connects to every host:port given, all at once, and prints one verdict per target in order:
# open, refused, timeout (dropped on the way) or the error's name.
_CONNECT_SCRIPT = r"""
import socket, sys
from concurrent.futures import ThreadPoolExecutor
limit, targets = float(sys.argv[1]), sys.argv[2:]
def probe(target):
    host, _, port = target.rpartition(":")
    s = socket.socket()
    s.settimeout(limit)
    try:
        s.connect((host, int(port)))
        return "open"
    except ConnectionRefusedError:
        return "refused"
    except (TimeoutError, socket.timeout):
        return "timeout"
    except OSError as e:
        return (e.strerror or "error %s" % e.errno).replace(" ", "_")
    finally:
        s.close()
with ThreadPoolExecutor(max(1, min(64, len(targets)))) as pool:
    for target, verdict in zip(targets, pool.map(probe, targets)):
        print(target, verdict)
"""

_STOP_TEMPLATE = (
    "if grep -qs {mark} /proc/{pid}/cmdline; then kill {pid}; fi; true"  # only our listener
)


@dataclass(frozen=True)
class Listener:
    """A node's probe listener: its two ports, the node's ephemeral range and the process id."""

    ephemeral: int
    worker: int
    local_range: str
    pid: int


@dataclass(frozen=True)
class Target:
    """One connection to try: from node ``src`` to ``port`` on node ``dst`` (``kind`` says
    which port range it stands for)."""

    src: str
    dst: str
    host: str
    port: int
    kind: str  # "gcs", "ephemeral" or "worker"

    @property
    def address(self) -> str:
        """``host:port`` as the connect script takes it."""
        return f"{self.host}:{self.port}"


def listen_command(ip: str, *, peers: int | str, python: str = "python3") -> str:
    """Start a detached listener on ``ip`` (see _LISTEN_SCRIPT) expecting ``peers`` peers."""
    lo, hi = WORKER_BLOCK_RANGE
    argv = [python, "-c", _LISTEN_SCRIPT, LISTENER_MARK, ip, lo, hi, peers, LISTENER_LIFE_S]
    return shell_join(argv)


def connect_command(addresses: Sequence[str], *, python: str = "python3") -> str:
    """Try every ``host:port`` in ``addresses`` at once; one verdict line per address."""
    return shell_join([python, "-c", _CONNECT_SCRIPT, CONNECT_TIMEOUT_S, *addresses])


def stop_listener_command(pid: int | str) -> str:
    """Stop the listener ``pid`` if it is still there and still ours (a str: a placeholder)."""
    return _STOP_TEMPLATE.format(mark=LISTENER_MARK, pid=pid)


def parse_listener(text: str) -> Listener | None:
    """The listener's ``key=value`` lines, or None when it did not start."""
    facts = dict(line.partition("=")[::2] for line in text.splitlines() if "=" in line)
    try:
        return Listener(
            ephemeral=int(facts["ephemeral"]),
            worker=int(facts["worker"]),
            local_range=facts.get("local_range", "?").strip(),
            pid=int(facts["pid"]),
        )
    except (KeyError, ValueError):
        return None


def parse_verdicts(text: str, targets: Sequence[Target]) -> list[tuple[Target, str]]:
    """Each target with the connect script's verdict on it (``no_answer`` when it printed none)."""
    said = dict(line.split(None, 1) for line in text.splitlines() if len(line.split()) == 2)
    return [(t, said.get(t.address, "no_answer").strip()) for t in targets]


def plan_targets(
    ips: Mapping[str, str], listeners: Mapping[str, Listener], *, head: str, gcs_port: int
) -> dict[str, list[Target]]:
    """Every connection to try, per source node: each node to both listener ports of every other
    node (tp/pp groups talk node to node, not only through the head), and each worker to the
    head's GCS port (nothing listens there yet, so ``refused`` is fine)."""
    targets: dict[str, list[Target]] = {name: [] for name in ips}
    for src in ips:
        if src != head:
            targets[src].append(Target(src, head, ips[head], gcs_port, "gcs"))
        for dst, lis in listeners.items():
            if dst != src:
                targets[src].append(Target(src, dst, ips[dst], lis.ephemeral, "ephemeral"))
                targets[src].append(Target(src, dst, ips[dst], lis.worker, "worker"))
    return targets


def passes(target: Target, verdict: str) -> bool:
    """Did the packets get through? To a live probe listener only ``open`` proves it (a
    ``refused`` there is a firewall rejecting); on the GCS port ``refused`` is fine too."""
    return verdict == "open" or (target.kind == "gcs" and verdict == "refused")


def unfinished_listeners(
    listeners: Mapping[str, Listener],
    results: Mapping[str, Sequence[tuple[Target, str]]] | None,
) -> list[str]:
    """Nodes whose listener may still run: some peer did not get through to it (or the
    connections were never tried, ``results`` None). The others accepted every peer and ended."""
    if results is None:
        return list(listeners)
    missed = {
        t.dst for pairs in results.values() for t, v in pairs if t.kind != "gcs" and v != "open"
    }
    return [name for name in listeners if name in missed]


def port_range_words(target: Target, listener: Listener | None) -> str:
    """Which range the port of ``target`` stands for, in words for the error."""
    lo, hi = WORKER_BLOCK_RANGE
    if target.kind == "gcs":
        return "the Ray GCS port"
    if target.kind == "worker":
        return f"Ray's worker ports, {lo}-{hi - 1} (--min-worker-port/--max-worker-port)"
    where = listener.local_range if listener else "?"
    return f"the ephemeral range {where} (Gloo/NCCL, vLLM's master port, Ray's node ports)"


def open_range(listeners: Mapping[str, Listener]) -> tuple[int, int]:
    """The one TCP range that covers Ray's worker ports and every node's ephemeral range."""
    lo, hi = WORKER_BLOCK_RANGE[0], WORKER_BLOCK_RANGE[1] - 1
    for lis in listeners.values():
        first, _, last = lis.local_range.partition("-")
        if first.isdigit() and last.isdigit():
            lo, hi = min(lo, int(first)), max(hi, int(last))
    return lo, hi


def blocked_report(
    results: Mapping[str, Sequence[tuple[Target, str]]],
    *,
    ips: Mapping[str, str],
    listeners: Mapping[str, Listener],
    gcs_port: int,
) -> tuple[str, str] | None:
    """(message, hint) naming every blocked node pair, port and range; None when all pass."""
    bad = [(t, v) for pairs in results.values() for t, v in pairs if not passes(t, v)]
    if not bad:
        return None
    why = {
        "timeout": "timed out (a firewall drops it)",
        "refused": "refused (a firewall rejects it)",
    }
    lines = [
        f"{t.src} ({ips[t.src]}) → {t.dst} ({t.host}) port {t.port}, "
        f"{port_range_words(t, listeners.get(t.dst))}: {why.get(v, v.replace('_', ' '))}"
        for t, v in bad
    ]
    lo, hi = open_range(listeners)
    first = bad[0][0]
    hint = (
        f"allow TCP between the nodes' private IPs, both ways, on port {gcs_port} and "
        f"{lo}-{hi}; e.g. on {first.dst}: `ufw allow proto tcp from {ips[first.src]} to any "
        f"port {gcs_port},{lo}:{hi}` or `iptables -A INPUT -p tcp -s {ips[first.src]} -m "
        f"multiport --dports {gcs_port},{lo}:{hi} -j ACCEPT` (the same for every other node)"
    )
    return "network blocked between nodes: " + "; ".join(lines), hint
