"""Ray's real binds on a node with a public and a private address, and what the exposure probe
finds on the public one: a network-namespace node reached over SSH, Ray started by the code and
environment `up` uses."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest

from cluster.exposure import EVERY_INTERFACE, RAY_HEAD_FIXED_PORTS, cannot_bind, probe_cluster
from cluster.inventory import Node
from cluster.ray_nodes import (
    RayClusterSpec,
    RayHeadPorts,
    RayNodePorts,
    RayNodeSpec,
    start_ray_node,
    stop_ray_node,
)
from cluster.runner import SSHRunner, shell_join
from cluster.stages.ray import node_env
from cluster.state import ClusterState, NodeState, Ports, RayNode, RaySection
from tests.support.ray_cluster import write_token_file

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

PRIVATE_IFACE = "priv0"
PRIVATE_IP = "198.19.7.2"  # on an interface of its own, as a cluster NIC is
NODE_PORTS = RayNodePorts(
    node_manager=21001,
    object_manager=21002,
    metrics_export=21003,
    dashboard_agent_listen=21004,
    dashboard_agent_grpc=21005,
    runtime_env_agent=21006,
    min_worker=21100,
    max_worker=21163,
)
HEAD_PORTS = RayHeadPorts(gcs=21010, dashboard=21011, client_server=21012)
API_PORT = 21020  # nothing listens: the API is not part of this test

# On a Ray worker of the node: a Gloo process group (vLLM's CPU transport) initialised as vLLM's
# Ray executor does it (tcp://VLLM_HOST_IP:port), then this process's listening sockets.
GLOO_TASK = """
import json, os, sys, psutil, ray
ray.init(address=sys.argv[1])
@ray.remote(num_cpus=0)
def gloo_listeners():
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"tcp://{os.environ['VLLM_HOST_IP']}:21030",
                            world_size=1, rank=0)
    dist.new_group(backend="gloo")
    conns = psutil.Process().net_connections(kind="tcp")
    out = [[c.laddr.ip, c.laddr.port] for c in conns if c.status == psutil.CONN_LISTEN]
    dist.destroy_process_group()
    return {"env": {k: os.environ.get(k) for k in ("VLLM_HOST_IP", "GLOO_SOCKET_IFNAME")},
            "listen": out}
print("RESULT " + json.dumps(ray.get(gloo_listeners.remote())))
"""


def _host(addr: str) -> str:
    """A listening address as one word: ``*`` for every interface, IPv4-mapped made plain."""
    host = addr.strip("[]").removeprefix("::ffff:")
    return "*" if host in ("*", "0.0.0.0", "::", "") else host


def listening(hosts, index: int) -> dict[int, set[str]]:
    """Port -> the addresses it listens on inside node ``index`` (``ss -ltn``)."""
    binds: dict[int, set[str]] = {}
    for line in hosts.run_in(index, "ss", "-Hltn").splitlines():
        local = line.split()[3]
        addr, port = local.rsplit(":", 1)
        binds.setdefault(int(port), set()).add(_host(addr))
    return binds


def test_ray_binds_what_it_can_to_the_private_address_and_the_probe_agrees(
    tmp_path: Path, netns_hosts
) -> None:
    hosts = netns_hosts(1)
    ns, public = hosts.namespaces[0], hosts.addresses[0]
    for args in (
        ["link", "add", PRIVATE_IFACE, "type", "veth", "peer", "name", "priv1"],
        ["addr", "add", f"{PRIVATE_IP}/24", "dev", PRIVATE_IFACE],
        ["link", "set", "priv1", "up"],
        ["link", "set", PRIVATE_IFACE, "up"],
    ):
        subprocess.run(["ip", "-n", ns, *args], check=True)
    token = write_token_file(tmp_path / "ray" / "token")
    node = Node(
        index=0, host=public, user=hosts.user, port=hosts.port, identity_file=hosts.client_key
    )
    runner = SSHRunner(node, hosts.ssh_config())
    record = NodeState(
        name="head", label=public, host=public, private_ip=PRIVATE_IP, interface=PRIVATE_IFACE
    )
    spec = RayClusterSpec(
        name="exposure-ray",
        temp_dir=f"/tmp/lc-exp-{hosts.tag}",
        token_path=str(token),
        nodes=(RayNodeSpec(ip=PRIVATE_IP, num_gpus=0, num_cpus=1, ports=NODE_PORTS),),
        head_ports=HEAD_PORTS,
        env=node_env(record, None),  # what the ray stage passes: VLLM_HOST_IP, GLOO_SOCKET_IFNAME
        ray_bin=str(Path(sys.executable).parent / "ray"),
        python=sys.executable,
    )
    handle = start_ray_node(runner, spec, 0, timeout=180)
    try:
        fixed = [port for port, _ in RAY_HEAD_FIXED_PORTS]
        wanted = {*fixed, NODE_PORTS.dashboard_agent_grpc, NODE_PORTS.metrics_export}
        deadline = time.monotonic() + 60
        while not wanted <= set(binds := listening(hosts, 0)) and time.monotonic() < deadline:
            time.sleep(1)  # the agents come up after `ray start` returns
        print("\n" + json.dumps({p: sorted(a) for p, a in sorted(binds.items())}))

        # Bound to the private address (and loopback) by --node-ip-address: never every interface.
        private_only = {
            HEAD_PORTS.client_server: "ray client server",
            NODE_PORTS.dashboard_agent_listen: "ray dashboard agent (http)",
            NODE_PORTS.runtime_env_agent: "ray runtime env agent",
        }
        for port, label in private_only.items():
            assert binds[port] and binds[port] <= {PRIVATE_IP, "127.0.0.1"}, (label, binds[port])
            assert PRIVATE_IP in binds[port], (label, binds[port])
        assert binds[HEAD_PORTS.dashboard] == {"127.0.0.1"}
        # What Ray 2.60 cannot bind (EVERY_INTERFACE says why): still every interface.
        every = {
            HEAD_PORTS.gcs,
            NODE_PORTS.node_manager,
            NODE_PORTS.object_manager,
            NODE_PORTS.dashboard_agent_grpc,
            NODE_PORTS.metrics_export,
            *fixed,
        }
        for port in every:
            assert binds[port] == {"*"}, (port, binds[port])

        # The probe from the controller, at the node's public address.
        state = ClusterState(
            name="exposure-ray",
            nodes=[record],
            ports=Ports(
                ray_gcs=HEAD_PORTS.gcs,
                dashboard=HEAD_PORTS.dashboard,
                api=API_PORT,
                ray_client=HEAD_PORTS.client_server,
            ),
            ray=RaySection(nodes={"head": RayNode(ports=asdict(NODE_PORTS))}),
        )
        findings, lines = probe_cluster(state, timeout=2.0)
        print("\n".join(lines))
        states = {f.target.port: f.state for f in findings}
        assert {p for p, s in states.items() if s == "open"} == every
        assert all(states[p] == "closed" for p in [*private_only, HEAD_PORTS.dashboard, API_PORT])
        assert {f.target.name for f in findings if cannot_bind(f.target)} == set(EVERY_INTERFACE)
        opened = [ln for ln in lines if ln.lstrip().startswith("OPEN")]
        assert len(opened) == len(every)
        assert all("(Ray binds it to every interface)" in ln for ln in opened)
        assert f"{len(every)} of them Ray binds to every interface" in lines[0]
        assert any(
            f"worker ports {NODE_PORTS.min_worker}-{NODE_PORTS.max_worker}" in ln for ln in lines
        )

        # A worker of this node carries the private address and interface; Gloo binds there,
        # torch's TCPStore (rendezvous) on every interface.
        argv = [sys.executable, "-c", GLOO_TASK, f"{PRIVATE_IP}:{HEAD_PORTS.gcs}"]
        done = runner.run(
            shell_join(argv),
            env={"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)},
            timeout=120,
        )
        assert done.ok, (done.stdout[-2000:], done.stderr[-2000:])
        result = json.loads(done.stdout.split("RESULT ", 1)[1].splitlines()[0])
        assert result["env"] == {"VLLM_HOST_IP": PRIVATE_IP, "GLOO_SOCKET_IFNAME": PRIVATE_IFACE}
        listens = {(_host(ip), port) for ip, port in result["listen"]}
        print(f"worker listens on {sorted(listens)}")
        assert ("*", 21030) in listens  # torch's TCPStore: documented as unbindable
        workers = range(NODE_PORTS.min_worker, NODE_PORTS.max_worker + 1)
        assert {ip for ip, port in listens if port in workers} == {"*"}  # Ray's worker gRPC
        gloo = {ip for ip, port in listens if port != 21030 and port not in workers}
        assert gloo == {PRIVATE_IP}, listens
    finally:
        stop_ray_node(runner, handle)
        shutil.rmtree(spec.temp_dir, ignore_errors=True)
        runner.close()
