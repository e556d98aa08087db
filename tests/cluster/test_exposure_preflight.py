"""Preflight's exposure check: ports of a running cluster that answer on a node's public address
are warned about with the rule that closes them, and never fail preflight."""

from __future__ import annotations

import io
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console

from cluster.exposure import exposure_warnings
from cluster.inventory import Cluster, Node
from cluster.lifecycle import UpConfig
from cluster.runner import LocalRunner
from cluster.stages.base import Reporter, UpContext
from cluster.stages.preflight import Preflight
from cluster.state import Access, ClusterState, NodeState, Ports


@contextmanager
def listening(host: str) -> Iterator[int]:
    """A TCP listener on ``host`` at a free port, for the block's duration."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        sock.listen(8)
        yield sock.getsockname()[1]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _context(tmp_path: Path, ports: Ports) -> tuple[UpContext, io.StringIO]:
    # This machine as a node reached at 127.0.0.1 (its "public" address) whose private address
    # is 127.0.0.2, with the ports a previous `up` recorded.
    node = Node(index=0, host="127.0.0.1", private_ip="127.0.0.2", local=True)
    cluster = Cluster(nodes=(node,))
    state = ClusterState(
        name="pf-exposure", access=Access(local=False), shared_dir=str(tmp_path), ports=ports
    )
    out = io.StringIO()
    ctx = UpContext(
        config=UpConfig(local=True),
        cluster=cluster,
        state=state,
        runners=[LocalRunner(n) for n in cluster],
        reporter=Reporter(Console(file=out, width=400)),
    )
    return ctx, out


def test_preflight_warns_about_a_listening_port_on_the_public_address_and_passes(
    tmp_path: Path,
) -> None:
    with listening("127.0.0.1") as exposed, listening("127.0.0.2") as private:
        ports = Ports(ray_gcs=_free_port(), dashboard=private, api=exposed, monitor=_free_port())
        ctx, out = _context(tmp_path, ports)
        outcome = Preflight().run(ctx)
    assert outcome.status in ("done", "unchanged")
    text = out.getvalue()
    warned = [ln for ln in text.splitlines() if "warning:" in ln]
    assert any("exposure: 1 of " in ln for ln in warned), text
    open_lines = [ln for ln in warned if "OPEN " in ln]
    assert len(open_lines) == 1, text
    assert f"127.0.0.1:{exposed} (api)" in open_lines[0]
    assert "bind it to the private address" in open_lines[0] and "127.0.0.2" in open_lines[0]
    assert str(private) not in "\n".join(warned)  # bound elsewhere: closed, not warned about


def test_preflight_of_a_first_up_says_nothing_about_exposure(tmp_path: Path) -> None:
    ports = Ports(ray_gcs=_free_port(), dashboard=_free_port(), api=_free_port(), monitor=None)
    ctx, out = _context(tmp_path, ports)
    Preflight().run(ctx)
    assert "exposure" not in out.getvalue()


def test_exposure_warnings_are_empty_unless_a_port_answers() -> None:
    node = NodeState(name="head", label="h", host="127.0.0.1", private_ip="127.0.0.2")
    with listening("127.0.0.2") as private:
        state = ClusterState(
            name="w", nodes=[node], ports=Ports(ray_gcs=private, dashboard=private, api=private)
        )
        assert exposure_warnings(state, timeout=2.0) == []
    with listening("127.0.0.1") as exposed:
        state.ports = Ports(ray_gcs=exposed, dashboard=_free_port(), api=_free_port())
        lines = exposure_warnings(state, timeout=2.0)
    assert lines[0].startswith("exposure: 1 of 3 port(s)")
    assert lines[1].startswith(
        f"OPEN head 127.0.0.1:{exposed} (ray gcs) (Ray binds it to every interface): "
        "on head: nft add rule"
    )
