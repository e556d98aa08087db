"""The machine list (deploy/ips.txt) parsed once into a typed, frozen Cluster of Nodes."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

from cluster.errors import ConfigError

DEFAULT_INVENTORY = Path("deploy/ips.txt")

# A host is a DNS name, an IPv4 address or an alias from the user's ~/.ssh/config.
_HOST_RE = re.compile(r"^[A-Za-z0-9_](?:[A-Za-z0-9_.\-]*[A-Za-z0-9_])?$")
# POSIX portable user names (plus Samba's trailing $), at most 32 characters like useradd's.
_USER_RE = re.compile(r"^[A-Za-z0-9_.][A-Za-z0-9_.\-]{0,30}\$?$")
# An IPv6 zone (``fe80::1%eth0``): an interface name or index; the kernel's names are < 16 bytes.
_SCOPE_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,15}$")
_FORMAT_HINT = "expected '[user@]host[:port] [private-ip]', e.g. 'ubuntu@203.0.113.7:22 10.0.0.7'"


@dataclass(frozen=True)
class Node:
    """One machine of the cluster, as written in the inventory (flags' defaults already applied).

    ``user``, ``port`` and ``identity_file`` stay ``None`` unless the line or a flag set them, so
    the user's own ``~/.ssh/config`` (aliases, ProxyJump, IdentityFile, User, Port) decides the rest.
    ``private_ip`` is the address the nodes use among themselves (Ray, Gloo/NCCL); ``None`` means
    preflight finds it. ``local`` nodes are this very machine and are driven without SSH.
    """

    index: int
    host: str
    user: str | None = None
    port: int | None = None
    private_ip: str | None = None
    identity_file: Path | None = None
    local: bool = False
    line: int | None = None

    @property
    def is_head(self) -> bool:
        """The first node of the inventory runs the Ray head and the server."""
        return self.index == 0

    @property
    def name(self) -> str:
        """Role name: ``head`` for the first node, ``worker1``, ``worker2``... for the rest."""
        return "head" if self.index == 0 else f"worker{self.index}"

    @property
    def label(self) -> str:
        """Short unique display name (``host`` or ``host:port``) used to prefix output lines."""
        host = f"[{self.host}]" if ":" in self.host and self.port is not None else self.host
        return f"{host}:{self.port}" if self.port is not None else host

    @property
    def address(self) -> str:
        """The address other nodes reach this one on: the private IP when known, else the host."""
        return self.private_ip or self.host

    def __str__(self) -> str:
        return self.label


@dataclass(frozen=True)
class Cluster:
    """All nodes, head first. Everything else reads the inventory through this object."""

    nodes: tuple[Node, ...]
    source: Path | None = None

    def __post_init__(self) -> None:
        if not self.nodes:
            raise ConfigError("a cluster needs at least one node", hint="list the head first")

    @property
    def head(self) -> Node:
        """The first node: Ray head, server, and where the controller's state points to."""
        return self.nodes[0]

    @property
    def workers(self) -> tuple[Node, ...]:
        """Every node after the head."""
        return self.nodes[1:]

    def __len__(self) -> int:
        return len(self.nodes)

    def __iter__(self):
        return iter(self.nodes)

    def select(self, selectors: Iterable[str]) -> tuple[Node, ...]:
        """Nodes picked by name (``head``, ``worker2``), label, host or index, in inventory order.

        Used by ``--nodes``; an unknown selector is a ConfigError naming the choices.
        """
        wanted = [s.strip() for s in selectors if s.strip()]
        picked: set[int] = set()
        for sel in wanted:
            hits = [
                n.index
                for n in self.nodes
                if sel in (n.name, n.label, n.host, str(n.index), n.private_ip)
            ]
            if not hits:
                choices = ", ".join(f"{n.name} ({n.label})" for n in self.nodes)
                raise ConfigError(f"no node matches {sel!r}", hint=f"choose from: {choices}")
            picked.update(hits)
        return tuple(n for n in self.nodes if n.index in picked)


def _fail(source: str, lineno: int, what: str, *, hint: str = _FORMAT_HINT) -> ConfigError:
    return ConfigError(f"{source}:{lineno}: {what}", hint=hint)


def check_user(user: str, where: str) -> str:
    """``user`` when it is a safe login name, else a ConfigError naming ``where`` it came from."""
    if not _USER_RE.match(user):
        raise ConfigError(
            f"{where}: {user!r} is not a valid user name",
            hint="a user name is letters, digits, '_', '.' and '-' (at most 32), not starting "
            "with '-'",
        )
    return user


def _ipv6(host: str, source: str, lineno: int, what: str, *, hint: str = _FORMAT_HINT) -> str:
    """``host`` parsed as IPv6; a zone (``%eth0``) must be an interface name or number."""
    try:
        addr = ipaddress.IPv6Address(host)
    except ValueError:
        raise _fail(source, lineno, what, hint=hint) from None
    if addr.scope_id is not None and not _SCOPE_RE.match(addr.scope_id):
        raise _fail(
            source,
            lineno,
            f"bad IPv6 zone {addr.scope_id!r} in {host!r}",
            hint="a zone is the interface name or number, e.g. 'fe80::7%eth0'",
        )
    return host


def _split_host_port(text: str, source: str, lineno: int) -> tuple[str, int | None]:
    """``host``, ``host:port``, ``[v6]``, ``[v6]:port`` or a bare IPv6 address (no port)."""
    port_text: str | None = None
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise _fail(source, lineno, f"unclosed '[' in {text!r}")
        host, rest = text[1:end], text[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise _fail(source, lineno, f"unexpected {rest!r} after ']' in {text!r}")
            port_text = rest[1:]
        _ipv6(host, source, lineno, f"{host!r} in brackets is not an IPv6 address")
    elif text.count(":") > 1:
        # A bare IPv6 address: a port can only be given with brackets.
        host = _ipv6(
            text,
            source,
            lineno,
            f"{text!r} is neither host[:port] nor an IPv6 address",
            hint="write IPv6 addresses with a port as '[2001:db8::7]:22'",
        )
    else:
        host, sep, port_text = text.partition(":")
        if not sep:
            port_text = None
        if not _HOST_RE.match(host):
            raise _fail(source, lineno, f"{host!r} is not a valid host name or address")
    port = None if port_text is None else _parse_port(port_text, source, lineno)
    return host, port


def _parse_port(text: str, source: str, lineno: int) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise _fail(
            source,
            lineno,
            f"bad port {text!r}",
            hint="a port is a number from 1 to 65535, e.g. 'ubuntu@10.0.0.7:2222'",
        )
    return int(text)


def parse_node_line(
    text: str,
    *,
    index: int,
    source: str = "<inventory>",
    lineno: int = 1,
    default_user: str | None = None,
    default_port: int | None = None,
    identity_file: Path | None = None,
) -> Node:
    """One inventory line (comment already stripped) into a Node; errors name source and line."""
    fields = text.split()
    if len(fields) > 2:
        raise _fail(source, lineno, f"too many fields in {text.strip()!r}")
    target = fields[0]
    user: str | None = None
    if "@" in target:
        user, _, target = target.rpartition("@")
        check_user(user, f"{source}:{lineno}")
    host, port = _split_host_port(target, source, lineno)
    private_ip: str | None = None
    if len(fields) == 2:
        try:
            parsed = ipaddress.ip_address(fields[1].strip("[]"))
        except ValueError:
            raise _fail(
                source,
                lineno,
                f"private IP {fields[1]!r} is not an IP address",
                hint="the second field is the node's address on the private network, e.g. 10.0.0.7",
            ) from None
        if getattr(parsed, "scope_id", None) is not None:
            raise _fail(
                source,
                lineno,
                f"private IP {fields[1]!r} has an IPv6 zone",
                hint="Ray and Gloo need an address without '%zone': give the node's global or "
                "unique-local address (a zone is fine in the SSH host, the first field)",
            )
        private_ip = str(parsed)
    return Node(
        index=index,
        host=host,
        user=user or default_user,
        port=port if port is not None else default_port,
        private_ip=private_ip,
        identity_file=identity_file,
        line=lineno,
    )


def parse_inventory(
    text: str,
    *,
    source: str = "<inventory>",
    default_user: str | None = None,
    default_port: int | None = None,
    identity_file: str | Path | None = None,
) -> Cluster:
    """Parse inventory text into a Cluster; ``default_*`` come from flags and fill unset fields.

    Raises ConfigError naming ``source`` and the line for a malformed line, a duplicate node
    (same host and port) or a file without nodes.
    """
    if default_port is not None and not 1 <= default_port <= 65535:
        raise ConfigError(f"bad SSH port {default_port}", hint="use a number from 1 to 65535")
    if default_user is not None:
        check_user(default_user, "--ssh-user")
    key = Path(identity_file).expanduser() if identity_file is not None else None
    nodes: list[Node] = []
    seen: dict[tuple[str, int | None], int] = {}
    for lineno, raw in enumerate(text.splitlines(), start=1):
        body = raw.split("#", 1)[0].strip()
        if not body:
            continue
        node = parse_node_line(
            body,
            index=len(nodes),
            source=source,
            lineno=lineno,
            default_user=default_user,
            default_port=default_port,
            identity_file=key,
        )
        ident = (node.host.lower(), node.port)
        if ident in seen:
            raise _fail(
                source,
                lineno,
                f"duplicate node {node.label!r} (already on line {seen[ident]})",
                hint="list each machine once; the head is the first line",
            )
        seen[ident] = lineno
        nodes.append(node)
    if not nodes:
        raise ConfigError(
            f"{source}: no nodes listed",
            hint=f"add one line per machine, head first: {_FORMAT_HINT.split(', ', 1)[1]}",
        )
    return Cluster(nodes=tuple(nodes), source=Path(source) if source != "<inventory>" else None)


def load_inventory(
    path: str | Path = DEFAULT_INVENTORY,
    *,
    default_user: str | None = None,
    default_port: int | None = None,
    identity_file: str | Path | None = None,
) -> Cluster:
    """Read and parse the inventory file once (see ``parse_inventory``); a missing file says how
    to create one."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"inventory {path} not found",
            hint="copy deploy/ips.txt.example to deploy/ips.txt and list your machines, head "
            "first (or pass --inventory FILE, or --local for this machine alone)",
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read inventory {path}: {exc}", hint="check the file") from None
    return parse_inventory(
        text,
        source=str(path),
        default_user=default_user,
        default_port=default_port,
        identity_file=identity_file,
    )


def local_cluster(*, host: str = "127.0.0.1") -> Cluster:
    """A one-node cluster of this machine, driven without SSH (``--local``)."""
    return Cluster(nodes=(Node(index=0, host=host, private_ip=host, local=True),))


def with_local(cluster: Cluster) -> Cluster:
    """The same cluster with every node marked local (all nodes are addresses of this machine)."""
    return replace(cluster, nodes=tuple(replace(n, local=True) for n in cluster.nodes))
