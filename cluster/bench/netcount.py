"""Network cost per token: each node's interface byte counters read before and after a point."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from cluster.bench.config import Endpoint, LoadPoint
from cluster.bench.metrics import PointMetrics
from cluster.errors import ConfigError, RemoteError
from cluster.runner import Runner, run_on_nodes

_IFACE_RE = re.compile(r"^[A-Za-z0-9_.:@-]{1,15}$")
# sysfs first (one number per file); /proc/net/dev for systems without it. Printed as
# "sys TX RX" or the whole /proc/net/dev after a "proc" line; parsed by parse_counters.
COUNTERS_TEMPLATE = (
    "d=/sys/class/net/{iface}/statistics; "
    'if [ -r "$d/tx_bytes" ] && [ -r "$d/rx_bytes" ]; then '
    'echo "sys $(cat "$d/tx_bytes") $(cat "$d/rx_bytes")"; '
    "else echo proc; cat /proc/net/dev; fi"
)
KB = 1000.0


@dataclass(frozen=True)
class Counters:
    """Bytes an interface has sent (tx) and received (rx) since it came up."""

    tx: int
    rx: int


@dataclass(frozen=True)
class NetNode:
    """One node whose counters are read: its column name, runner, interface, and which
    physical counter it reads (``host_key``: nodes sharing one, e.g. loopback "nodes" on one
    host, are counted once in the total)."""

    name: str
    runner: Runner
    interface: str
    host_key: str


def counters_command(interface: str) -> str:
    """The shell text that prints ``interface``'s counters (see ``parse_counters``)."""
    if not _IFACE_RE.match(interface):
        raise ConfigError(f"bad network interface name {interface!r}")
    return COUNTERS_TEMPLATE.format(iface=interface)


def parse_proc_net_dev(text: str, interface: str) -> Counters:
    """The counters of ``interface`` from /proc/net/dev text (rx bytes is the 1st field after
    the name, tx bytes the 9th)."""
    for line in text.splitlines():
        name, sep, rest = line.partition(":")
        if sep and name.strip() == interface:
            fields = rest.split()
            if len(fields) >= 9:
                return Counters(tx=int(fields[8]), rx=int(fields[0]))
    raise ValueError(f"interface {interface!r} not in /proc/net/dev")


def parse_counters(text: str, interface: str) -> Counters:
    """Counters from the output of ``counters_command``."""
    lines = text.strip().splitlines()
    if lines and lines[0].startswith("sys "):
        _, tx, rx = lines[0].split()
        return Counters(tx=int(tx), rx=int(rx))
    if lines and lines[0].strip() == "proc":
        return parse_proc_net_dev("\n".join(lines[1:]), interface)
    raise ValueError(f"unexpected counter output {text[:80]!r}")


def counter_delta(before: Counters, after: Counters) -> Counters:
    """Bytes moved between two readings; an interface that was reset in between (counters
    going down) cannot tell, which is an error rather than a wrong number."""
    if after.tx < before.tx or after.rx < before.rx:
        raise ValueError("interface counters went backwards (interface reset?)")
    return Counters(tx=after.tx - before.tx, rx=after.rx - before.rx)


def kb_per_token(nbytes: int, tokens: int) -> float:
    """Kilobytes (1000 bytes) per generated token; NaN when no token was generated."""
    return nbytes / KB / tokens if tokens > 0 else float("nan")


def net_columns(
    deltas: dict[str, Counters], *, host_keys: dict[str, str], output_tokens: int
) -> dict[str, float]:
    """The bench columns: kB sent/received per generated token per node and in total.

    The total counts each physical counter once (``host_keys``), so loopback "nodes" sharing
    ``lo`` on one host are not added up twice.
    """
    cols: dict[str, float] = {}
    for name, d in deltas.items():
        cols[f"{name} kB tx/tok"] = kb_per_token(d.tx, output_tokens)
        cols[f"{name} kB rx/tok"] = kb_per_token(d.rx, output_tokens)
    seen: dict[str, Counters] = {}
    for name, d in deltas.items():
        seen.setdefault(host_keys.get(name, name), d)
    cols["net kB tx/tok"] = kb_per_token(sum(d.tx for d in seen.values()), output_tokens)
    cols["net kB rx/tok"] = kb_per_token(sum(d.rx for d in seen.values()), output_tokens)
    return cols


def read_counters(nodes: Sequence[NetNode], *, timeout_s: float = 30.0) -> dict[str, Counters]:
    """Every node's counters now, read in parallel over the runners."""
    iface_of = {n.runner.node: n.interface for n in nodes}
    results = run_on_nodes(
        [n.runner for n in nodes],
        lambda node: counters_command(iface_of[node]),
        timeout=timeout_s,
        what="reading network counters",
    )
    out: dict[str, Counters] = {}
    for n in nodes:
        try:
            out[n.name] = parse_counters(results[n.runner.node].stdout, n.interface)
        except ValueError as exc:
            raise RemoteError(f"{n.name}: cannot read counters of {n.interface}: {exc}") from None
    return out


@dataclass
class NetCounterObserver:
    """A bench PointObserver adding network kB per token columns for the cluster's nodes.

    Counters are read right before and after every measured phase (after the warm-up), and
    the deltas of all rounds of a point are added up. ``endpoint`` limits it to the endpoint
    that is the cluster (compare mode); None measures every endpoint's phases.
    """

    nodes: Sequence[NetNode]
    endpoint: str | None = None
    _before: dict[str, Counters] = field(default_factory=dict)
    _sums: dict[tuple[str, str], dict[str, Counters]] = field(default_factory=dict)

    def _wanted(self, endpoint: Endpoint) -> bool:
        return self.endpoint is None or endpoint.name == self.endpoint

    def phase_started(self, endpoint: Endpoint, point: LoadPoint, round_index: int) -> None:
        """Read the counters before the phase."""
        if self._wanted(endpoint):
            self._before = read_counters(self.nodes)

    def phase_finished(self, endpoint: Endpoint, point: LoadPoint, round_index: int) -> None:
        """Read them after, add the difference to this point's sums."""
        if not self._wanted(endpoint):
            return
        after = read_counters(self.nodes)
        sums = self._sums.setdefault((endpoint.name, point.label), {})
        for name, before in self._before.items():
            d = counter_delta(before, after[name])
            prev = sums.get(name, Counters(0, 0))
            sums[name] = Counters(prev.tx + d.tx, prev.rx + d.rx)

    def columns(
        self, endpoint: Endpoint, point: LoadPoint, metrics: PointMetrics
    ) -> dict[str, float]:
        """kB sent/received per generated token, per node and in total."""
        sums = self._sums.get((endpoint.name, point.label))
        if not sums:
            return {}
        keys = {n.name: n.host_key for n in self.nodes}
        return net_columns(sums, host_keys=keys, output_tokens=metrics.output_tokens)


def cluster_net_nodes(name: str) -> list[NetNode]:
    """The nodes of recorded cluster ``name`` with the interface `up` found on each."""
    from cluster.recorded import RecordedCluster

    recorded = RecordedCluster.load(name)
    state, runners = recorded.state, recorded.runners()
    nodes: list[NetNode] = []
    for runner in runners:
        rec = state.node(runner.node.name)
        if rec is None or not rec.interface:
            raise ConfigError(
                f"cluster {name!r}: no network interface on record for {runner.node.name}",
                hint=f"run `llamacluster up --name {name}` again (preflight records it), "
                "or pass --no-net-counters",
            )
        # One counter per host and network namespace: loopback "nodes" of one host share `lo`,
        # while containers or namespaces on one host each have interfaces of their own.
        host = "/".join(x for x in (rec.machine_id or runner.node.host, rec.net_namespace) if x)
        nodes.append(
            NetNode(
                name=runner.node.name,
                runner=runner,
                interface=rec.interface,
                host_key=f"{host}/{rec.interface}",
            )
        )
    return nodes


def cluster_bench_inputs(
    name: str | None,
    *,
    net_counters: bool | None,
    base_url: str | None,
    model: str | None,
    api_key: str | None,
    api_key_file: object | None,
    endpoints: Sequence[str],
) -> tuple[str | None, str | None, str | None, list[NetCounterObserver]]:
    """What `bench --name CLUSTER` adds: the cluster's endpoint, model and key where the flags
    give none, and the network counter observer (on by default with a cluster, off without)."""
    observers: list[NetCounterObserver] = []
    if name:
        from cluster.endpoint import target_of_cluster

        target = target_of_cluster(name)
        if not base_url and not endpoints:
            base_url = target.base_url
            model = model or target.model
            if api_key is None and api_key_file is None:
                api_key = target.api_key
    want = net_counters if net_counters is not None else bool(name)
    if want:
        if not name:
            raise ConfigError(
                "--net-counters needs the cluster whose nodes to read",
                hint="pass --name CLUSTER (a cluster started with `llamacluster up`)",
            )
        # Only the "main" endpoint (--base-url) is the cluster; with --endpoint alone, every one.
        observers.append(
            NetCounterObserver(cluster_net_nodes(name), endpoint="main" if base_url else None)
        )
    return base_url, model, api_key, observers
