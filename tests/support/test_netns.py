"""The namespace test hosts are separate where it matters: network stack, counters, /dev/shm."""

from __future__ import annotations

import socket
import sys
import threading
import uuid
from pathlib import Path

from cluster.bench.netcount import counter_delta, counters_command, parse_counters
from cluster.inventory import parse_inventory
from cluster.runner import SSHRunner
from serve.shm_domain import shm_domain

REPO = Path(__file__).resolve().parents[2]


def test_namespace_hosts_have_own_network_and_shm(netns_hosts) -> None:
    hosts = netns_hosts(2)
    cluster = parse_inventory(hosts.inventory_text(), identity_file=hosts.client_key)
    head, worker = (SSHRunner(n, hosts.ssh_config()) for n in cluster)

    namespaces = {
        r.node.host: r.run("readlink /proc/self/ns/net").stdout.strip() for r in (head, worker)
    }
    assert len(set(namespaces.values())) == 2
    assert Path("/proc/self/ns/net").readlink().as_posix() not in namespaces.values()
    # The node's address sits on its own eth0.
    assert f"inet {hosts.addresses[1]}/24" in worker.run("ip -o -4 addr show dev eth0").stdout

    # vLLM's CPU communicator tells the nodes' shared memory apart (serve/shm_domain.py).
    domain = f"{sys.executable} {REPO / 'serve' / 'shm_domain.py'}"
    domains = {r.run(domain).stdout.strip() for r in (head, worker)}
    assert len(domains) == 2 and shm_domain() not in domains

    # A file in one node's /dev/shm is not in the other's, nor in the host's.
    name = f"lc-test-{uuid.uuid4().hex}"
    head.run(f"echo x > /dev/shm/{name}")
    assert worker.run(f"test -e /dev/shm/{name}; echo $?").stdout.strip() == "1"
    assert not (Path("/dev/shm") / name).exists()

    # Bytes the head sends show in the head's eth0 counters, not in the worker's.
    def read(runner: SSHRunner):
        return parse_counters(runner.run(counters_command("eth0")).stdout, "eth0")

    received: list[int] = []
    with socket.create_server((hosts.gateway, 0)) as server:
        port = server.getsockname()[1]

        def drain() -> None:
            conn, _ = server.accept()
            with conn:
                received.append(sum(iter(lambda: len(conn.recv(65536)), 0)))

        thread = threading.Thread(target=drain)
        thread.start()
        before = read(head), read(worker)
        sent = head.run(
            f'python3 -c \'import socket; s=socket.create_connection(("{hosts.gateway}", {port})); '
            "s.sendall(bytes(2_000_000)); s.close()'"
        )
        assert sent.returncode == 0, sent.stderr
        thread.join(timeout=30)
    assert received == [2_000_000]
    head_delta, worker_delta = (
        counter_delta(before[0], read(head)),
        counter_delta(before[1], read(worker)),
    )
    assert 2_000_000 <= head_delta.tx < 2_500_000
    assert worker_delta.tx < 200_000 and worker_delta.rx < 200_000  # its own SSH reads only
