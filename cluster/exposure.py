"""Exposure probe: which of a cluster's ports answer on each node's public address, and how to close them."""

from __future__ import annotations

import errno
import ipaddress
import socket
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

from cluster.state import ClusterState

PROBE_TIMEOUT_S = 1.5
"""How long one connect may take before the port counts as filtered (a firewall drops it)."""

NFT_TABLE = "inet llamacluster"
"""The nftables table and chain the suggested rules go into (created by NFT_SETUP)."""

NFT_SETUP = (
    f"nft add table {NFT_TABLE}; "
    f"nft add chain {NFT_TABLE} input '{{ type filter hook input priority 0; policy accept; }}'"
)

PortKind = Literal["loopback", "api", "ray"]
State = Literal["open", "closed", "filtered", "unreachable"]

#: Head ports of the `ports` section: (field, label, what they should be reachable from).
HEAD_PORTS: tuple[tuple[str, str, PortKind], ...] = (
    ("ray_gcs", "ray gcs", "ray"),
    ("ray_client", "ray client server", "ray"),
    ("dashboard", "ray dashboard", "loopback"),
    ("monitor", "monitor (Prometheus)", "loopback"),
    ("api", "api", "api"),
    ("serve_proxy", "serve proxy", "api"),
)

#: Per-node Ray ports (the ray section's RayNodePorts) worth a connect; the worker range is not.
RAY_NODE_PORTS: tuple[tuple[str, str], ...] = (
    ("node_manager", "ray node manager"),
    ("object_manager", "ray object manager"),
    ("metrics_export", "ray metrics export"),
    ("dashboard_agent_listen", "ray dashboard agent (http)"),
    ("dashboard_agent_grpc", "ray dashboard agent (grpc)"),
    ("runtime_env_agent", "ray runtime env agent"),
)

#: Ports Ray 2.60 opens on the head at fixed numbers, recorded nowhere: (port, label). Ray reads
#: them from AUTOSCALER_METRIC_PORT and DASHBOARD_METRIC_PORT (ray/autoscaler/_private/
#: constants.py, ray/dashboard/consts.py); `up` leaves those unset.
RAY_HEAD_FIXED_PORTS: tuple[tuple[int, str], ...] = (
    (44217, "ray autoscaler metrics"),
    (44227, "ray dashboard metrics"),
)

_GRPC_ANY = (
    "Ray's C++ gRPC server listens on every interface "
    "(src/ray/rpc/grpc_server.cc, GrpcServer::Run: listen_to_localhost_only_ ? 127.0.0.1 : "
    "0.0.0.0); no flag or RAY_ setting names an address"
)
_PROMETHEUS_ANY = (
    "prometheus_client.start_http_server gets an address only when the node IP is a loopback one"
)

#: Why each of these Ray listeners stays on every interface although `ray start` gets the
#: node's private address (--node-ip-address), by probe label. Ray binds the others (client
#: server, dashboard agent http, runtime env agent) to that address, and the dashboard to
#: 127.0.0.1: those must be closed on a public address.
EVERY_INTERFACE: dict[str, str] = {
    "ray gcs": _GRPC_ANY,
    "ray node manager": _GRPC_ANY,
    "ray object manager": _GRPC_ANY,
    "ray dashboard agent (grpc)": (
        "ray/dashboard/agent.py: grpc_ip = get_localhost_ip() if is_localhost(self.ip) "
        "else get_all_interfaces_ip()"
    ),
    "ray metrics export": (
        "ray/dashboard/modules/reporter/reporter_agent.py: "
        'address=get_localhost_ip() if is_localhost(self._ip) else ""'
    ),
    "ray autoscaler metrics": f"ray/autoscaler/v2/monitor.py: {_PROMETHEUS_ANY}",
    "ray dashboard metrics": f"ray/dashboard/head.py: {_PROMETHEUS_ANY}",
}


def cannot_bind(target: ProbeTarget) -> str | None:
    """Why ``target`` listens on every interface whatever `up` passes (None: it is bound to
    the private address or 127.0.0.1, so an open one is a finding to act on)."""
    return EVERY_INTERFACE.get(target.name)


@dataclass(frozen=True)
class ProbeTarget:
    """One port of one node, as the controller reaches the node (its inventory host)."""

    node: str
    host: str
    port: int
    name: str
    kind: PortKind
    private_ip: str | None = None


@dataclass(frozen=True)
class PortFinding:
    """What a TCP connect to a target found."""

    target: ProbeTarget
    state: State
    detail: str = ""


def exposure_targets(state: ClusterState) -> list[ProbeTarget]:
    """Every recorded port of every node, addressed at the node's public address: the
    inventory host (for a cluster on this machine alone, its private address when that is
    not a loopback one; nothing to probe otherwise)."""
    targets: list[ProbeTarget] = []
    for index, node in enumerate(state.nodes):
        host = node.host
        if state.local:
            # The inventory host of a local cluster is 127.0.0.1: what others reach is the
            # private address, when it is not a loopback one too.
            if not node.private_ip or _is_loopback(node.private_ip):
                continue
            host = node.private_ip
        ports: list[tuple[int, str, PortKind]] = []
        if index == 0 and state.ports is not None:
            for field, label, kind in HEAD_PORTS:
                value = getattr(state.ports, field)
                if value:
                    ports.append((int(value), label, kind))
        recorded = state.ray.node(node.name).ports
        for field, label in RAY_NODE_PORTS:
            value = recorded.get(field)
            if value:
                ports.append((int(value), label, "ray"))
        if index == 0 and recorded:  # Ray runs on the head: its fixed metrics ports too
            ports.extend((port, label, "ray") for port, label in RAY_HEAD_FIXED_PORTS)
        seen: set[int] = set()
        for port, label, kind in ports:
            if port in seen:
                continue
            seen.add(port)
            targets.append(
                ProbeTarget(
                    node=node.name,
                    host=host,
                    port=port,
                    name=label,
                    kind=kind,
                    private_ip=node.private_ip,
                )
            )
    return targets


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def probe_port(target: ProbeTarget, *, timeout: float = PROBE_TIMEOUT_S) -> PortFinding:
    """One real TCP connect to ``target``: open (accepted), closed (refused), filtered (no
    answer in ``timeout``), or unreachable (no route, unknown name)."""
    try:
        with socket.create_connection((target.host, target.port), timeout=timeout):
            return PortFinding(target, "open")
    except ConnectionRefusedError:
        return PortFinding(target, "closed")
    except TimeoutError:
        return PortFinding(target, "filtered", f"no answer in {timeout:g} s")
    except socket.gaierror as exc:
        return PortFinding(target, "unreachable", f"cannot resolve {target.host}: {exc.strerror}")
    except OSError as exc:
        if exc.errno == errno.ECONNREFUSED:
            return PortFinding(target, "closed")
        return PortFinding(target, "unreachable", exc.strerror or str(exc))


def probe_ports(
    targets: list[ProbeTarget], *, timeout: float = PROBE_TIMEOUT_S, workers: int = 32
) -> list[PortFinding]:
    """probe_port for every target, in parallel; findings in the targets' order."""
    if not targets:
        return []
    with ThreadPoolExecutor(max_workers=min(workers, len(targets))) as pool:
        return list(pool.map(lambda t: probe_port(t, timeout=timeout), targets))


def closing_rule(target: ProbeTarget, cluster_ips: list[str]) -> str:
    """How to close one open port (pure): the bind address that keeps it off the public
    address, or an nftables rule that admits only the cluster's own nodes."""
    allowed = ", ".join(sorted(set(cluster_ips))) or "<node ips>"
    firewall = (
        f"nft add rule {NFT_TABLE} input ip saddr != {{ {allowed} }} tcp dport {target.port} drop"
    )
    same = target.private_ip is not None and target.private_ip == target.host
    if target.kind == "loopback":
        return f"bind it to 127.0.0.1 (`llamacluster up` does), or on {target.node}: {firewall}"
    if target.kind == "api":
        if same:
            return (
                f"the public and private address are the same ({target.host}): on "
                f"{target.node}: {firewall} (add the clients' addresses to the set)"
            )
        return (
            f"bind it to the private address (`llamacluster up` without --api-host "
            f"binds {target.private_ip or '<private ip>'}), or on {target.node}: {firewall}"
        )
    # Ray's ports must stay reachable from the other nodes: only a firewall tells them apart.
    return f"on {target.node}: {firewall}"


def exposure_report(
    findings: list[PortFinding],
    cluster_ips: list[str],
    worker_ranges: Sequence[tuple[str, int, int]] = (),
) -> list[str]:
    """Lines for a person (pure): one per open (or unreachable-by-error) port with the rule
    that closes it (marked when Ray binds that port to every interface), or one line saying
    nothing is exposed; then the rule for each node's unprobed worker port range."""
    open_ = [f for f in findings if f.state == "open"]
    if not findings:
        return ["exposure: nothing to probe (no public address or no ports on record)"]
    closed = sum(1 for f in findings if f.state in ("closed", "filtered"))
    unbindable = sum(1 for f in open_ if cannot_bind(f.target))
    lines: list[str] = []
    if not open_:
        lines.append(
            f"exposure: none of {len(findings)} port(s) answers on the nodes' public addresses"
        )
    else:
        expected = (
            f"; {unbindable} of them Ray binds to every interface, only a firewall closes those"
            if unbindable
            else ""
        )
        lines.append(
            f"exposure: {len(open_)} of {len(findings)} port(s) answer on the nodes' public "
            f"addresses ({closed} closed or filtered{expected}); to close them (nftables, once "
            f"per node: {NFT_SETUP}):"
        )
        for finding in open_:
            t = finding.target
            why = " (Ray binds it to every interface)" if cannot_bind(t) else ""
            lines.append(
                f"  OPEN {t.node} {t.host}:{t.port} ({t.name}){why}: {closing_rule(t, cluster_ips)}"
            )
    for finding in findings:
        if finding.state == "unreachable":
            t = finding.target
            lines.append(f"  unknown {t.node} {t.host}:{t.port} ({t.name}): {finding.detail}")
    allowed = ", ".join(sorted(set(cluster_ips))) or "<node ips>"
    for node, lo, hi in worker_ranges:
        lines.append(
            f"  not probed: {node} Ray worker ports {lo}-{hi} (Ray binds them to every "
            f"interface): on {node}: nft add rule {NFT_TABLE} input ip saddr != {{ {allowed} }} "
            f"tcp dport {lo}-{hi} drop"
        )
    return lines


def worker_ranges(state: ClusterState) -> list[tuple[str, int, int]]:
    """Each node's recorded Ray worker port range, (node, first, last); the probe skips them."""
    ranges = []
    for node in state.nodes:
        ports = state.ray.node(node.name).ports
        lo, hi = ports.get("min_worker"), ports.get("max_worker")
        if lo and hi:
            ranges.append((node.name, int(lo), int(hi)))
    return ranges


def probe_cluster(
    state: ClusterState, *, timeout: float = PROBE_TIMEOUT_S
) -> tuple[list[PortFinding], list[str]]:
    """Probe every recorded port of ``state`` from here (the controller); the findings and
    the report's lines."""
    targets = exposure_targets(state)
    findings = probe_ports(targets, timeout=timeout)
    ips = [n.private_ip for n in state.nodes if n.private_ip]
    probed = {t.node for t in targets}
    ranges = [r for r in worker_ranges(state) if r[0] in probed]
    return findings, exposure_report(findings, ips, ranges)


def exposure_warnings(state: ClusterState, *, timeout: float = PROBE_TIMEOUT_S) -> list[str]:
    """Preflight's exposure check: probe what of ``state`` already listens (a running cluster,
    a second `up`; on a first `up` nothing does yet) and return the report's lines when a
    port answers on a public address, else nothing. Never raises for what it finds."""
    findings, lines = probe_cluster(state, timeout=timeout)
    if not any(f.state == "open" for f in findings):
        return []
    return [line.strip() for line in lines]
