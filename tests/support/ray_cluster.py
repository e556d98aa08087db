"""Loopback Ray clusters (127.0.0.1, 127.0.0.2, ...) started with the same code `up` uses."""

from __future__ import annotations

import os
import secrets
import shutil
import sys
import tempfile
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from cluster.errors import NotReadyError, RemoteError
from cluster.files import atomic_write
from cluster.inventory import Node
from cluster.ray_nodes import (
    RayClusterSpec,
    RayNodeHandle,
    RayNodeSpec,
    RayNodeState,
    allocate_ports,
    start_ray_node,
    stop_ray_node,
    wait_for_nodes,
)
from cluster.runner import LocalRunner, Runner
from cluster.stages.ray import ray_cli as ray_cli_of

VENV_BIN = Path(sys.executable).parent


def generate_token() -> str:
    """A fresh cluster token: 32 random bytes, hex."""
    return secrets.token_hex(32)


def write_token_file(path: str | os.PathLike[str], token: str | None = None) -> Path:
    """Write ``token`` (default: a new one) to ``path`` as a 0600 file, atomically.

    Ray's head aborts when the token file is missing or empty, so this runs before ``ray start``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    token = token or generate_token()
    atomic_write(path, token, mode=0o600)
    return path


def start_ray_cluster(
    runners: Sequence[Runner], spec: RayClusterSpec, *, timeout: float = 180, retries: int = 1
) -> list[RayNodeHandle]:
    """Start the head, then every worker in parallel; ``runners[i]`` runs ``spec.nodes[i]``.

    On any failure the nodes already started are stopped again and RemoteError names the
    failed nodes, so a failed start leaves nothing behind.
    """
    if len(runners) != len(spec.nodes):
        raise ValueError("one runner per node spec")
    handles = [start_ray_node(runners[0], spec, 0, timeout=timeout, retries=retries)]
    if len(runners) == 1:
        return handles
    errors: list[str] = []
    with ThreadPoolExecutor(max_workers=min(32, len(runners) - 1)) as pool:
        futures = [
            pool.submit(start_ray_node, runner, spec, i, timeout=timeout, retries=retries)
            for i, runner in enumerate(runners[1:], start=1)
        ]
        for future in futures:
            try:
                handles.append(future.result())
            except RemoteError as exc:
                errors.append(exc.message)
    if errors:
        stop_ray_cluster(runners, handles, grace_s=3)
        raise RemoteError("; ".join(errors), hint=f"see {spec.temp_dir}/session_latest/logs")
    return handles


def stop_ray_cluster(
    runners: Sequence[Runner], handles: Sequence[RayNodeHandle], *, grace_s: float = 10
) -> None:
    """Stop every recorded node, workers first and the head last; raise if any survived.

    ``grace_s`` is how long each node's processes get after TERM before KILL (the GCS server
    often needs the KILL; its state lives in memory only).
    """
    by_label = {r.label: r for r in runners}
    ordered = sorted(handles, key=lambda h: h.head)  # workers first: the head holds the GCS
    failed = []
    for handle in ordered:
        result = stop_ray_node(by_label[handle.node], handle, grace_s=grace_s)
        if not result.ok:
            failed.append(f"{handle.node} (session {handle.session_id}): {result.tail(3)}")
    if failed:
        raise RemoteError("could not stop Ray on " + "; ".join(failed))


@dataclass
class LoopbackRayCluster:
    """A running loopback Ray cluster and what a client needs to use it."""

    spec: RayClusterSpec
    runners: list[LocalRunner]
    handles: list[RayNodeHandle]
    nodes: dict[str, RayNodeState] = field(default_factory=dict)
    stopped: bool = False

    @property
    def address(self) -> str:
        """GCS address (``127.0.0.1:<port>``)."""
        return self.spec.address

    @property
    def gcs_port(self) -> int:
        """The head's GCS port."""
        return self.spec.head_ports.gcs

    @property
    def dashboard_url(self) -> str:
        """``http://127.0.0.1:<port>``; needs ``Authorization: Bearer <token>``."""
        return self.spec.dashboard_url

    @property
    def token_path(self) -> Path:
        """The cluster's 0600 token file."""
        return Path(self.spec.token_path)

    @property
    def token(self) -> str:
        """The cluster's token (for a bearer header)."""
        return self.token_path.read_text().strip()

    @property
    def temp_dir(self) -> Path:
        """Ray's temp dir of this cluster (sessions, logs, sockets)."""
        return Path(self.spec.temp_dir)

    @property
    def env(self) -> dict[str, str]:
        """RAY_AUTH_MODE, RAY_AUTH_TOKEN_PATH and RAY_ADDRESS for a client process."""
        return {
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": self.spec.token_path,
            "RAY_ADDRESS": self.spec.address,
        }

    @property
    def hosts(self) -> list[str]:
        """The loopback addresses the nodes were started on, head first."""
        return [n.ip for n in self.spec.nodes]

    @property
    def node_ips(self) -> list[str]:
        """Node addresses as Ray registered them (127.0.0.1 becomes the host's own address)."""
        return [self.nodes[h].ip if h in self.nodes else h for h in self.hosts]

    @property
    def session_ids(self) -> list[int]:
        """The session id of every node's processes, head first."""
        return [h.session_id for h in self.handles]

    def stop(self) -> None:
        """Stop exactly this cluster's processes and remove its temp dir; safe to repeat."""
        if self.stopped:
            return
        try:
            # A short grace: test clusters hold nothing worth a graceful shutdown.
            stop_ray_cluster(self.runners, self.handles, grace_s=3)
        finally:
            self.stopped = True
            shutil.rmtree(self.spec.temp_dir, ignore_errors=True)


def start_loopback_ray_cluster(
    *,
    nodes: int = 2,
    slots_per_node: int = 2,
    cpus_per_node: int | None = None,
    env: Mapping[str, str] | None = None,
    object_store_mb: int = 256,
    timeout: float = 180,
    ray_cli: Sequence[str] | None = None,
    retries: int = 3,
    attempts: int = 2,
) -> LoopbackRayCluster:
    """Start ``nodes`` Ray nodes on 127.0.0.1, 127.0.0.2, ... with ``slots_per_node`` worker
    slots each (advertised as GPUs, see TESTBED), token auth, direct ingress, free ports and a
    short per-cluster temp dir; returns once every node and slot is registered. ``ray start``
    runs as `up` runs it (cluster/ray_start.py) unless ``ray_cli`` names another command (``()``:
    Ray's own CLI).

    A node whose ``ray start`` succeeded but that never registered (seen once in a CI run on a
    loaded 2-core machine, three nodes) costs ``timeout``; the whole cluster is then stopped and
    started afresh, up to ``attempts`` times in all, the missed attempt's raylet logs printed
    first (pytest shows them with a failure)."""
    for attempt in range(1, attempts + 1):
        try:
            return _start_loopback_ray_cluster(
                nodes=nodes,
                slots_per_node=slots_per_node,
                cpus_per_node=cpus_per_node,
                env=env,
                object_store_mb=object_store_mb,
                timeout=timeout,
                ray_cli=ray_cli,
                retries=retries,
            )
        except NotReadyError as exc:
            if attempt == attempts:
                raise
            print(f"loopback Ray cluster, attempt {attempt}: {exc.message}; starting it again")
    raise AssertionError("unreachable")


def _print_raylet_logs(temp_dir: str, lines: int = 8) -> None:
    """The last lines of every raylet log of the cluster in ``temp_dir``."""
    for path in sorted(Path(temp_dir).glob("session_*/logs/raylet*")):
        if path.is_file():
            tail = path.read_text(errors="replace").splitlines()[-lines:]
            print(f"--- {path}:", *tail, sep="\n")


def _start_loopback_ray_cluster(
    *,
    nodes: int,
    slots_per_node: int,
    cpus_per_node: int | None,
    env: Mapping[str, str] | None,
    object_store_mb: int,
    timeout: float,
    ray_cli: Sequence[str] | None,
    retries: int,
) -> LoopbackRayCluster:
    temp_dir = tempfile.mkdtemp(prefix="lcr-", dir="/tmp")  # short: unix socket paths
    try:
        token = write_token_file(Path(temp_dir) / "token")
        hosts = [f"127.0.0.{i + 1}" for i in range(nodes)]
        runners = [LocalRunner(Node(index=i, host=h, local=True)) for i, h in enumerate(hosts)]
        # All nodes share this host: pick their ports in one go so none collide.
        head_ports, node_ports = allocate_ports(runners[0], nodes=nodes, python=sys.executable)
        spec = RayClusterSpec(
            name=Path(temp_dir).name,
            temp_dir=temp_dir,
            token_path=str(token),
            head_ports=head_ports,
            nodes=tuple(
                RayNodeSpec(
                    ip=h,
                    num_gpus=slots_per_node,
                    num_cpus=cpus_per_node if cpus_per_node is not None else 2 * slots_per_node,
                    ports=p,
                )
                for h, p in zip(hosts, node_ports, strict=True)
            ),
            env={"VLLM_CPU_KVCACHE_SPACE": "1", **(env or {})},
            ray_bin=str(VENV_BIN / "ray"),
            ray_cli=tuple(ray_cli) if ray_cli is not None else ray_cli_of(sys.executable),
            python=sys.executable,
            object_store_memory=object_store_mb * 1024 * 1024,
        )
        # Retries: Ray's fixed 30 s registration limit is tight on a shared 2-core test host.
        handles = start_ray_cluster(runners, spec, timeout=timeout, retries=retries)
    except BaseException:
        shutil.rmtree(temp_dir, ignore_errors=True)
        raise
    cluster = LoopbackRayCluster(spec=spec, runners=runners, handles=handles)
    try:
        cluster.nodes = wait_for_nodes(
            spec.address,
            hosts,
            dict.fromkeys(hosts, slots_per_node),
            token_path=spec.token_path,
            timeout=timeout,
            python=sys.executable,
        )
    except NotReadyError:
        _print_raylet_logs(spec.temp_dir)
        cluster.stop()
        raise
    except BaseException:
        cluster.stop()
        raise
    return cluster
