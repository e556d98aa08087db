"""Serve (the Ray Serve app with tp × pp, redeployed only when its config changed) and ready."""

from __future__ import annotations

import hashlib
import os
import shlex
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from cluster.errors import ConfigError, LlamaclusterError, NotReadyError, RemoteError
from cluster.keys import read_api_keys
from cluster.planner.together import layout_text
from cluster.remote import RemoteCall, Reply, Request
from cluster.stages.base import ClusterContext, Stage, StageCheck, StageOutcome, Teardown, UpContext
from cluster.stages.config import SERVER_FIELDS
from cluster.stages.env import env_dir_for, env_python
from cluster.state import (
    API_KEY_FILE,
    ClusterState,
    ModelSection,
    NodeState,
    ServerSection,
    config_hash,
    further_replicas,
    remote_cluster_dir,
)
from serve.remote import MODULE as SERVE_REMOTE
from serve.remote import (
    DeployRequest,
    KeysRequest,
    PortFreeRequest,
    ReadyRequest,
    StopRequest,
    WaitRequest,
)
from serve.rollout import front_digest

if TYPE_CHECKING:
    from rich.console import Console

    from cluster.planner import ClusterShape, ReplicaChoice
    from cluster.runner import Runner
    from cluster.state import MeasureSection

DEFAULT_APP_NAME = "llamacluster"
"""The Serve application `up` deploys (serve.config's default app name)."""

PORT_RELEASE_WAIT_S = 120
"""How long a redeploy waits for the old server to let go of the API port."""


# RAY_ADDRESS-free env for drivers on the head: token auth with this cluster's token file.
def ray_driver_env(token_path: str) -> dict[str, str]:
    """Environment a Ray driver on the head needs to reach this cluster (token auth)."""
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": token_path}


def default_cpu_kvcache_gb() -> int:
    """KV cache GiB per CPU worker when --cpu-kvcache-gb is not given: the controller's
    VLLM_CPU_KVCACHE_SPACE if set (a shared machine keeps it small), else 4."""
    value = os.environ.get("VLLM_CPU_KVCACHE_SPACE", "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else 4


def serve_call(python: str, verb: str, request: Request) -> RemoteCall:
    """``<python> -m serve.remote <verb>`` with ``request`` as JSON on stdin (the server's
    programs on the head, run with the shared env's python)."""
    return RemoteCall(python, SERVE_REMOTE, verb, request)


def ready_probe(python: str, url: str) -> RemoteCall:
    """Does the app at ``url`` (the API as the head reaches it) answer /ready with 200 now?"""
    return serve_call(python, "ready", ReadyRequest(url=url))


def health_call(python: str, url: str) -> RemoteCall:
    """The server's /health JSON (engine state, restart history) as the head reaches it."""
    return serve_call(python, "health", ReadyRequest(url=url))


def engine_line(health: dict) -> str:
    """One line on the engine from /health's JSON: ``ok``, or ``restarting (attempt 2 of 5,
    cause stall, since ...)``, and the last restarts."""
    engine = health.get("engine") or {}
    state = health.get("status") or engine.get("state") or "?"
    if state in ("restarting", "failed"):
        state += (
            f" (attempt {engine.get('attempt')} of {engine.get('max_attempts')}, cause "
            f"{engine.get('cause')}, since {engine.get('since')})"
        )
    restarts = health.get("restarts") or []
    if restarts:
        last = [f"{r.get('time', '?')} {r.get('cause')}: {r.get('outcome')}" for r in restarts[-3:]]
        state += f"; {len(restarts)} restart(s), last: " + "; ".join(last)
    return state


def replicas_call(
    python: str,
    ray_address: str,
    app_name: str = DEFAULT_APP_NAME,
    *,
    api_key_file: str | None = None,
    ca_file: str | None = None,
) -> RemoteCall:
    """The app's replicas (id, state, nodes, pid, port, log file) from Serve's controller on
    the head; with the head's key file, each replica's running requests and restarts too
    (asked over HTTPS trusting ``ca_file``, the API's certificate, when the API speaks it)."""
    from serve.balancer import MODULE as BALANCER_REMOTE
    from serve.balancer import ReplicasRequest

    return RemoteCall(
        python,
        BALANCER_REMOTE,
        "replicas",
        ReplicasRequest(
            ray_address=ray_address,
            app_name=app_name,
            api_key_file=api_key_file,
            ca_file=ca_file,
        ),
    )


def wait_for_ready(ctx: UpContext, python: str, *, routes: list[str] | None = None) -> Reply:
    """Wait on the head until /ready answers 200 (--ready-timeout at most), and each further
    model's under its route (``routes``, default the recorded ones); the reply says why not."""
    reply = None
    for route in ["", *(ctx.state.server.model_routes if routes is None else routes)]:
        reply = wait_call(
            python,
            local_url(ctx) + route,
            ctx.config.ready_timeout_s,
            api_key_file=ctx.state.server.remote_api_key_file,
        ).run(
            ctx.run_head,
            what="waiting for /ready" + (f" of {route}" if route else ""),
            env=probe_env(ctx.state),
            timeout=ctx.config.ready_timeout_s + 30,
            check=False,
        )
        if not reply.ok:
            return reply
    assert reply is not None
    return reply


def rolling_update(previous: ServerSection, front: str) -> bool:
    """Can the new config roll out over the running app (same front, previous config known)?"""
    return (
        previous.config_digest is not None
        and previous.deployed is not None
        and previous.front_digest == front
    )


def deploy_timeout_s(ready_timeout_s: float, replicas: int) -> float:
    """How long a deploy may take: with several replicas Serve returns once each engine is
    ready, and a rolling update starts them one after another."""
    return max(600.0, ready_timeout_s * max(1, replicas) + 120.0)


# Remove one app's HAProxy directory on the head and its parent when that is left empty; only
# a real directory of this user (a link or another user's directory is left alone).
BALANCER_DIR_REMOVAL_TEMPLATE = (
    'd="/tmp/lchap-$(id -u)"; '
    '[ -d "$d" ] && [ ! -L "$d" ] && [ -O "$d" ] || exit 0; '
    'rm -rf -- "$d"/{tag}; rmdir -- "$d" 2>/dev/null; exit 0'
)


def balancer_dir_removal(app_name: str, port: int) -> str:
    """The shell line that removes app ``app_name``'s HAProxy files (serve.balancer's
    private directory for it and its endpoint ``port``) on the head."""
    from serve.balancer import private_dir_path

    return BALANCER_DIR_REMOVAL_TEMPLATE.format(
        tag=shlex.quote(private_dir_path(app_name, port).name)
    )


def port_free_call(python: str, port: int) -> RemoteCall:
    """Wait until nothing holds ``port`` on the head (PORT_RELEASE_WAIT_S at most)."""
    return serve_call(python, "port-free", PortFreeRequest(port=port, wait_s=PORT_RELEASE_WAIT_S))


def wait_call(
    python: str, url: str, timeout_s: float, *, api_key_file: str | None = None
) -> RemoteCall:
    """Wait until the app at ``url`` answers /ready (fails early when it is not healthy; with
    the head's key file, the failure says why)."""
    return serve_call(
        python, "wait", WaitRequest(url=url, timeout_s=timeout_s, api_key_file=api_key_file)
    )


def stop_call(python: str, ray_address: str, app_name: str = DEFAULT_APP_NAME) -> RemoteCall:
    """Stop (drain and delete) the Serve app ``app_name`` of the cluster at ``ray_address``."""
    return serve_call(python, "stop", StopRequest(ray_address=ray_address, app_name=app_name))


def keys_call(
    python: str, ray_address: str, key_file: str, app_name: str = DEFAULT_APP_NAME
) -> RemoteCall:
    """Make the running app accept exactly the keys of ``key_file`` on the head (within
    seconds, no redeploy); the reply says how many and whether the set changed."""
    return serve_call(
        python,
        "keys",
        KeysRequest(ray_address=ray_address, app_name=app_name, api_key_file=key_file),
    )


def publish_api_keys(state: ClusterState, runner: Runner) -> dict:
    """Copy the controller's key file to the head and have the running server accept exactly
    its keys (`llamacluster keys`); the ``keys`` verb's reply. A clear error when nothing is
    served or the head cannot be reached."""
    head = state.head
    token = state.ray.head_token_path
    if not (state.server.config_digest and head and state.env.dir and state.ports and token):
        raise NotReadyError(
            f"cluster {state.name!r} serves nothing right now",
            hint=f"the key file changed; `llamacluster up --name {state.name}` serves it",
        )
    runner.copy_to(str(state.secrets.api_key_file), remote_key_file(state), mode=0o600, timeout=60)
    address = f"{head.private_ip}:{state.ports.ray_gcs}"
    call = keys_call(env_python(state.env.dir), address, remote_key_file(state))
    return call.run(runner.run, env=ray_driver_env(token), timeout=120).value(
        what="publishing the API keys"
    )


TLS_CERT_FILE = "api.crt"
TLS_KEY_FILE = "api.key"


def controller_tls_files(name: str) -> tuple[Path, Path]:
    """Where the controller keeps the API's certificate (the file clients trust) and, for a
    self-signed one, its key (0600): ``<cluster dir>/tls/``."""
    from cluster.state import cluster_dir

    folder = cluster_dir(name) / "tls"
    return folder / TLS_CERT_FILE, folder / TLS_KEY_FILE


def remote_tls_files(state: ClusterState) -> tuple[str, str]:
    """Where the API's certificate and key live on the head (this cluster's private dir)."""
    folder = remote_cluster_dir(state)
    return f"{folder}/{TLS_CERT_FILE}", f"{folder}/{TLS_KEY_FILE}"


def api_url_on_head(state: ClusterState) -> str:
    """The API as the head itself reaches it: the recorded endpoint (its bind address and
    scheme), else 127.0.0.1 before anything was deployed."""
    if state.server.endpoint:
        return state.server.endpoint
    assert state.ports is not None
    return f"http://127.0.0.1:{state.ports.api}"


def api_target_on_head(state: ClusterState) -> str:
    """``host:port`` of the API as the head reaches it (the monitor's scrape target)."""
    return api_url_on_head(state).split("://", 1)[-1]


def probe_env(state: ClusterState) -> dict[str, str]:
    """Environment of a probe on the head: over HTTPS it trusts the served certificate."""
    if api_url_on_head(state).startswith("https://"):
        return {"SSL_CERT_FILE": remote_tls_files(state)[0]}
    return {}


def local_url(ctx: UpContext) -> str:
    """The API as the head itself reaches it."""
    return api_url_on_head(ctx.state)


def api_bind_host(ctx: UpContext) -> str:
    """The address the API binds on the head: --api-host, else the head's private address."""
    head = ctx.state.nodes[0]
    return ctx.config.api_host or str(head.private_ip or "127.0.0.1")


def prepare_tls(ctx: UpContext, replicas: int = 1) -> str | None:
    """Put the API's certificate and key on the head, and with several replicas on every node
    at the same paths (self-signed ones made first, for the head's addresses); the
    certificate's SHA-256 fingerprint, or None for plain HTTP."""
    from cluster.files import atomic_write
    from cluster.tls import fingerprint_sha256, self_signed

    cfg = ctx.config
    if not cfg.https:
        return None
    cert, key = controller_tls_files(ctx.state.name)
    if cfg.tls == "self-signed":
        head = ctx.state.nodes[0]
        names = [str(head.private_ip), head.host, "127.0.0.1", "localhost"]
        if cfg.api_host and not cfg.api_on_all_interfaces:
            names.insert(0, cfg.api_host)
        names = list(dict.fromkeys(names))
        if self_signed(names, cert_path=cert, key_path=key):
            ctx.reporter.info(f"made a self-signed certificate for {', '.join(names)}: {cert}")
        key_source = key
    else:
        assert cfg.tls_cert is not None and cfg.tls_key is not None
        # The controller keeps a copy of the served certificate: the file clients trust.
        atomic_write(cert, Path(cfg.tls_cert).read_bytes())
        key_source = Path(cfg.tls_key)
    remote_cert, remote_key = remote_tls_files(ctx.state)
    runners = ctx.runners[:1]
    if replicas > 1:
        # A replica on a worker node serves HTTPS too, and Serve gives every replica the same
        # paths (under the head's home): they must be the same place on every node.
        head = ctx.state.nodes[0]
        other = [n for n in ctx.state.nodes[1:] if n.home and head.home and n.home != head.home]
        if other:
            raise ConfigError(
                f"TLS with {replicas} replicas needs the same home directory on every node (head "
                f"{head.home}, {other[0].label} {other[0].home}): the certificate must be at "
                "the same path everywhere",
                hint="use the same SSH user and home on every node, or serve one replica over TLS",
            )
        runners = ctx.runners
    for runner in runners:
        runner.copy_to(cert, remote_cert, mode=0o644, timeout=60)
        runner.copy_to(key_source, remote_key, mode=0o600, timeout=60)
    return fingerprint_sha256(cert)


def plan_parallelism(
    model: str,
    nodes: list[NodeState],
    *,
    tp: int | None = None,
    pp: int | None = None,
    max_model_len: int | None = None,
    cpu_kvcache_gb: int | None = None,
    measured: MeasureSection | None = None,
    quantization: str | None = None,
) -> tuple[int, int]:
    """tp × pp for ``model`` on ``nodes``: the flags when both are given, else the planner's
    smallest layout that fits (tp inside a node first, pp across nodes; a given one is kept).

    Only memory decides the fit, so a GPU node is sized as an H100 with its measured memory
    (or as its card with the measure stage's GPU figures); CPU nodes and the network between
    nodes take what the measure stage recorded, if anything.
    """
    if tp and pp:
        return tp, pp
    from cluster.planner import PlanOptions, choose_parallelism, load_model_shape

    shape = load_model_shape(model)
    cluster = planner_cluster(nodes, cpu_kvcache_gb=cpu_kvcache_gb, measured=measured)
    options = PlanOptions(tp=tp, pp=pp, max_model_len=max_model_len, quantization=quantization)
    return choose_parallelism(shape, cluster, options=options)


CPU_SLOT_EXTRA_GIB = 4.0
"""What the planner gives a CPU worker slot besides its KV cache (weights, runtime), GiB."""


def planner_cluster(
    nodes: list[NodeState],
    *,
    cpu_kvcache_gb: int | None = None,
    measured: MeasureSection | None = None,
) -> ClusterShape:
    """The recorded nodes as the planner sees them (see plan_parallelism)."""
    from cluster.device_specs import get_device
    from cluster.planner import ClusterShape
    from cluster.stages.measure import measured_cpu_spec, measured_gpu_spec, measured_link_gbps

    head = nodes[0]
    if head.device_kind == "gpu":
        mem = min(int(x) for x in head.device_info.get("memory_mib", "0").split(",") if x)
        spec = measured_gpu_spec(nodes, measured) if measured else None
        device = spec or get_device("h100-sxm", memory_gib=mem / 1024 if mem else None)
    else:
        memory = float(cpu_kvcache_gb) + CPU_SLOT_EXTRA_GIB if cpu_kvcache_gb else None
        spec = measured_cpu_spec(nodes, measured, memory_gib=memory) if measured else None
        device = spec or get_device("cpu", memory_gib=memory)
    link = measured_link_gbps(measured) if measured else None
    return ClusterShape(
        nodes=len(nodes),
        devices_per_node=max(1, min(n.devices for n in nodes)),
        device=device,
        **({"link_gbps": link} if link else {}),
    )


def host_memory_gib(node: NodeState) -> float | None:
    """The node's memory as preflight recorded it (None when not recorded)."""
    value = node.device_info.get("mem_total_gb", "")
    try:
        return float(value) if value else None
    except ValueError:
        return None


def replica_choice(ctx: UpContext, tp: int, pp: int) -> ReplicaChoice:
    """How many replicas this `up` serves: an integer --replicas as given; auto: the planner's
    count for the recorded nodes (on CPU nodes only the slots their memory holds, each worker
    with its weights, runtime headroom and KV cache)."""
    from cluster.planner import (
        PlanOptions,
        choose_replicas,
        cpu_memory_slots,
        explicit_replicas,
        load_model_shape,
        worker_memory_gib,
    )

    cfg = ctx.config
    nodes = ctx.state.nodes
    devices = [n.devices for n in nodes]
    if cfg.num_replicas != "auto":
        return explicit_replicas(int(cfg.num_replicas), tp=tp, pp=pp, devices=sum(devices))
    memory = None
    if nodes[0].device_kind == "cpu":
        kv_gb = cfg.cpu_kvcache_gb or default_cpu_kvcache_gb()
        cluster = planner_cluster(nodes, cpu_kvcache_gb=kv_gb, measured=ctx.state.measure)
        options = PlanOptions(max_model_len=cfg.max_model_len, quantization=cfg.quantization)
        try:
            shape = load_model_shape(str(ctx.state.model.dir))
            worker = worker_memory_gib(shape, cluster, tp=tp, pp=pp, options=options)
        except ConfigError:  # the model's config is not readable from here: the slot's size
            worker = CPU_SLOT_EXTRA_GIB
        hosts = [host_memory_gib(n) for n in nodes]
        memory = cpu_memory_slots(devices, hosts, worker_gib=worker, kv_cache_gib=kv_gb)
    choice = choose_replicas(devices, tp=tp, pp=pp, memory_slots=memory)
    if cfg.https and cfg.routing == "prefix" and choice.replicas > 1:
        why = f"{choice.why}; 1 with TLS and prefix routing (its routing step speaks plain HTTP)"
        return choice.model_copy(update={"replicas": 1, "why": why})
    return choice


def default_parallelism(ctx: UpContext) -> tuple[int, int]:
    """tp × pp for this `up` (see plan_parallelism) from the flags and the recorded nodes."""
    cfg = ctx.config
    return plan_parallelism(
        str(ctx.state.model.dir),
        ctx.state.nodes,
        tp=cfg.tp,
        pp=cfg.pp,
        max_model_len=cfg.max_model_len,
        cpu_kvcache_gb=cfg.cpu_kvcache_gb,
        quantization=cfg.quantization,
        measured=ctx.state.measure,
    )


def served_names(asked: list[str], model: str) -> list[str]:
    """The names the server answers to: the asked ones, else the repo id for a hub model (what
    every OpenAI client sends) or the directory's name for a local model."""
    from cluster.stages.download import is_local_model

    if asked:
        return list(dict.fromkeys(asked))
    return [Path(model).expanduser().absolute().name if is_local_model(model) else model]


def remote_admin_key_file(state: ClusterState) -> str:
    """Where the admin key file (--admin-key-file) lives on the head, beside the API key file."""
    return str(PurePosixPath(remote_key_file(state)).with_name("admin_keys"))


def remote_key_file(state: ClusterState) -> str:
    """Where the API key file lives on the head (this cluster's private dir there)."""
    return f"{remote_cluster_dir(state)}/{API_KEY_FILE}"


def model_commit(ctx: UpContext) -> str | None:
    """The commit the first model's download holds (see manifest_commit)."""
    return manifest_commit(ctx, ctx.state.model)


def serve_values(ctx: UpContext, tp: int, pp: int, replicas: int) -> dict[str, object]:
    """The ServeConfig fields `up` deploys (also hashed to tell whether to redeploy); with
    ``replicas`` as resolved (replica_choice)."""
    cfg = ctx.config
    assert ctx.state.ports is not None
    head = ctx.state.nodes[0]
    values: dict[str, object] = {
        "model": ctx.state.model.dir,
        "tp": tp,
        "pp": pp,
        "device": head.device_kind,
        "api_key_file": remote_key_file(ctx.state),
        "port": ctx.state.ports.api,
        "host": api_bind_host(ctx),
        "proxy_port": ctx.state.ports.serve_proxy or ctx.state.ports.api + 2,
        "engine_args": dict(cfg.engine_args),
        "quantization": cfg.quantization,
        "speculative_config": cfg.speculative_config,
        "kv_offload_gb": cfg.kv_offload_gb,
        "num_replicas": replicas,
        **{name: getattr(cfg, name) for name in SERVER_FIELDS},
    }
    if cfg.admin_key_file is not None:
        values["admin_key_file"] = remote_admin_key_file(ctx.state)
    if cfg.https:
        values["tls_certfile"], values["tls_keyfile"] = remote_tls_files(ctx.state)
    values["served_model_name"] = list(ctx.state.model.served_names)
    if cfg.lora:
        from cluster.stages.download import lora_targets

        adapters = lora_targets(cfg.lora, ctx.state.shared_dir)
        values["lora_modules"] = [f"{a.name}={a.dir}" for a in adapters]
    if (commit := model_commit(ctx)) is not None:
        # A hub model: the server checks the manifest is complete and of this commit, and
        # vLLM gets the commit as its revision. A new commit is a new config: redeployed.
        values["revision"] = commit
    if cfg.max_model_len:
        values["max_model_len"] = cfg.max_model_len
    if cfg.gpu_memory_utilization is not None:
        values["gpu_memory_utilization"] = cfg.gpu_memory_utilization
    if head.device_kind == "cpu":
        values["cpu_kvcache_space_gb"] = cfg.cpu_kvcache_gb or default_cpu_kvcache_gb()
        values["cpu_threads"] = cfg.cpu_threads or worker_threads(ctx.state.nodes)
    if cfg.on_node_loss == "replan":
        values["degraded_layout"] = degraded_layout(ctx, tp, pp)
    return values


def manifest_commit(ctx: UpContext, model: ModelSection) -> str | None:
    """The commit a downloaded hub model holds, from its manifest on the head (None: a model
    given as a directory). No manifest there: the download is missing or unfinished."""
    from cluster.download.manifest import manifest_path, parse_manifest

    if model.repo_id is None or not model.dir:
        return None
    path = manifest_path(Path(model.dir))
    read = ctx.run_head(f"cat {shlex.quote(str(path))}", what="reading the manifest", check=False)
    if not read.ok:
        raise NotReadyError(
            f"no readable {path.name} in {model.dir} on the head: the model download "
            "is missing or unfinished",
            hint="run `llamacluster up` again: its download stage resumes and writes it",
        )
    return parse_manifest(read.stdout, where=path).commit


def more_layouts(ctx: UpContext) -> list[tuple[int, int, int]]:
    """(tp, pp, replicas) of each further model: as asked, else the planner's smallest layout
    that fits the model (one replica unless asked)."""
    cfg = ctx.config
    return [
        (
            *plan_parallelism(
                str(m.dir),
                ctx.state.nodes,
                tp=m.tp,
                pp=m.pp,
                max_model_len=m.max_model_len,
                cpu_kvcache_gb=cfg.cpu_kvcache_gb,
                measured=ctx.state.measure,
            ),
            m.replicas or 1,
        )
        for m in ctx.state.more_models
    ]


def more_serve_values(ctx: UpContext, layouts: list[tuple[int, int, int]]) -> list[dict]:
    """Each further model's own ServeConfig fields (serve.models.MODEL_FIELDS); the rest of
    its config is the first model's."""
    from cluster.stages.download import lora_targets

    out = []
    for model, (tp, pp, replicas) in zip(ctx.state.more_models, layouts, strict=True):
        values: dict[str, object] = {
            "model": model.dir,
            "served_model_name": list(model.served_names),
            "tp": tp,
            "pp": pp,
            "num_replicas": replicas,
        }
        if model.max_model_len:
            values["max_model_len"] = model.max_model_len
        if model.lora:
            adapters = lora_targets(model.lora, ctx.state.shared_dir)
            values["lora_modules"] = [f"{a.name}={a.dir}" for a in adapters]
        if (commit := manifest_commit(ctx, model)) is not None:
            values["revision"] = commit
        out.append(values)
    return out


def worker_threads(nodes: list[NodeState]) -> int | None:
    """Compute threads of each CPU worker: on every machine its cores less one per worker slot
    of all nodes on it (the cores left run the replica, the engine core and Ray), at least 1;
    the fewest over the machines (one setting serves every worker). None when preflight
    recorded no core count."""
    from cluster.measure import engine_threads
    from cluster.stages.measure import machine_slots

    slots = machine_slots(nodes)
    counts = [
        engine_threads(int(n.device_info["cpus"]), slots[n.name])
        for n in nodes
        if n.device_kind == "cpu" and str(n.device_info.get("cpus", "")).isdigit()
    ]
    return min(counts) if counts else None


def degraded_layout(ctx: UpContext, tp: int, pp: int) -> tuple[int, int] | None:
    """The planner's layout for the nodes left when a worker node is lost, when it is smaller
    than ``tp × pp`` and the model fits; None otherwise (the server then waits for the node)."""
    cfg = ctx.config
    nodes = ctx.state.nodes
    if len(nodes) < 2:
        return None
    try:
        small = plan_parallelism(
            str(ctx.state.model.dir),
            nodes[:-1],
            max_model_len=cfg.max_model_len,
            cpu_kvcache_gb=cfg.cpu_kvcache_gb,
            quantization=cfg.quantization,
            measured=ctx.state.measure,
        )
    except ConfigError as exc:
        ctx.reporter.warn(
            f"--on-node-loss replan: the model does not fit one node fewer, so the server "
            f"will wait for a lost node ({exc.message})"
        )
        return None
    return small if small[0] * small[1] < tp * pp else None


class Serve(Stage):
    """Deploy the OpenAI server on the Ray cluster; a rerun with the same config changes nothing."""

    name = "serve"
    title = "OpenAI server (vLLM tp × pp on Ray Serve: direct ingress, HAProxy for replicas)"
    sections = ("server",)

    def check(self, ctx: ClusterContext) -> StageCheck:
        """The server is deployed and answers /ready on the head."""
        server = ctx.state.server
        if not server.config_digest or not ctx.state.env.dir or not ctx.state.ports:
            return StageCheck(None, "no server deployed")
        url = api_url_on_head(ctx.state)
        env = probe_env(ctx.state)
        python = env_python(ctx.state.env.dir)
        ready = ready_probe(python, url).run(ctx.run_head, what="ready probe", env=env, check=False)
        names = ", ".join([str(server.served_name), *server.aliases])
        layout = layout_text(server.tp or 1, server.pp or 1, server.replicas)
        what = f"{names}, {layout} at {server.endpoint}/v1"
        health = health_call(python, url).run(ctx.run_head, what="health", env=env, check=False)
        engine = engine_line(health.data.get("health", {})) if health.ok and health.data else "?"
        detail = f"{what} ({'ready' if ready.ok else 'not ready'}; engine {engine})"
        if server.replicas > 1:
            detail += "; " + "; ".join(self._replica_lines(ctx, python))
        all_ready = ready.ok
        for name, route in zip(server.models[1:], server.model_routes, strict=False):
            # A further model: its own app, its /ready under its route.
            one = ready_probe(python, url + route).run(
                ctx.run_head, what=f"ready probe of {name}", env=env, check=False
            )
            all_ready = all_ready and one.ok
            detail += f"; model {name} {'ready' if one.ok else 'not ready'} (at {route})"
        return StageCheck(all_ready, detail)

    @staticmethod
    def _replica_lines(ctx: ClusterContext, python: str) -> list[str]:
        """One entry per replica (node, pid, Serve's state), or why there is none."""
        from serve.balancer import replica_lines

        head = ctx.state.head
        token = ctx.state.ray.head_token_path
        if head is None or not ctx.state.ports or not token:
            return ["replicas unknown (no Ray head recorded)"]
        reply = replicas_call(
            python,
            f"{head.private_ip}:{ctx.state.ports.ray_gcs}",
            api_key_file=ctx.state.server.remote_api_key_file,
            ca_file=probe_env(ctx.state).get("SSL_CERT_FILE"),
        ).run(ctx.run_head, what="replicas", env=ray_driver_env(token), timeout=120, check=False)
        if not reply.ok:
            return [f"replicas unknown ({reply.error})"]
        return replica_lines(reply.value(what="replicas").get("replicas") or []) or ["no replica"]

    def teardown(self, ctx: ClusterContext, how: Teardown) -> str | None:
        """Drain running requests and stop the server (the Serve app) on the head."""
        server = ctx.state.server
        head = ctx.state.head
        token = ctx.state.ray.node(head.name).token_path if head else None
        token = token or ctx.state.ray.head_token_path
        if head is None or not ctx.state.env.dir or not ctx.state.ports or not token:
            return None
        if not server.config_digest:
            return None
        reply = stop_call(
            env_python(ctx.state.env.dir), f"{head.private_ip}:{ctx.state.ports.ray_gcs}"
        ).run(
            ctx.run_head,
            what="stopping the server",
            env=ray_driver_env(token),
            timeout=how.drain_timeout + 60,
            check=False,
        )
        ctx.state.server = ServerSection()
        if not reply.ok:
            ctx.reporter.warn(
                f"could not stop the server cleanly on {head.label}: {reply.error} "
                "(stopping Ray ends it)"
            )
            return None
        removed = ctx.run_head(
            balancer_dir_removal(DEFAULT_APP_NAME, ctx.state.ports.api),
            what="removing HAProxy's files",
            timeout=30,
            check=False,
        )
        if not removed.ok:
            ctx.reporter.warn(f"HAProxy's files stay on {head.label}: {removed.tail(1)}")
        return f"server drained and stopped on {head.label}"

    def plan(self, ctx: UpContext) -> dict[str, list[str]]:
        python = env_python(env_dir_for(ctx))
        tp = ctx.config.tp or "<planner>"
        pp = ctx.config.pp or "<planner>"
        api = ctx.state.ports.api if ctx.state.ports and ctx.state.ports.api else None
        url = f"http://127.0.0.1:{api or '<api-port>'}"
        rec = ctx.state.node(ctx.head.name)
        head_ip = (rec.private_ip if rec else None) or ctx.head.private_ip or ctx.head.host
        gcs = ctx.state.ports.ray_gcs if ctx.state.ports else ctx.config.ray_port
        address = f"{head_ip}:{gcs}"
        config = {
            "model": str(ctx.state.model.dir),
            "tp": tp,
            "pp": pp,
            "num_replicas": "<planner>"
            if ctx.config.num_replicas == "auto"
            else ctx.config.num_replicas,
            "...": "the other ServeConfig fields",
        }
        more = [
            {
                "model": str(m.dir),
                "served_model_name": m.served_names,
                "tp": m.tp or "<planner>",
                "pp": m.pp or "<planner>",
                "num_replicas": m.replicas or 1,
            }
            for m in ctx.state.more_models
        ]
        changed = "only when the serving config changed"
        return {
            ctx.head.label: [
                f"copy {ctx.state.secrets.api_key_file or '<api key>'} -> {remote_key_file(ctx.state)} (0600)",
                ready_probe(python, url).display(
                    "the stage ends here when this config already answers"
                ),
                keys_call(python, address, remote_key_file(ctx.state)).display(
                    "before it ends: publish the key file's keys, with RAY_AUTH_TOKEN_PATH"
                ),
                stop_call(python, address).display(changed + ", with RAY_AUTH_TOKEN_PATH"),
                *([port_free_call(python, api).display(changed)] if api else []),
                serve_call(
                    python,
                    "deploy",
                    DeployRequest(ray_address=address, config=config, more=more),
                ).display("with RAY_AUTH_TOKEN_PATH"),
            ]
        }

    def run(self, ctx: UpContext) -> StageOutcome:
        tp, pp = default_parallelism(ctx)
        choice = replica_choice(ctx, tp, pp)
        total = sum(n.devices for n in ctx.state.nodes)
        layouts = more_layouts(ctx)
        # The further models' groups first; the first model's auto replicas fill what is left
        # (the rule `plan --model A --model B` shows).
        from cluster.planner import ModelLayout, share_devices

        shared = share_devices(
            choice,
            [
                ModelLayout(name=m.served_names[0], tp=t, pp=p, replicas=r)
                for m, (t, p, r) in zip(ctx.state.more_models, layouts, strict=True)
            ],
            first_name=ctx.state.model.served_names[0],
        )
        choice, replicas = shared.first, shared.first.replicas
        others = shared.devices_used - tp * pp * replicas
        if choice.auto:
            ctx.reporter.info(f"--replicas auto: {choice.line()}")
        layout = layout_text(tp, pp, replicas)
        if layouts:
            names = [m.served_names[0] for m in ctx.state.more_models]
            layout = f"{ctx.state.model.served_names[0]}: {layout}; " + "; ".join(
                f"{name}: {layout_text(*one)}" for name, one in zip(names, layouts, strict=True)
            )
        if tp * pp * replicas + others > total:
            raise ConfigError(
                f"{layout} needs {tp * pp * replicas + others} devices, the cluster has {total}",
                hint="lower --replicas or --tp/--pp (a further model's tp=, pp=, replicas=), "
                "serve fewer models, or add nodes (or --cpu-slots on CPU nodes)",
            )
        replicas_total = replicas + sum(r for _, _, r in layouts)
        if choice.auto or layouts:
            # An integer --replicas of one model had its ports checked by preflight.
            from cluster.stages.preflight import check_replica_ports

            check_replica_ports(ctx, replicas_total, may_move=False)
        self._copy_api_key(ctx)
        if ctx.config.api_on_all_interfaces:
            ctx.reporter.warn(
                f"the API listens on every interface of {ctx.head.label} (--api-host "
                f"{ctx.config.api_host}): anyone who reaches a port of the head can try keys on it"
            )
        balanced = replicas_total > 1
        if balanced and not ctx.config.api_on_all_interfaces:
            ctx.reporter.warn(
                f"with {replicas_total} replicas the API (HAProxy) and every replica listen on "
                "every interface of their node (Ray Serve's HAProxy mode): API keys still apply"
            )
        fingerprint = prepare_tls(ctx, replicas_total)
        values = serve_values(ctx, tp, pp, replicas)
        more = more_serve_values(ctx, layouts)
        # A new certificate at the same path is a new config: redeployed (uvicorn reads it once).
        tls = {"tls_fingerprint": fingerprint} if fingerprint else {}
        if more:
            tls["more"] = more
        wanted = config_hash({**values, **tls})
        if ctx.config.admin_key_file is not None:
            ctx.head_runner.copy_to(
                ctx.config.admin_key_file, remote_admin_key_file(ctx.state), mode=0o600, timeout=60
            )
            # Admin keys are read when the server starts: new admin keys redeploy it.
            admin = sorted(read_api_keys(ctx.config.admin_key_file))
            wanted = config_hash(
                {
                    **values,
                    **tls,
                    "admin_keys": [hashlib.sha256(k.encode()).hexdigest() for k in admin],
                }
            )
        python = env_python(str(ctx.state.env.dir))
        leftover = total - tp * pp * replicas - others
        note = f"; {leftover} device slot(s) left idle" if leftover else ""
        head = ctx.node_state(ctx.head)
        token = ctx.state.ray.head_token_path
        assert ctx.state.ports is not None and token
        address = f"{head.private_ip}:{ctx.state.ports.ray_gcs}"
        if ctx.state.server.config_digest == wanted and all(
            ready_probe(python, local_url(ctx) + route)
            .run(ctx.run_head, what="ready probe", env=probe_env(ctx.state), check=False)
            .ok
            # A model whose engine restarts by itself is waited for; any other is redeployed.
            or self._recovers_by_itself(ctx, python, route)
            for route in ["", *ctx.state.server.model_routes]
        ):
            # The config hash names the key file, not its keys: publish them (no redeploy).
            keys = (
                keys_call(python, address, remote_key_file(ctx.state))
                .run(ctx.run_head, what="publishing the API keys", env=ray_driver_env(token))
                .value(what="publishing the API keys")
            )
            if keys.get("changed"):
                return StageOutcome(
                    "done",
                    f"API keys updated ({keys.get('keys')} accepted, no redeploy); "
                    f"already serving {layout}{note}",
                )
            return StageOutcome("unchanged", f"already serving {layout}{note}")
        previous = ctx.state.server
        from serve.models import endpoint_config

        try:
            endpoint_cfg = endpoint_config(values, more)
        except LlamaclusterError as exc:  # two models under one name, ...
            raise ConfigError(exc.message, hint=exc.hint) from None
        # HAProxy reads the certificate when Serve starts it: a new one restarts Serve.
        front = front_digest(endpoint_cfg, tls_fingerprint=fingerprint if balanced else None)
        rolling = rolling_update(previous, front)
        if previous.config_digest is not None and not rolling:
            # The endpoint's ports, TLS or balancing changed (Serve takes them only when it
            # starts), or an older state: stop the old app first, its devices are needed.
            ctx.reporter.info(
                "the endpoint itself changes (ports, TLS or balancing): the old server stops "
                "first, and requests fail until the new one is ready"
            )
            stop_call(python, address).run(
                ctx.run_head,
                what="stopping the old server",
                env=ray_driver_env(token),
                timeout=300,
            )
            self._wait_port_released(ctx, python, ctx.state.ports.api)
        if rolling:
            ctx.reporter.info(
                f"rolling update: the replicas switch one at a time ({replicas_total} "
                "replica(s); "
                + (
                    "the others serve meanwhile)"
                    if replicas_total > 1
                    else "503 + Retry-After while the new engine loads)"
                )
            )
            endpoint = self._roll_out(ctx, python, address, values, previous, more)
        else:
            endpoint = self._deploy(ctx, python, address, values, replicas_total, more)
        redeploy = previous.config_digest is not None
        names = values["served_model_name"]
        assert isinstance(names, list)
        ctx.state.server = ServerSection(
            config_digest=wanted,
            endpoint=endpoint["url"],
            tp=tp,
            pp=pp,
            replicas=replicas,
            served_name=endpoint["model"],
            aliases=names[1:],
            remote_api_key_file=remote_key_file(ctx.state),
            front_digest=front,
            deployed=values,
            deployed_more=more,
            deployed_versions=endpoint.get("versions") or {},
            model_routes=[a.route_prefix for a in endpoint_cfg.endpoint_apps[1:]],
            models=[a.names[0] for a in endpoint_cfg.endpoint_apps] or [endpoint["model"]],
        )
        if leftover:
            ctx.reporter.info(
                f"{leftover} device slot(s) stay idle ({replicas} tp × pp group(s); "
                "--replicas adds more)"
            )
        return StageOutcome(
            "done",
            f"{'re' if redeploy else ''}deployed {endpoint['model']} with {layout}{note}",
        )

    @staticmethod
    def _deploy(
        ctx: UpContext,
        python: str,
        address: str,
        values: dict[str, Any],
        replicas: int,
        more: list[dict[str, Any]],
        versions: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        """Deploy ``values`` and the further models' ``more`` (Serve returns once every replica
        runs: with several, once each engine is ready, so the wait grows with their number);
        ``versions`` as a deploy before returned them keeps the replicas still running those."""
        token = ctx.state.ray.head_token_path
        assert token
        request = DeployRequest(ray_address=address, config=values, more=more,
                                versions=versions or {})  # fmt: skip
        return (
            serve_call(python, "deploy", request)
            .run(
                ctx.run_head,
                what="deploying the server",
                env=ray_driver_env(token),
                timeout=deploy_timeout_s(ctx.config.ready_timeout_s, replicas),
                check=False,  # the reason is the program's last line, not its whole stderr
            )
            .value(what="deploying the server")
        )

    def _roll_out(
        self,
        ctx: UpContext,
        python: str,
        address: str,
        values: dict[str, Any],
        previous: ServerSection,
        more: list[dict[str, Any]],
    ) -> dict[str, Any]:
        """Deploy over the running app and wait until it is ready; when the new config fails
        (its replicas do not start, or never become ready), deploy the previous one again and
        say why. The previous one goes back as the version its replicas ran under: Serve keeps
        those the failed update had not stopped yet and starts only the missing ones."""
        assert previous.deployed is not None
        replicas = int(values.get("num_replicas") or 1) + further_replicas(more)
        try:
            endpoint = self._deploy(ctx, python, address, values, replicas, more)
            self._wait_ready(ctx, python, routes=endpoint.get("routes", []))
            return endpoint
        except (RemoteError, NotReadyError) as exc:
            why = exc.message if isinstance(exc, LlamaclusterError) else str(exc)
        old = str(previous.deployed.get("model") or "the previous model")
        ctx.reporter.warn(f"the new config did not become ready ({why}): rolling back to {old}")
        # The head's key, admin key and certificate files already hold the new config's: make
        # the next `up` deploy again whatever it asks, rather than find its old digest serving.
        ctx.state.server = previous.model_copy(
            update={"config_digest": f"rolled-back:{previous.config_digest}"}
        )
        try:
            self._deploy(
                ctx,
                python,
                address,
                previous.deployed,
                previous.endpoint_replicas,
                previous.deployed_more,
                previous.deployed_versions,
            )
            self._wait_ready(ctx, python, routes=previous.model_routes)
        except (RemoteError, NotReadyError) as exc:
            again = exc.message if isinstance(exc, LlamaclusterError) else str(exc)
            raise NotReadyError(
                f"the new config did not become ready ({why}), and the rollback to {old} "
                f"failed too ({again})",
                hint=f"see `llamacluster logs --name {ctx.state.name}`",
            ) from None
        raise NotReadyError(
            f"the new config did not become ready ({why}); rolled back: {old} serves again",
            hint=f"fix the new config (see `llamacluster logs --name {ctx.state.name}`) and "
            "run `up` again",
        )

    @staticmethod
    def _wait_ready(ctx: UpContext, python: str, *, routes: list[str]) -> None:
        """/ready on the head within --ready-timeout (every model's), or NotReadyError with
        the reason."""
        reply = wait_for_ready(ctx, python, routes=routes)
        if not reply.ok:
            raise NotReadyError(f"not ready: {reply.error}")

    @staticmethod
    def _recovers_by_itself(ctx: UpContext, python: str, route: str = "") -> bool:
        """The deployed server (the model under ``route``) is restarting (or loading) its
        engine by itself, as after a lost node came back: wait for it rather than redeploy
        over the recovery. True once ready."""
        reply = health_call(python, local_url(ctx) + route).run(
            ctx.run_head, what="health probe", env=probe_env(ctx.state), check=False
        )
        if not reply.ok:
            return False
        state = (reply.value(what="health probe").get("health") or {}).get("status")
        if state not in ("restarting", "loading"):
            return False
        which = f"the model under {route}" if route else "the server"
        ctx.reporter.info(f"{which} is {state} its engine by itself: waiting for it")
        return (
            wait_call(
                python,
                local_url(ctx) + route,
                ctx.config.ready_timeout_s,
                api_key_file=ctx.state.server.remote_api_key_file,
            )
            .run(
                ctx.run_head,
                what="waiting for the server",
                env=probe_env(ctx.state),
                timeout=ctx.config.ready_timeout_s + 60,
                check=False,
            )
            .ok
        )

    @staticmethod
    def _wait_port_released(ctx: UpContext, python: str, port: int) -> None:
        """Wait until the old server let go of the API port (the new one must bind it)."""
        wait = port_free_call(python, port)
        holders = f"ss -ltnp 'sport = :{int(port)}' 2>/dev/null | tail -n +2"
        res = ctx.run_head(
            f"{wait.command} || {{ {holders}; exit 1; }}",
            what=f"waiting for port {port} to be free",
            stdin=wait.stdin,
            timeout=PORT_RELEASE_WAIT_S + 30,
            check=False,
        )
        if not res.ok:
            # What ss printed after the program's own reply (a JSON line).
            listeners = [ln for ln in res.stdout.splitlines() if ln.strip() and ln[:1] != "{"]
            held_by = listeners[-1:] or ["(ss shows no listener)"]
            raise RemoteError(
                f"port {port} on {ctx.head.label} is still taken {PORT_RELEASE_WAIT_S} s after "
                f"the old server stopped: {held_by[0][:200]}",
                hint="stop the process that holds it, or pass another --api-port",
            )

    @staticmethod
    def _copy_api_key(ctx: UpContext) -> None:
        src = Path(str(ctx.state.secrets.api_key_file))
        ctx.head_runner.copy_to(src, remote_key_file(ctx.state), mode=0o600, timeout=60)


class Ready(Stage):
    """Wait for /ready on the head, then say how to reach the endpoint."""

    name = "ready"
    title = "server answers /ready"

    def check(self, ctx: ClusterContext) -> StageCheck:
        """Ready is the serve stage's check (/ready answers 200); nothing more to look at."""
        return StageCheck(None, "see serve")

    def plan(self, ctx: UpContext) -> dict[str, list[str]]:
        python = env_python(env_dir_for(ctx))
        port = ctx.state.ports.api if ctx.state.ports else "<api-port>"
        return {
            ctx.head.label: [
                wait_call(python, f"http://127.0.0.1:{port}", ctx.config.ready_timeout_s).display()
            ]
        }

    def run(self, ctx: UpContext) -> StageOutcome:
        reply = wait_for_ready(ctx, env_python(str(ctx.state.env.dir)))
        if not reply.ok:
            why = reply.error
            cause = self._root_cause(ctx)
            if cause and cause not in why:
                why += f"; root cause in the head's logs: {cause}"
            raise NotReadyError(
                f"the server on {ctx.head.label} did not become ready: {why}",
                hint=f"see `llamacluster logs --name {ctx.state.name}`",
            )
        return StageOutcome(
            "unchanged"
            if ctx.state.stages.get("serve", None)
            and ctx.state.stages["serve"].status == "unchanged"
            else "done",
            f"{ctx.state.server.endpoint}/v1 is ready",
        )

    @staticmethod
    def _root_cause(ctx: UpContext) -> str:
        """The engine's last exception line from the head's Ray logs, or "" (best effort)."""
        from cluster.stages.ray import root_cause_command  # ray.py imports this module

        temp_dir = ctx.state.ray.node(ctx.head.name).temp_dir
        if not temp_dir:
            return ""
        res = ctx.run_head(
            root_cause_command(temp_dir),
            what="reading the engine's last error",
            timeout=30,
            check=False,
        )
        return res.stdout.strip() if res.ok else ""


# One replica's files on its node: the Serve log Serve records for it (relative to the logs
# directory) and the stdout/stderr files of its process (Ray names them after the pid).
REPLICA_LOGS_TEMPLATE = (
    "cd {temp}/session_latest/logs 2>/dev/null "
    '|| {{ echo "no Ray logs under {temp} on this node" >&2; exit 1; }}; '
    "set -- {log} $(ls worker-*-{pid}.out worker-*-{pid}.err 2>/dev/null); "
    'tail -n {lines} {follow} "$@"'
)


def replica_logs_command(
    temp_dir: str, log_file_path: str, pid: int | None, *, follow: bool, lines: int
) -> str:
    """Tail (or follow) one replica's Serve log and process output on its node.

    Serve gives the log's path relative to the node's Ray logs directory, with a leading "/"
    (``/serve/replica_<app>_<deployment>_<id>.log``)."""
    path = PurePosixPath(log_file_path.lstrip("/"))
    if ".." in path.parts or not str(path).strip(". "):
        raise RemoteError(f"Serve reported an unexpected log path {log_file_path!r}")
    return REPLICA_LOGS_TEMPLATE.format(
        temp=shlex.quote(temp_dir),
        log=shlex.quote(str(path)),
        pid=int(pid or 0),
        lines=int(lines),
        follow="-F" if follow else "",
    )


def replica_logs(
    name: str,
    replica: int,
    *,
    follow: bool = False,
    lines: int = 200,
    console: Console | None = None,
) -> int:
    """Print (or follow) replica ``replica``'s logs (numbered as `status` lists them) from the
    node it runs on; returns the exit code."""
    from cluster.recorded import RecordedCluster
    from cluster.runner import prefixed_printer
    from cluster.state import load_state

    state = load_state(name)
    head = state.head
    token = state.ray.head_token_path
    if not (state.server.config_digest and head and state.env.dir and state.ports and token):
        raise NotReadyError(
            f"cluster {name!r} serves nothing right now", hint="run `llamacluster up` first"
        )
    recorded = RecordedCluster(state)
    table = (
        replicas_call(env_python(state.env.dir), f"{head.private_ip}:{state.ports.ray_gcs}")
        .run(recorded.head_runner().run, env=ray_driver_env(token), timeout=120)
        .value(what="reading the replica table")
        .get("replicas")
        or []
    )
    if not 1 <= replica <= len(table):
        raise ConfigError(
            f"cluster {name!r} has {len(table)} replica(s), not a replica {replica}",
            hint=f"see `llamacluster status --name {name}` for the replicas",
        )
    row = table[replica - 1]
    node = next((n for n in state.nodes if n.private_ip == row.get("node_ip")), None)
    if node is None or not row.get("log_file_path"):
        raise NotReadyError(
            f"replica {replica} has no log file on a recorded node yet "
            f"({row.get('state')} on {row.get('node_ip') or '?'})",
            hint="wait until it runs, or see `llamacluster logs` for the head's logs",
        )
    temp_dir = state.ray.node(node.name).temp_dir
    if not temp_dir:
        raise ConfigError(f"no Ray on record on {node.label}", hint="run `llamacluster up`")
    command = replica_logs_command(
        temp_dir, row["log_file_path"], row.get("pid"), follow=follow, lines=lines
    )
    runner = recorded.runners([node.name])[0]
    return runner.run(command, on_line=prefixed_printer(console)).returncode
