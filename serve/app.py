"""The Ray Serve application: replicas each owning a tp×pp vLLM engine, and their lifecycle."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import os
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ray import serve

from cluster.errors import ConfigError, NotReadyError
from serve.api import BodyLimits, Gateway, ServerState, install_http_limits, key_digest
from serve.balancer import HAPROXY_ENV
from serve.config import (
    DEVICE_RESOURCE,
    MODEL_APP_SEPARATOR,
    ServeConfig,
    check_device_slots,
    cluster_slots,
    placement_bundles,
)
from serve.keystore import (
    KEY_POLL_INTERVAL_S,
    forget_key_digests,
    load_key_digests,
    publish_key_digests,
)

logger = logging.getLogger(__name__)

# Ray Serve reads these in the controller and in the replica. Setting them through runtime_env
# makes direct ingress (the replica itself listens, no proxy hop) and the endpoint port work even
# when `ray start` ran without them.
DIRECT_INGRESS_ENV = "RAY_SERVE_ENABLE_DIRECT_INGRESS"
DRAIN_ENV = "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"
PORT_MIN_ENV = "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"
PORT_MAX_ENV = "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"
# Serve holds a dead replica's port back this long (150 s by default) so that HAProxy workers
# drop it first. With one replica there is no HAProxy and the endpoint has exactly one port: a
# replacement replica would wait that long before it could listen. With several, the ports are
# this app's own range, so a reused port still leads to a replica of the same app.
PORT_QUARANTINE_ENV = "RAY_SERVE_PORT_QUARANTINE_S"
APP_ENV = "LLAMACLUSTER_APP"
MEDIA_REDIRECTS_ENV = "VLLM_MEDIA_URL_ALLOW_REDIRECTS"
USER_CODE_THREAD_ENV = "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD"
AOT_COMPILE_ENV = "VLLM_USE_AOT_COMPILE"
# Serve keeps a stopping direct-ingress replica listening this long even when it has no request,
# so that an external load balancer can deregister it first. Nothing sits in front of our one
# replica, so it stops as soon as its running requests finish (bounded by --drain-timeout).
MIN_DRAINING_PERIOD_S = "0"
# With several replicas HAProxy is in front, and Serve tells it about a stopping replica by a
# reload (a new HAProxy process, about 0.5-1 s on a busy 2-core head). Until then the old
# process routes to the stopping replica, and if it is the only one there (the last old replica
# of a rolling update) a refusal has nowhere else to go: 503. So it stays reachable this long.
BALANCED_DRAINING_PERIOD_S = "5"
# Serve's controller checks every replica, proxy and deployment on each turn of its control loop
# (0.1 s by default), and every turn is calls to Ray's GCS and raylet: 0.02-0.03 cores that the
# engine shares on a small CPU node. A turn every 0.5 s delays each state change Serve makes
# (a replica started, one drained) by 0.4 s at most, next to engine starts of 10 s and more.
# Measured on 2 cores under load (docs/BENCHMARKS.md, "Server overhead, both servers up"): the
# CPU the rest of the machine took beside our server, above plain vLLM's, fell from 0.013-0.025
# cores to 0.003-0.021.
CONTROL_LOOP_ENV = "RAY_SERVE_CONTROL_LOOP_INTERVAL_S"
CONTROL_LOOP_INTERVAL_S = "0.5"


def draining_period_s(config: ServeConfig) -> str:
    """How long a stopping replica keeps accepting requests (Serve's setting, seconds)."""
    return BALANCED_DRAINING_PERIOD_S if config.balanced else MIN_DRAINING_PERIOD_S


# Ray's internal key-value store keeps each app's restart history, so it outlives a replica that
# Ray Serve replaced (the controller can read it there too).
HISTORY_KV_NAMESPACE = "llamacluster"


def history_kv_key(app_name: str) -> str:
    """The internal-KV key of an app's restart history."""
    return f"restarts/{app_name}"


def _stored_key_digests(app_name: str) -> list[bytes] | None:
    """The published digests when the KV answers (a replica Serve replaced must not fall back
    to the keys of the original deploy), else None."""
    with contextlib.suppress(Exception):
        return load_key_digests(app_name)
    return None


class VllmSession:
    """One vLLM engine (AsyncLLM with its tp × pp Ray workers) and vLLM's OpenAI app on it:
    its workers go in the replica's placement group, or in ``placement_group`` when given."""

    def __init__(self, config: ServeConfig, placement_group: Any = None) -> None:
        self.config = config
        self.placement_group = placement_group
        self.app: Any = None
        self.engine: Any = None
        self._stack = contextlib.AsyncExitStack()
        self._last_output: float | None = None

    async def open(self) -> VllmSession:
        from serve import vllm_glue

        try:
            vllm_glue.check_vllm_version()
            args = vllm_glue.parse_vllm_args(self.config)
            engine = await self._stack.enter_async_context(
                vllm_glue.engine_client(args, self.placement_group)
            )
            self.engine = engine
            vllm_glue.on_engine_output(engine, self._saw_output)
            app = await vllm_glue.build_openai_app(engine, args)
            await self._stack.enter_async_context(app.router.lifespan_context(app))
        except BaseException:
            with contextlib.suppress(Exception):
                await self._stack.aclose()
            raise
        self.app = app
        logger.info(
            "engine loaded: %s tp=%d pp=%d", self.config.model, self.config.tp, self.config.pp
        )
        return self

    def _saw_output(self) -> None:
        self._last_output = time.monotonic()

    def dead(self) -> str | None:
        from serve import vllm_glue

        err = vllm_glue.engine_failed(self.engine)
        return None if err is None else f"{type(err).__name__}: {err}"

    def in_flight(self) -> int:
        from serve import vllm_glue

        return vllm_glue.unfinished_requests(self.engine)

    def last_output(self) -> float | None:
        return self._last_output

    async def probe(self) -> None:
        from serve import vllm_glue

        await vllm_glue.generate_one_token(self.engine, request_id=f"ready-{uuid.uuid4().hex}")

    async def close(self) -> None:
        await self._stack.aclose()


@serve.ingress()
class LlamaclusterServer:
    """Serve replica: loads the engine in the background and serves it behind the Gateway.

    The HTTP endpoint is up at once (so /health and /ready answer while the model loads); the
    engine, vLLM's OpenAI app and the readiness probe arrive when loading finishes. A watchdog
    (serve/watchdog.py) restarts a dead, stalled or failing engine inside the replica and keeps
    answering 503 + Retry-After meanwhile.
    """

    def __init__(
        self,
        config: ServeConfig,
        api_key_digests: list[bytes],
        admin_key_digests: list[bytes] | None = None,
    ) -> None:
        from serve.placement import EnginePlacement, wait_for_own_placement
        from serve.reuse_address import listen_with_reuse_address
        from serve.watchdog import RestartPolicy, Supervisor, history_from_json

        self.config = config
        # Before Serve starts this replica's HTTP server (after the constructor).
        listen_with_reuse_address()
        install_http_limits(
            header_timeout_s=config.header_timeout_s, max_connections=config.max_connections
        )
        policy = RestartPolicy(
            stall_timeout_s=config.stall_timeout_s,
            max_attempts=config.restart_max_attempts,
            backoff_s=config.restart_backoff_s,
            backoff_max_s=config.restart_backoff_max_s,
            probe_interval_s=config.ready_probe_interval_s,
            probe_idle_interval_s=config.ready_probe_idle_interval_s,
        )
        # /ready turns false when the last good probe is older than this: past the longest
        # wait between two probes (an idle engine's), with room for a slow one.
        self.state = ServerState(
            probe_max_age_s=max(
                6 * config.ready_probe_interval_s, 2 * policy.longest_probe_interval_s, 30.0
            )
        )
        if config.balanced:
            from serve.haproxy_hooks import report_engine_readiness

            # HAProxy's health check (/-/healthz) fails while the engine loads or restarts.
            state = self.state
            report_engine_readiness(
                lambda: None if state.unavailable() is None else state.status_word()
            )
        self.gateway = Gateway(
            self.state,
            api_key_digests=_stored_key_digests(config.key_app) or api_key_digests,
            no_auth=config.no_auth,
            max_ongoing_requests=config.max_ongoing_requests,
            retry_after_s=config.retry_after_s,
            request_timeout_s=config.request_timeout_s,
            max_body_bytes=config.max_body_bytes,
            add_request_id=False,
            admin_key_digests=admin_key_digests or [],
            stream_idle_timeout_s=config.stream_idle_timeout_s,
            body_limits=BodyLimits(
                max_n=config.max_n,
                max_tokens=config.max_tokens_limit,
                allowed_media_domains=frozenset(config.allowed_media_domains),
            ),
        )
        if len(config.endpoint_apps) > 1:
            from serve.models import model_routes

            self.gateway.models = model_routes(config)
        # Degraded serving: the engine's devices are in a group of its own (serve/placement.py).
        self.placement = (
            None
            if config.degraded_layout is None
            else EnginePlacement(
                full=(config.tp, config.pp),
                small=config.degraded_layout,
                device_key=DEVICE_RESOURCE,
                open_session=lambda tp, pp, pg: VllmSession(
                    config.model_copy(update={"tp": tp, "pp": pp}), pg
                ).open(),
            )
        )
        own = self.placement
        self.supervisor = Supervisor(
            state=self.state,
            policy=policy,
            start=(lambda: VllmSession(config).open()) if own is None else own.start,
            end_in_flight=self.gateway.end_in_flight,
            history=history_from_json(_load_history(config.app_name)),
            on_history=lambda items: _store_history(config.app_name, items),
            wait_for_placement=wait_for_own_placement if own is None else own.wait_full,
            degraded=own,
        )

    @property
    def engine(self) -> Any:
        """The current vLLM engine (None while loading or restarting)."""
        session = self.supervisor.session
        return None if session is None else getattr(session, "engine", None)

    async def __serve_build_asgi_app__(self):
        """Ray Serve's late-bound ingress hook: start loading; return the gateway right away
        with one replica (it answers 503 + Retry-After while loading), or once the engine is
        ready with several (Serve adds a replica to HAProxy's table, and goes on with a rolling
        update, only when it has started; a failed or endless load is its failed start)."""
        self.supervisor.launch()
        if self.config.balanced:
            from serve.balancer import wait_for_engine

            try:
                await wait_for_engine(self.state, self.supervisor.health_problem)
            except BaseException:
                with contextlib.suppress(Exception):
                    await self.supervisor.aclose()
                raise
        if not self.config.no_auth:
            # Every model of an endpoint accepts the keys published for its first app.
            app_name = self.config.key_app
            self._key_follower = asyncio.ensure_future(
                self.gateway.follow_key_digests(
                    lambda: load_key_digests(app_name), interval_s=KEY_POLL_INTERVAL_S
                )
            )
        if self.config.balanced:
            from serve.balancer import all_ready_app

            # /ready?all=1 asks every replica; the rest is this replica's own gateway.
            return all_ready_app(self.gateway, self.config)
        return self.gateway

    def unfinished_requests(self) -> int:
        """Requests the engine tracks right now (running + waiting); -1 without an engine."""
        session = self.supervisor.session
        return -1 if session is None else session.in_flight()

    async def check_health(self) -> None:
        """Ray Serve's health check: failing it makes Serve replace the replica (a new process
        and placement group). The watchdog restarts a faulty engine inside the replica first;
        this fails only when that gave up or the watchdog itself stopped working."""
        if (problem := self.supervisor.health_problem()) is not None:
            raise RuntimeError(problem)

    async def __del__(self) -> None:
        if (follower := getattr(self, "_key_follower", None)) is not None:
            follower.cancel()
        with contextlib.suppress(Exception):
            await self.supervisor.aclose()
        if (placement := getattr(self, "placement", None)) is not None:
            await placement.release()


def _load_history(app_name: str) -> list[dict[str, Any]]:
    """The restart history a previous replica of this app stored, if any."""
    with contextlib.suppress(Exception):
        from ray.experimental import internal_kv

        raw = internal_kv._internal_kv_get(history_kv_key(app_name), namespace=HISTORY_KV_NAMESPACE)
        if raw:
            return json.loads(raw)
    return []


# One thread stores the restart history, in order: the put is a blocking GCS call, and the
# replica's event loop (which also answers Serve's health checks) must not wait on it.
_HISTORY_WRITER = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="history")


def _store_history(app_name: str, items: list[dict[str, Any]]) -> None:
    from ray.experimental import internal_kv

    def put() -> None:
        try:
            internal_kv._internal_kv_put(
                history_kv_key(app_name),
                json.dumps(items),
                overwrite=True,
                namespace=HISTORY_KV_NAMESPACE,
            )
        except Exception:
            logger.exception("could not store the restart history")

    _HISTORY_WRITER.submit(put)


def _forget_history(app_name: str) -> None:
    with contextlib.suppress(Exception):
        from ray.experimental import internal_kv

        internal_kv._internal_kv_del(history_kv_key(app_name), namespace=HISTORY_KV_NAMESPACE)


@dataclass(frozen=True)
class Endpoint:
    """Where a deployed server answers."""

    url: str
    app_name: str
    model: str
    host: str
    port: int
    # The route prefix of each other model of the endpoint (its /ready is under it).
    routes: tuple[str, ...] = ()
    # The version each app's replicas were deployed as (app name -> version): deployed again
    # with it, the replicas still running it are kept.
    versions: dict[str, str] = field(default_factory=dict)


def replica_env(config: ServeConfig) -> dict[str, str]:
    """Environment of the replica (and, through vLLM, of its workers): Ray actors do not
    inherit the caller's environment."""
    env = {
        DIRECT_INGRESS_ENV: "1",
        DRAIN_ENV: draining_period_s(config),
        # Names the app in every process it starts (engine core, workers), for `ps e` and tests.
        APP_ENV: config.app_name,
        # Media is fetched only from --allowed-media-domains, and a redirect must not lead
        # elsewhere (vLLM follows redirects by default).
        MEDIA_REDIRECTS_ENV: "0",
        # The gateway and vLLM run on the replica's own event loop: by default Serve gives user
        # code a second loop in another thread, and every ASGI message of a stream (one per
        # token) crosses between the two (benchmarks/profile_server.py: 0.132 -> 0.099 CPU ms
        # per output token in the replica at c=64; plain vLLM's API server 0.083).
        USER_CODE_THREAD_ENV: "0",
    }
    if config.balanced:
        # A stopping replica stops accepting once its draining period is over: HAProxy
        # retries a refused connection on another replica.
        env[HAPROXY_ENV] = "1"
    if config.device == "cpu":
        env["VLLM_CPU_KVCACHE_SPACE"] = str(config.cpu_kvcache_space_gb or 4)
        # vLLM 0.32 cannot load the AOT-compiled model it saved on CPU ("'function' object has
        # no attribute 'finalize_loading'"), so every start compiled again; without AOT, the
        # Inductor cache is read back (benchmarks/bench_compile_cache.py: vLLM's init of a
        # restarted engine 12.2 s -> 4.3 s).
        env[AOT_COMPILE_ENV] = "0"
        if config.cpu_threads is not None:
            # Read by torch when each engine worker (a child of this replica) starts.
            env["OMP_NUM_THREADS"] = str(config.cpu_threads)
    else:
        env["LLAMACLUSTER_CPU_PLATFORM"] = "0"
    return env


def controller_env(config: ServeConfig, balancer_dir: str | None = None) -> dict[str, str]:
    """Environment of the Serve controller: direct ingress on, endpoint port fixed, a control
    loop turn every 0.5 s; with several replicas, HAProxy mode with its files in
    ``balancer_dir`` (serve/balancer.py)."""
    if config.balanced:
        from serve.balancer import balancer_env

        assert balancer_dir is not None, "HAProxy mode needs a private directory"
        return {
            DIRECT_INGRESS_ENV: "1",
            DRAIN_ENV: draining_period_s(config),
            PORT_QUARANTINE_ENV: "0",
            CONTROL_LOOP_ENV: CONTROL_LOOP_INTERVAL_S,
            **balancer_env(config, balancer_dir),
        }
    return {
        DIRECT_INGRESS_ENV: "1",
        CONTROL_LOOP_ENV: CONTROL_LOOP_INTERVAL_S,
        DRAIN_ENV: MIN_DRAINING_PERIOD_S,
        PORT_MIN_ENV: str(config.port),
        PORT_MAX_ENV: str(config.port + 1),
        PORT_QUARANTINE_ENV: "0",
    }


def build_application(config: ServeConfig, api_keys: list[str], version: str | None = None):
    """The bound Serve application for one config (its replicas, placement groups, env); with
    ``routing`` prefix and several replicas, with its ingress request router
    (serve/prefix_router.py) beside it.

    ``version`` names what the replicas run. Serve restarts every replica of another version
    and keeps those of the same one, so a config deployed again with the version it ran under
    (a rollback) keeps its replicas that still run; without one, each deploy is a new version
    (Serve's own choice when none is given)."""
    prefix_routing = config.balanced and config.routing == "prefix"
    routing_options: dict[str, Any] = {}
    if prefix_routing:
        from ray.serve.config import RequestRouterConfig

        from serve.prefix_router import PrefixPolicy, PrefixRequestRouter

        routing_options["request_router_config"] = RequestRouterConfig(
            request_router_class=PrefixRequestRouter,
            request_router_kwargs=PrefixPolicy().model_dump(),
        )
    deployment = serve.deployment(
        LlamaclusterServer,
        name="LlamaclusterServer",
        num_replicas=config.num_replicas,
        # Our Gateway answers 429 past config.max_ongoing_requests; Serve must never throttle
        # first (its default of 5 starves an LLM engine).
        max_ongoing_requests=config.max_ongoing_requests + 64,
        max_queued_requests=-1,
        placement_group_bundles=placement_bundles(config),
        placement_group_strategy="PACK",
        ray_actor_options={
            "num_cpus": config.engine_cpus,
            "runtime_env": {"env_vars": replica_env(config)},
        },
        health_check_period_s=10,
        # A replica whose engine cannot load fails the same way again (a broken or missing
        # model, too little memory): the deploy (and a rolling update, which `up` then rolls
        # back) fails after replicas + 1 failed starts in all, not Serve's 3 per replica.
        max_constructor_retry_count=config.num_replicas + 1,
        health_check_timeout_s=60,
        # A stopping replica checks for running requests this often; Serve's 2 s default
        # made every idle `down` wait two loops.
        graceful_shutdown_wait_loop_s=0.25,
        graceful_shutdown_timeout_s=config.drain_timeout_s + 30,
        **routing_options,
    )
    # Only key digests and a config without keys reach the replica: Ray keeps constructor
    # arguments in its own store, and secrets must not sit there.
    keyless = config.model_copy(
        update={"api_keys": [], "api_key_file": None, "admin_key_file": None}
    )
    # Serve took `version` out of its public options, yet still honours one set by its own code.
    deployment = deployment.options(version=version or uuid.uuid4().hex[:16], _internal=True)
    admin = [key_digest(k) for k in config.resolved_admin_keys()]
    app = deployment.bind(keyless, [key_digest(k) for k in api_keys], admin)
    if prefix_routing:
        from serve.config import HEAD_RESOURCE
        from serve.prefix_router import router_application

        router_env = {k: v for k, v in replica_env(config).items() if k != APP_ENV}
        router = router_application(app, env_vars=router_env, head_resource=HEAD_RESOURCE)
        # Ray's internal hook for an ingress request router (its LLM stack uses the same).
        app = app._with_ingress_request_router(router)
        _deploying_process_in_haproxy_mode()
    return app


def _deploying_process_in_haproxy_mode() -> None:
    """Ray's build step refuses an ingress request router unless the *deploying* process runs
    in HAProxy mode, a switch Ray reads from the environment once, when ray.serve is imported
    (the controller and the replicas get it through their runtime env, controller_env)."""
    from ray.serve._private import build_app

    os.environ[HAPROXY_ENV] = "1"
    build_app.RAY_SERVE_ENABLE_HA_PROXY = True


def _connect(ray_address: str | None) -> None:
    """Join the Ray cluster as a driver (unless the caller already did)."""
    import ipaddress

    import ray

    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = {}
    host = (ray_address or "").rsplit(":", 1)[0]
    with contextlib.suppress(ValueError):
        if ipaddress.ip_address(host).is_loopback:
            # Several Ray "nodes" on one host (127.0.0.x): a driver must say which one it is on.
            kwargs["_node_ip_address"] = host
    ray.init(
        address=ray_address or "auto",
        log_to_driver=False,
        logging_level=logging.WARNING,
        **kwargs,
    )


def deploy(
    config: ServeConfig,
    *,
    ray_address: str | None = None,
    more: Sequence[ServeConfig] = (),
    versions: dict[str, str] | None = None,
) -> Endpoint:
    """Start the server detached on an existing Ray cluster; returns where it will answer.

    With ``more``, one endpoint serves several models: ``config``'s app at route / and each
    other model as an app of its own behind the same HAProxy (serve/models.py), with the
    endpoint's settings (ports, TLS, keys) taken from ``config``.

    ``versions`` (app name -> version, as a deploy returned them) deploys those apps as the
    versions they ran under: their replicas that still run are kept (build_application).

    Checks the cluster has tp×pp device slots first. The applications outlive the caller
    (Serve is detached); wait_until_ready() tells when it serves.
    """
    if more:
        from serve.models import endpoint_configs

        configs = endpoint_configs([config, *more])
    else:
        configs = [config]
    config = configs[0]
    api_keys = config.resolved_api_keys()
    if not api_keys and not config.no_auth:
        raise ConfigError("no API key configured", hint="pass --api-key or --no-auth")
    if config.no_auth:
        logger.warning("serving WITHOUT authentication: anyone who reaches the port can use it")
    if not config.balanced and config.routing != "least-load":
        logger.warning("routing %s has no effect with one replica", config.routing)
    _connect(ray_address)
    # A redeploy keeps its own slots; a fresh one needs them free.
    fresh = [c for c in configs if _existing_app(c.app_name) is None]
    if fresh:
        check_device_slots(cluster_slots(), *fresh)
    if api_keys:
        # Before the replica starts: it prefers the published keys to its constructor's.
        publish_key_digests(config.key_app, [key_digest(k) for k in api_keys])
    http_options: dict[str, Any] = {"host": config.host, "port": config.proxy_port}
    balancer_dir = None
    if config.balanced and config.tls_certfile is not None:
        _check_balancer_tls(str(config.tls_certfile))
    if config.balanced:
        from serve.balancer import private_dir

        # HAProxy listens on the endpoint port (Serve's own proxy, its fallback, on
        # proxy_port), on the head only.
        http_options.update(host=_balanced_host(config), port=config.port, location="HeadOnly")
        balancer_dir = private_dir(config.app_name, config.port)
    if config.tls_certfile is not None and config.tls_keyfile is not None:
        # Serve's direct-ingress replica starts its uvicorn with the controller's HTTP options
        # (its own port swapped in), so the endpoint and the proxy both speak HTTPS.
        http_options["ssl_certfile"] = str(config.tls_certfile)
        http_options["ssl_keyfile"] = str(config.tls_keyfile)
    versions = {c.app_name: (versions or {}).get(c.app_name) or uuid.uuid4().hex[:16]
                for c in configs}  # fmt: skip
    serve.start(
        http_options=http_options,
        controller_options={"runtime_env": {"env_vars": controller_env(config, balancer_dir)}},
    )
    if len(configs) == 1:
        serve.run(
            build_application(config, api_keys, versions[config.app_name]),
            name=config.app_name,
            route_prefix="/",
            blocking=False,
        )
    else:
        # One deploy for every model: their engines load at the same time.
        serve.run_many(
            [
                serve.RunTarget(
                    target=build_application(one, api_keys, versions[one.app_name]),
                    name=one.app_name,
                    route_prefix=one.route_prefix,
                )
                for one in configs
            ]
        )
    host = head_address() if config.host in ("0.0.0.0", "::", "") else config.host
    port = config.port
    actual = None if config.balanced else _listening_port(config.app_name)
    if actual is not None and actual != port:
        # Serve was already running with other options (they apply only when it starts).
        logger.warning(
            "the endpoint listens on port %d, not %d: Ray Serve was started earlier with other "
            "options; stop every application (serve-stop) to apply new ones",
            actual,
            port,
        )
        port = actual
    return Endpoint(
        url=f"{config.scheme}://{host}:{port}",
        app_name=config.app_name,
        model=config.main_name,
        host=host,
        port=port,
        routes=tuple(c.route_prefix for c in configs[1:]),
        versions=versions,
    )


def _check_balancer_tls(cert: str) -> None:
    """HTTPS through HAProxy needs our edits of Ray's config template: refuse in one line,
    before anything starts, when this Ray's template is not the expected one."""
    from ray.serve._private import haproxy

    from serve.haproxy_hooks import balancer_template

    if balancer_template(haproxy.HAPROXY_CONFIG_TEMPLATE, cert) is None:
        raise ConfigError(
            "this Ray's HAProxy config template is not the one llamacluster edits for HTTPS",
            hint="serve one replica over TLS, or several without TLS, or use the pinned Ray",
        )


def _balanced_host(config: ServeConfig) -> str:
    """The bind address of HAProxy and of every replica (Serve has one for all of them):
    every interface. HAProxy reaches each replica at the address Serve records for it (on a
    one-node cluster that can be 127.0.0.1 while the API's address is another one), and a
    replica on another node cannot bind the head's address anyway."""
    if config.host not in ("0.0.0.0", "::", ""):
        logger.warning(
            "%d replicas: the endpoint and each replica listen on every interface, not only %s "
            "(API keys still apply; firewall the ports from outside the cluster)",
            config.endpoint_replicas,
            config.host,
        )
    return "0.0.0.0" if config.host != "::" else "::"


def _listening_port(app_name: str) -> int | None:
    """The port the app's replica actually listens on (Serve's own routing table), if known."""
    from ray.serve.context import _get_global_client

    with contextlib.suppress(Exception):
        controller = _get_global_client()._controller
        import ray

        groups = ray.get(controller.get_target_groups.remote(app_name), timeout=30)
        ports = {t.port for g in groups if g.protocol == "HTTP" for t in g.targets}
        if len(ports) == 1:
            return ports.pop()
    return None


def _existing_app(app_name: str) -> Any:
    with contextlib.suppress(Exception):
        return serve.status().applications.get(app_name)
    return None


def head_address() -> str:
    """Address of the Ray node that advertises the head resource (where the replica runs)."""
    import ray

    from serve.config import HEAD_RESOURCE

    for node in ray.nodes():
        if node.get("Alive") and node.get("Resources", {}).get(HEAD_RESOURCE, 0) > 0:
            return node["NodeManagerAddress"]
    raise NotReadyError(f"no alive Ray node advertises {HEAD_RESOURCE}")


def shutdown(app_name: str, *, ray_address: str | None = None) -> bool:
    """Stop one application, and the other models' apps of its endpoint with it (running
    requests get the drain period); stop Serve when no other application is left. Returns False
    when no such application ran."""
    _connect(ray_address)
    apps = _serve_apps()
    if apps is None:
        return False
    found = app_name in apps
    names = [app_name, *(a for a in apps if a.startswith(f"{app_name}{MODEL_APP_SEPARATOR}"))]
    for name in names:
        if name in apps:
            serve.delete(name)
            _forget_history(name)
            with contextlib.suppress(Exception):
                forget_key_digests(name)
    if not (set(apps) - set(names)):
        serve.shutdown()
    return found


def _serve_apps() -> dict[str, Any] | None:
    """The Serve applications of the connected cluster, or None when Serve is not running."""
    from ray.serve.context import _get_global_client

    try:
        _get_global_client()
    except Exception:
        return None
    return dict(serve.status().applications)
