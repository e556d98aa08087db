"""The Ray programs cluster.ray_nodes runs on a node with the shared env's python.

``python -m cluster.remote_ray VERB`` with one JSON request on stdin; one JSON object on the last
line of stdout; on failure a non-zero exit and the reason as one line on stderr (the contract:
cluster/remote.py, docs/CLUSTER.md "Remote programs").

======= ============== ==================================================================
verb    request        reply (``"ok": true`` and ...)
======= ============== ==================================================================
ports   PortsRequest   ``singles``: free ports, ``blocks``: first port of each free block
nodes   NodesRequest   ``nodes``: what the GCS shows, ``resolved``: expected IP -> Ray's
======= ============== ==================================================================
"""

from __future__ import annotations

import random
import socket
import sys
import time
from typing import Any

from pydantic import Field, model_validator

from cluster.remote import Request, Verb, VerbFailed, main

MODULE = "cluster.remote_ray"
"""What ``python -m`` runs."""


class PortsRequest(Request):
    """``count`` single ports (kernel-chosen) and ``blocks`` runs of ``block_size`` consecutive
    free ports inside ``lo``-``hi``, all distinct."""

    count: int = Field(ge=0)
    blocks: int = Field(ge=0)
    block_size: int = Field(ge=1)
    lo: int = Field(ge=1, le=65535)
    hi: int = Field(ge=1, le=65535)

    @model_validator(mode="after")
    def _range_holds_a_block(self) -> PortsRequest:
        if self.hi - self.lo <= self.block_size:
            raise ValueError(f"{self.lo}-{self.hi} cannot hold a block of {self.block_size}")
        return self


class NodesRequest(Request):
    """Poll the GCS at ``address`` (as a driver on ``node_ip``) until every IP of ``expected``
    is alive with at least its device slots (``GPU``), or ``timeout_s`` has passed."""

    address: str = Field(pattern=r"^\S+:\d+$")
    node_ip: str = Field(min_length=1)
    timeout_s: float = Field(ge=0)
    expected: dict[str, float]


def ports(req: PortsRequest) -> dict[str, Any]:
    """Pick the ports on this host, each held until all are picked so none repeats."""
    held: list[socket.socket] = []
    singles: list[int] = []
    starts: list[int] = []

    def grab(port: int) -> int:
        s = socket.socket()
        s.bind(("", port))
        held.append(s)
        return s.getsockname()[1]

    try:
        for _ in range(req.count):
            singles.append(grab(0))
        taken = set(singles)
        for _ in range(req.blocks):
            for _ in range(200):
                start = random.randrange(req.lo, req.hi - req.block_size)
                if any(start <= t < start + req.block_size for t in taken):
                    continue
                socks = len(held)
                try:
                    for p in range(start, start + req.block_size):
                        grab(p)
                except OSError:
                    for s in held[socks:]:
                        s.close()
                    del held[socks:]
                    continue
                starts.append(start)
                taken.update(range(start, start + req.block_size))
                break
            else:
                raise VerbFailed(f"no free block of {req.block_size} ports in {req.lo}-{req.hi}")
    finally:
        for s in held:
            s.close()
    return {"singles": singles, "blocks": starts}


def nodes(req: NodesRequest) -> dict[str, Any]:
    """Join as a short-lived driver and report the nodes once the expected ones are there (or
    at the deadline: the caller names what is missing)."""
    import ray
    from ray._private.services import resolve_ip_for_localhost

    # Ray replaces 127.0.0.1 and localhost by the host's own address: compare what Ray shows.
    resolved = {ip: resolve_ip_for_localhost(ip) for ip in req.expected}
    expected = {resolved[ip]: gpus for ip, gpus in req.expected.items()}
    ray.init(
        address=req.address,
        _node_ip_address=req.node_ip,
        log_to_driver=False,
        logging_level="ERROR",
        namespace="llamacluster-probe",
    )
    deadline = time.monotonic() + req.timeout_s
    while True:
        seen = [
            {"ip": n["NodeManagerAddress"], "alive": n["Alive"], "resources": n["Resources"]}
            for n in ray.nodes()
        ]
        alive = {n["ip"]: n["resources"] for n in seen if n["alive"]}
        if all(ip in alive and alive[ip].get("GPU", 0) >= g for ip, g in expected.items()):
            break
        if time.monotonic() > deadline:
            break
        time.sleep(0.5)
    ray.shutdown()
    return {"nodes": seen, "resolved": resolved}


VERBS: dict[str, Verb] = {
    "ports": Verb(PortsRequest, ports),
    "nodes": Verb(NodesRequest, nodes),
}

if __name__ == "__main__":
    sys.exit(main(VERBS, prog=MODULE))
