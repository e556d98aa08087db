"""An endpoint that serves several models: each model is a Serve app of its own, behind one HAProxy.

HAProxy sends a request to the app of the model its JSON body names (serve/haproxy_hooks.py,
``model_route_edits``) when the body fits its buffer. Everything else reaches the first app (at
route ``/``), whose gateway uses this module: a request naming another app's model is forwarded
to that app's route through the endpoint (one more hop, only for bodies HAProxy could not read),
and ``GET /v1/models`` lists every app's models, not only its own.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from cluster.errors import validation_error
from serve.config import EndpointApp, ServeConfig

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Any]
Send = Callable[[Message], Any]

# Request headers not passed on to the other app (hop-by-hop, or recomputed by the client).
_HOP_HEADERS = frozenset(
    {b"connection", b"keep-alive", b"transfer-encoding", b"te", b"upgrade", b"host"}
    | {b"content-length", b"proxy-connection"}
)
# Response headers not passed back: the server recomputes them (Serve adds this app's own
# request id, so the other app's would make two).
_HOP_RESPONSE_HEADERS = frozenset(
    {b"connection", b"keep-alive", b"transfer-encoding", b"content-length", b"x-request-id"}
)


# The settings of the endpoint itself, the same for each of its models (the first one's).
ENDPOINT_FIELDS = (
    "host",
    "port",
    "proxy_port",
    "tls_certfile",
    "tls_keyfile",
    "api_keys",
    "api_key_file",
    "no_auth",
    "admin_key_file",
    "replica_port_min",
    "retry_after_s",
    "routing",
    "device",
)


# The settings of one model, never taken over from the first model's.
MODEL_FIELDS = frozenset(
    {
        "model",
        "served_model_name",
        "lora_modules",
        "tp",
        "pp",
        "num_replicas",
        "max_model_len",
        "revision",
        "quantization",
        "speculative_config",
        "degraded_layout",
        "app_name",
        "route_prefix",
        "endpoint_apps",
    }
)


def with_shared_fields(first: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
    """A later model's config values given on the command line: its own options (``other``,
    from its `--model` value), every other setting as the first model's (``first``)."""
    return {**{k: v for k, v in first.items() if k not in MODEL_FIELDS}, **other}


def route_path(scope: Scope) -> str:
    """The request's path inside its app: without the app's route prefix (Serve's direct
    ingress puts the prefix in ``root_path`` and leaves it in ``path``)."""
    path = scope.get("path", "")
    root = scope.get("root_path", "")
    if root and path.startswith(root) and (len(path) == len(root) or path[len(root)] == "/"):
        return path[len(root) :] or "/"
    return path


@dataclass
class ModelRoutes:
    """What the first app knows of the endpoint's other models."""

    apps: list[EndpointApp]
    base_url: str
    ssl_context: ssl.SSLContext | None = None
    retry_after_s: int = 1
    created: int = field(default_factory=lambda: int(time.time()))
    _by_name: dict[str, EndpointApp] = field(init=False)

    def __post_init__(self) -> None:
        self._by_name = {name: app for app in self.apps for name in app.names}
        self._client: Any = None

    def app_for(self, model: Any) -> EndpointApp | None:
        """The other app serving ``model`` (a request's `model` field), or None."""
        return self._by_name.get(model) if isinstance(model, str) else None

    def cards(self) -> list[dict[str, Any]]:
        """`/v1/models` entries of the other apps' models (as vLLM writes its own)."""
        out: list[dict[str, Any]] = []
        for app in self.apps:
            base = app.names[0]
            for name in app.names:
                adapter = name in app.adapters
                out.append(
                    {
                        "id": name,
                        "object": "model",
                        "created": self.created,
                        "owned_by": "vllm",
                        "root": name if adapter else app.root,
                        "parent": base if adapter else None,
                        "max_model_len": app.max_model_len,
                        "permission": [],
                    }
                )
        return out

    def merged_listing(self, body: bytes) -> bytes | None:
        """vLLM's `/v1/models` answer of this app with the other apps' models added; None when
        it is not a listing (an error answer passes unchanged)."""
        try:
            listing = json.loads(body)
        except ValueError:
            return None
        if not isinstance(listing, dict) or not isinstance(listing.get("data"), list):
            return None
        known = {card.get("id") for card in listing["data"] if isinstance(card, dict)}
        listing["data"] += [c for c in self.cards() if c["id"] not in known]
        return json.dumps(listing).encode()

    def client(self) -> Any:
        """One HTTP client for every forwarded request (its connections are reused)."""
        if self._client is None:
            import httpx

            self._client = httpx.AsyncClient(
                base_url=self.base_url,
                verify=self.ssl_context if self.ssl_context is not None else False,
                # The request's own time limits are the gateway's (request and stream idle
                # timeouts); the connection's are generous.
                timeout=httpx.Timeout(None, connect=10.0),
                limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
            )
        return self._client

    def forward_app(self, app: EndpointApp, body: bytes) -> Callable[..., Any]:
        """An ASGI app that sends this request, with ``body``, to ``app``'s route through the
        endpoint, and streams the answer back as it comes."""

        import httpx

        async def forward(scope: Scope, receive: Receive, send: Send) -> None:
            path = app.route_prefix + route_path(scope)
            query = scope.get("query_string", b"").decode("latin-1")
            headers = [
                (k.decode("latin-1"), v.decode("latin-1"))
                for k, v in scope.get("headers", [])
                if k.lower() not in _HOP_HEADERS
            ]
            client = self.client()
            request = client.build_request(
                scope.get("method", "POST"),
                path + (f"?{query}" if query else ""),
                headers=headers,
                content=body,
            )
            try:
                response = await client.send(request, stream=True)
            except httpx.TransportError as exc:
                from serve.api import error_payload

                message = (
                    f"model {app.names[0]!r} cannot be reached through the endpoint right now "
                    f"({type(exc).__name__}); retry shortly"
                )
                answer = json.dumps(error_payload(503, message)).encode()
                await send(
                    {
                        "type": "http.response.start",
                        "status": 503,
                        "headers": [
                            (b"content-type", b"application/json"),
                            (b"content-length", str(len(answer)).encode()),
                            (b"retry-after", str(self.retry_after_s).encode()),
                        ],
                    }
                )
                await send({"type": "http.response.body", "body": answer})
                return

            async def pump() -> None:
                await send(
                    {
                        "type": "http.response.start",
                        "status": response.status_code,
                        "headers": [
                            (k.lower(), v)
                            for k, v in response.headers.raw
                            if k.lower() not in _HOP_RESPONSE_HEADERS
                        ],
                    }
                )
                async for chunk in response.aiter_raw():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body", "body": b""})

            # The client leaving ends the forwarded request at once (closing the connection to
            # the other model's app, which aborts its engine request), as it does a local one.
            copying = asyncio.ensure_future(pump())
            leaving = asyncio.ensure_future(_disconnected(receive))
            try:
                await asyncio.wait({copying, leaving}, return_when=asyncio.FIRST_COMPLETED)
                if copying.done():
                    copying.result()
            finally:
                for task in (copying, leaving):
                    task.cancel()
                await asyncio.gather(copying, leaving, return_exceptions=True)
                await response.aclose()

        return forward

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()


async def _disconnected(receive: Receive) -> None:
    """Return once the client has gone (the request's body is already read)."""
    while (await receive())["type"] != "http.disconnect":
        pass


def listing_app(routes: ModelRoutes, inner: Callable[..., Any]) -> Callable[..., Any]:
    """``inner`` (vLLM's app) for ``GET /v1/models``, its listing extended by ``routes``."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        start: Message | None = None
        chunks: list[bytes] = []

        async def capture(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                start = message
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))
                if not message.get("more_body", False):
                    await finish()

        async def finish() -> None:
            assert start is not None
            body = b"".join(chunks)
            merged = routes.merged_listing(body) if start["status"] == 200 else None
            if merged is None:
                merged = body
            headers = [
                (k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"
            ]
            headers.append((b"content-length", str(len(merged)).encode()))
            await send({**start, "headers": headers})
            await send({"type": "http.response.body", "body": merged})

        await inner(scope, receive, capture)

    return app


def model_routes(config: ServeConfig) -> ModelRoutes | None:
    """The other models of this app's endpoint, for the first app's gateway (None for any other
    app, or an endpoint of one model)."""
    if len(config.endpoint_apps) < 2 or config.route_prefix != "/":
        return None
    from serve.app import head_address
    from serve.balancer import replica_tls

    # HAProxy listens on every interface of the head (serve.app._balanced_host); this replica
    # may run on another node, so never the bind address (127.0.0.1 would be its own).
    host = head_address()
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    ssl_context = None
    if config.tls_certfile is not None:
        _, ssl_context = replica_tls(str(config.tls_certfile))
    return ModelRoutes(
        apps=[a for a in config.endpoint_apps if a.app_name != config.app_name],
        base_url=f"{config.scheme}://{host}:{config.port}",
        ssl_context=ssl_context,
        retry_after_s=config.retry_after_s,
    )


def endpoint_config(values: dict[str, Any], more: list[dict[str, Any]]) -> ServeConfig:
    """The first model's config of an endpoint (its model table included) from the deploy's
    values: the first model's, and each further model's own fields."""
    first = ServeConfig(**values)
    if not more:
        return first
    others = [ServeConfig(**with_shared_fields(values, m)) for m in more]
    return endpoint_configs([first, *others])[0]


def endpoint_configs(configs: list[ServeConfig]) -> list[ServeConfig]:
    """Several models' configs made one endpoint: each its own app (the first at route /, the
    others at /_lc/<app>), all with the same table of the endpoint's models. The endpoint's
    settings (ports, host, TLS, keys, limits) are the first config's."""
    if len(configs) < 2:
        return configs
    from serve.config import model_app_name, model_route

    first = configs[0]
    taken = {first.app_name}
    named = [first]
    for config in configs[1:]:
        # Named after the first app: stopping that one stops the endpoint's others too.
        app_name = model_app_name(first.app_name, config.main_name, taken)
        config = config.model_copy(update={"app_name": app_name})
        taken.add(app_name)
        named.append(config)
    configs = named
    apps = []
    for i, config in enumerate(configs):
        adapters = [a.name for a in config.lora_modules]
        apps.append(
            EndpointApp(
                app_name=config.app_name,
                route_prefix="/" if i == 0 else model_route(config.app_name),
                names=[*config.served_model_name, *adapters],
                adapters=adapters,
                root=config.model,
                num_replicas=config.num_replicas,
                max_model_len=config.max_model_len,
            )
        )
    shared = {name: getattr(first, name) for name in ENDPOINT_FIELDS}
    out = []
    for config, app in zip(configs, apps, strict=True):
        values = {**dict(config), **shared, "route_prefix": app.route_prefix, "endpoint_apps": apps}
        try:
            out.append(ServeConfig(**values))
        except ValidationError as exc:
            raise validation_error(
                exc, ServeConfig, what="bad endpoint of several models: "
            ) from None
    return out


# The options a `--model` value may carry after its path, and the config field of each.
_SPEC_KEYS = {
    "name": "served_model_name",
    "tp": "tp",
    "pp": "pp",
    "replicas": "num_replicas",
    "max-model-len": "max_model_len",
    "lora": "lora_modules",
}
_REPEATABLE = {"served_model_name", "lora_modules"}


def parse_model_spec(text: str) -> dict[str, Any]:
    """One `--model` value: ``PATH_OR_REPO[,name=N][,tp=N][,pp=N][,replicas=N]
    [,max-model-len=N][,lora=NAME=PATH]`` (name and lora repeatable) into config values."""
    from cluster.errors import ConfigError

    head, *options = text.split(",")
    if not head.strip():
        raise ConfigError(
            f"--model {text!r} names no model",
            hint="write --model PATH_OR_REPO[,name=NAME][,tp=N][,pp=N][,replicas=N]",
        )
    values: dict[str, Any] = {"model": head.strip()}
    for option in options:
        key, sep, value = option.partition("=")
        field_name = _SPEC_KEYS.get(key.strip().lower())
        if not sep or field_name is None or not value.strip():
            raise ConfigError(
                f"--model {text!r}: {option!r} is not an option of a model",
                hint="options are "
                + ", ".join(f"{k}=..." for k in _SPEC_KEYS)
                + " (name and lora repeatable), separated by commas",
            )
        value = value.strip()
        if field_name in _REPEATABLE:
            values.setdefault(field_name, []).append(value)
        else:
            if not value.isdigit():
                raise ConfigError(
                    f"--model {text!r}: {key.strip()} takes a whole number, not {value!r}",
                    hint=f"write {key.strip()}=2",
                )
            if int(value) == 0:
                raise ConfigError(
                    f"--model {text!r}: {key.strip()}=0 is not a size",
                    hint=f"write {key.strip()}=1",
                )
            values[field_name] = int(value)
    return values
