"""The Ray Serve application: one replica on the head owning a tp×pp vLLM engine, and its lifecycle."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

from ray import serve

from cluster.errors import ConfigError, NotReadyError
from serve.api import Gateway, ServerState, key_digest
from serve.config import ServeConfig, check_device_slots, cluster_slots, placement_bundles

logger = logging.getLogger(__name__)

# Ray Serve reads these in the controller and in the replica. Setting them through runtime_env
# makes direct ingress (the replica itself listens, no proxy hop) and the endpoint port work even
# when `ray start` ran without them.
DIRECT_INGRESS_ENV = "RAY_SERVE_ENABLE_DIRECT_INGRESS"
DRAIN_ENV = "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"
PORT_MIN_ENV = "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"
PORT_MAX_ENV = "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"
APP_ENV = "LLAMACLUSTER_APP"
# A probe that takes longer than this counts as failed (the engine is stuck or overloaded).
PROBE_TIMEOUT_S = 60.0


@serve.ingress()
class LlamaclusterServer:
    """Serve replica: loads the engine in the background and serves it behind the Gateway.

    The HTTP endpoint is up at once (so /health and /ready answer while the model loads); the
    engine, vLLM's OpenAI app and the readiness probe arrive when loading finishes.
    """

    def __init__(self, config: ServeConfig, api_key_digests: list[bytes]) -> None:
        self.config = config
        self.state = ServerState(probe_max_age_s=max(6 * config.ready_probe_interval_s, 30.0))
        self.gateway = Gateway(
            self.state,
            api_key_digests=api_key_digests,
            no_auth=config.no_auth,
            max_ongoing_requests=config.max_ongoing_requests,
            retry_after_s=config.retry_after_s,
            request_timeout_s=config.request_timeout_s,
            max_body_bytes=config.max_body_bytes,
            add_request_id=False,
        )
        self._stack = contextlib.AsyncExitStack()
        self._tasks: list[asyncio.Task] = []
        self.engine: Any = None

    async def __serve_build_asgi_app__(self):
        """Ray Serve's late-bound ingress hook: start loading, return the gateway right away."""
        self._tasks.append(asyncio.create_task(self._load()))
        return self.gateway

    async def _load(self) -> None:
        from serve import vllm_glue

        try:
            vllm_glue.check_vllm_version()
            args = vllm_glue.parse_vllm_args(self.config)
            engine = await self._stack.enter_async_context(vllm_glue.engine_client(args))
            app = await vllm_glue.build_openai_app(engine, args)
            await self._stack.enter_async_context(app.router.lifespan_context(app))
        except BaseException as exc:
            logger.exception("the engine failed to start")
            self.state.loading_error = f"{type(exc).__name__}: {exc}"
            if not isinstance(exc, Exception):
                raise
            return
        self.engine = engine
        self.state.engine_error = lambda: vllm_glue.engine_failed(engine)
        self.state.app = app
        self._tasks.append(asyncio.create_task(self._probe_loop()))
        logger.info(
            "engine loaded: %s tp=%d pp=%d", self.config.model, self.config.tp, self.config.pp
        )

    async def _probe_loop(self) -> None:
        """Keep /ready honest: one-token generations at a steady interval."""
        from serve import vllm_glue

        while True:
            try:
                await asyncio.wait_for(
                    vllm_glue.generate_one_token(
                        self.engine, request_id=f"ready-{uuid.uuid4().hex}"
                    ),
                    PROBE_TIMEOUT_S,
                )
                self.state.last_probe_ok = time.monotonic()
                self.state.last_probe_error = None
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.state.last_probe_error = f"{type(exc).__name__}: {exc}"
                logger.warning("readiness probe failed: %s", self.state.last_probe_error)
            await asyncio.sleep(self.config.ready_probe_interval_s)

    def unfinished_requests(self) -> int:
        """Requests the engine tracks right now (running + waiting); -1 while loading."""
        from serve import vllm_glue

        return -1 if self.engine is None else vllm_glue.unfinished_requests(self.engine)

    async def check_health(self) -> None:
        """Ray Serve's health check: a dead engine makes Serve replace the replica."""
        err = self.state.engine_error() if self.state.app is not None else None
        if err is not None:
            raise RuntimeError(f"engine failed: {err}")

    async def __del__(self) -> None:
        for task in self._tasks:
            task.cancel()
        with contextlib.suppress(Exception):
            await self._stack.aclose()


@dataclass(frozen=True)
class Endpoint:
    """Where a deployed server answers."""

    url: str
    app_name: str
    model: str
    host: str
    port: int


def replica_env(config: ServeConfig) -> dict[str, str]:
    """Environment of the replica (and, through vLLM, of its workers): Ray actors do not
    inherit the caller's environment."""
    env = {
        DIRECT_INGRESS_ENV: "1",
        DRAIN_ENV: f"{config.drain_timeout_s:g}",
        # Names the app in every process it starts (engine core, workers), for `ps e` and tests.
        APP_ENV: config.app_name,
    }
    if config.device == "cpu":
        env["VLLM_CPU_KVCACHE_SPACE"] = str(config.cpu_kvcache_space_gb or 4)
    else:
        env["LLAMACLUSTER_CPU_PLATFORM"] = "0"
    return env


def controller_env(config: ServeConfig) -> dict[str, str]:
    """Environment of the Serve controller: direct ingress on, endpoint port fixed."""
    return {
        DIRECT_INGRESS_ENV: "1",
        DRAIN_ENV: f"{config.drain_timeout_s:g}",
        PORT_MIN_ENV: str(config.port),
        PORT_MAX_ENV: str(config.port + 1),
    }


def build_application(config: ServeConfig, api_keys: list[str]):
    """The bound Serve application for one config (one replica, placement group, env)."""
    deployment = serve.deployment(
        LlamaclusterServer,
        name="LlamaclusterServer",
        num_replicas=1,
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
        health_check_timeout_s=60,
        graceful_shutdown_timeout_s=config.drain_timeout_s + 30,
    )
    # Only key digests and a config without keys reach the replica: Ray keeps constructor
    # arguments in its own store, and secrets must not sit there.
    keyless = config.model_copy(update={"api_keys": [], "api_key_file": None})
    return deployment.bind(keyless, [key_digest(k) for k in api_keys])


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


def deploy(config: ServeConfig, *, ray_address: str | None = None) -> Endpoint:
    """Start the server detached on an existing Ray cluster; returns where it will answer.

    Checks the cluster has tp×pp device slots first. The application outlives the caller
    (Serve is detached); wait_until_ready() tells when it serves.
    """
    api_keys = config.resolved_api_keys()
    if not api_keys and not config.no_auth:
        raise ConfigError("no API key configured", hint="pass --api-key or --no-auth")
    if config.no_auth:
        logger.warning("serving WITHOUT authentication: anyone who reaches the port can use it")
    _connect(ray_address)
    existing = _existing_app(config.app_name)
    if existing is None:
        # A redeploy keeps its own slots; a fresh one needs them free.
        check_device_slots(cluster_slots(), config)
    serve.start(
        http_options={"host": config.host, "port": config.proxy_port},
        controller_options={"runtime_env": {"env_vars": controller_env(config)}},
    )
    serve.run(
        build_application(config, api_keys),
        name=config.app_name,
        route_prefix="/",
        blocking=False,
    )
    host = head_address() if config.host in ("0.0.0.0", "::", "") else config.host
    port = config.port
    actual = _listening_port(config.app_name)
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
        url=f"http://{host}:{port}",
        app_name=config.app_name,
        model=config.main_name,
        host=host,
        port=port,
    )


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
    """Stop one application (running requests get the drain period); stop Serve when it was
    the last one. Returns False when no such application ran."""
    _connect(ray_address)
    apps = _serve_apps()
    if apps is None:
        return False
    found = app_name in apps
    if found:
        serve.delete(app_name)
    if not (set(apps) - {app_name}):
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


def wait_until_ready(url: str, *, timeout_s: float = 600.0, poll_s: float = 1.0) -> None:
    """Poll GET {url}/ready until 200; fail early when the engine failed to start."""
    import httpx

    deadline = time.monotonic() + timeout_s
    last = "no answer yet"
    while time.monotonic() < deadline:
        try:
            ready = httpx.get(f"{url}/ready", timeout=5.0)
            if ready.status_code == 200:
                return
            last = _reason(ready)
            health = httpx.get(f"{url}/health", timeout=5.0)
            if health.status_code != 200:
                raise NotReadyError(
                    f"server at {url} is not healthy: {_reason(health)}",
                    hint="see the replica log in the Ray dashboard (Serve view) or "
                    "`ray logs` on the head",
                )
        except httpx.HTTPError as exc:
            last = f"{type(exc).__name__}: {exc}"
        time.sleep(poll_s)
    raise NotReadyError(
        f"server at {url} not ready after {timeout_s:g}s (last: {last})",
        hint="check the replica log in the Ray dashboard (Serve view); a large model may "
        "need a longer --ready-timeout",
    )


def _reason(response: Any) -> str:
    try:
        body = response.json()
        return body.get("error", {}).get("message") or body.get("status") or response.text
    except ValueError:
        return f"HTTP {response.status_code}"
