"""What `llamacluster up` is asked to do: one pydantic config shared by the CLI and library callers."""

from __future__ import annotations

import ipaddress
import sys
from copy import copy
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, field_validator, model_validator
from pydantic.fields import FieldInfo

from cluster.keys import read_api_keys
from serve.config import ServeConfig

#: Stage names in the order `up` runs them (also the values --skip accepts).
STAGE_NAMES = (
    "preflight",
    "storage",
    "cache",
    "env",
    "measure",
    "download",
    "ray",
    "serve",
    "ready",
    "monitor",
)


#: Server settings `up` hands to the server as they are: the field (flag, default, bounds, help)
#: is the server's own, so `up` and `serve` cannot drift apart.
SERVER_FIELDS = (
    "stall_timeout_s",
    "restart_max_attempts",
    "request_timeout_s",
    "stream_idle_timeout_s",
    "header_timeout_s",
    "max_connections",
    "max_n",
    "max_tokens_limit",
    "allowed_media_domains",
    "routing",
)


def _server_field(name: str) -> FieldInfo:
    """A copy of ServeConfig's field ``name`` (for an UpConfig field of the same name)."""
    return copy(ServeConfig.model_fields[name])


# Path-valued settings typed as plain strings (paths on the nodes); Path-typed ones are found
# from the annotations.
_STR_PATH_FIELDS = ("cache_dir",)


def path_fields(model: type[BaseModel]) -> tuple[str, ...]:
    """Names of a config's path settings: every Path-typed field, and the string-typed ones."""
    return tuple(
        name
        for name, field in model.model_fields.items()
        if "Path" in str(field.annotation) or name in _STR_PATH_FIELDS
    )


class UpConfig(BaseModel):
    """Inputs of `up`; every field is a flag of `llamacluster up`."""

    name: str | None = Field(
        default=None,
        description="Cluster name; default from the inventory path, 'local' with --local.",
    )
    inventory: Path | None = Field(
        json_schema_extra={"flag": "--ips"},
        default=None,
        description="Inventory file (deploy/ips.txt), head first.",
    )
    local: bool = Field(default=False, description="This machine alone, driven without SSH.")
    ssh_user: str | None = Field(default=None, description="SSH user for nodes that name none.")
    ssh_port: int | None = Field(default=None, description="SSH port for nodes that name none.")
    identity_file: Path | None = Field(
        json_schema_extra={"flag": "--ssh-key"}, default=None, description="SSH private key."
    )
    known_hosts: Path | None = Field(default=None, description="Known-hosts file to use.")
    strict_host_keys: bool = Field(
        default=False, description="Refuse unknown host keys (default: accept new ones)."
    )
    model: str | None = Field(
        default=None,
        description="Hub repo id or a directory on the shared dir; --local defaults to the demo model.",
    )
    more_models: list[str] = Field(
        default_factory=list,
        json_schema_extra={"flag": "--model"},
        description="The endpoint's further models (a repeated --model), each "
        "REPO_OR_DIR[,name=NAME][,tp=N][,pp=N][,replicas=N][,max-model-len=N][,lora=NAME=SRC]: "
        "a Serve app of its own behind the one endpoint, routed by the request's `model`; "
        "downloaded like the first; default tp=1, pp=1, one replica.",
    )
    revision: str | None = Field(default=None, description="Hub revision (branch, tag, commit).")
    served_model_name: list[str] = Field(
        default_factory=list,
        description="Name clients send as `model` (repeat for aliases); default: the repo id, "
        "or the directory's name for a local model.",
    )
    lora: list[str] = Field(
        default_factory=list,
        description="LoRA adapter NAME=REPO_OR_PATH (repeatable): a hub repo is fetched by the "
        "sharded download into <shared>/models, a path must be on the shared dir; clients send "
        "NAME as `model`.",
    )
    tp: int | None = Field(
        default=None, ge=1, description="Tensor parallel size (default: planner)."
    )
    pp: int | None = Field(
        default=None, ge=1, description="Pipeline parallel size (default: planner)."
    )
    shared_dir: Path | None = Field(
        default=None,
        description="Directory every node sees (NFS); holds src/, env/ and models/. "
        "--local default: the cluster's own directory.",
    )
    env: Path | None = Field(
        default=None,
        description="An existing Python env with vLLM and Ray to run from instead of installing "
        "one into <shared>/env (--local default: the running interpreter's env).",
    )
    nfs_server: Literal["provider", "head"] = Field(
        default="provider",
        description="provider: the shared dir is already NFS on every node; head: export it from "
        "the head and mount it on the workers.",
    )
    system_root: Path = Field(
        default=Path("/"),
        description="Root the storage/cache stages edit system files under; anything but / "
        "edits files only (tests) and runs no package, service or mount command.",
    )
    cache_dir: str = Field(default="/var/cache/fscache", description="cachefilesd cache directory.")
    device: Literal["auto", "gpu", "cpu"] = Field(
        default="auto", description="Node devices; auto: GPUs when nvidia-smi lists some."
    )
    cpu_slots: int | None = Field(
        default=None,
        ge=1,
        description="CPU worker slots per CPU node (default: one per NUMA node).",
    )
    ray_port: int = Field(
        default=6379, ge=0, le=65535, description="Ray GCS port; 0 picks a free one."
    )
    dashboard_port: int = Field(
        default=8265,
        ge=0,
        le=65535,
        description="Ray dashboard port on the head's 127.0.0.1; 0: free.",
    )
    api_port: int = Field(
        default=8000, ge=0, le=65535, description="API port on the head; 0: free."
    )
    api_key_file: Path | None = Field(
        default=None, description="API key file (0600); default: one generated for the cluster."
    )
    api_host: str | None = Field(
        default=None,
        description="Address the API binds on the head; default: the head's private address "
        "(preflight's). 0.0.0.0 opts in to every interface (warns).",
    )
    tls: Literal["self-signed"] | None = Field(
        default=None,
        description="self-signed: serve the API over HTTPS with a certificate made for the "
        "head's addresses (its SHA-256 fingerprint is printed).",
    )
    tls_cert: Path | None = Field(
        default=None, description="PEM certificate for HTTPS on the API (with --tls-key)."
    )
    tls_key: Path | None = Field(
        default=None, description="Unencrypted PEM key of --tls-cert; must be mode 0600."
    )
    monitor_port: int = Field(
        default=9090,
        ge=0,
        le=65535,
        description="The monitor's Prometheus port on the head's 127.0.0.1; 0: free.",
    )
    monitor_retention_time: str = Field(
        default="15d",
        pattern=r"^([0-9]+(ms|s|m|h|d|w|y))+$",
        description="How long the monitor keeps metrics (Prometheus duration: 12h, 15d, 4w).",
    )
    monitor_retention_size: str = Field(
        default="1GB",
        pattern=r"^[0-9]+(B|KB|MB|GB|TB)$",
        description="Most disk the monitor's metrics may take on the head (512MB, 1GB, 10GB); "
        "the oldest data goes first.",
    )
    max_model_len: int | None = Field(
        default=None, ge=16, description="Context length to serve (default: the model's)."
    )
    gpu_memory_utilization: float | None = Field(
        default=None,
        gt=0.0,
        le=1.0,
        description="Fraction of each GPU's memory vLLM may use (vLLM's default: 0.9).",
    )
    cpu_kvcache_gb: int | None = Field(
        default=None, ge=1, description="KV cache GiB per CPU worker (VLLM_CPU_KVCACHE_SPACE)."
    )
    cpu_threads: int | None = Field(
        default=None,
        ge=1,
        le=4096,
        description="Compute threads of each CPU worker (OMP_NUM_THREADS). Default: each "
        "machine's cores less one per worker slot on it (at least 1; the fewest of all nodes).",
    )
    quantization: str | None = Field(
        default=None,
        description="vLLM quantization method (fp8, awq, gptq, ...); the planner sizes weights "
        "by it. Default: the checkpoint's.",
    )
    speculative_config: dict[str, object] | None = Field(
        default=None,
        description="vLLM speculative decoding as JSON, e.g. "
        '\'{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4}\'.',
    )
    kv_offload_gb: float | None = Field(
        default=None,
        gt=0,
        description="Host-memory KV cache in GiB over the tensor-parallel ranks (vLLM "
        "--kv-offloading-size).",
    )
    engine_args: dict[str, object] = Field(
        json_schema_extra={"flag": "--engine-arg"},
        default_factory=dict,
        description="Any other vLLM engine argument as KEY=VALUE (repeatable; VALUE is JSON when "
        "it parses): e.g. --engine-arg enable_prefix_caching=true --engine-arg max_num_seqs=64.",
    )
    stall_timeout_s: float = _server_field("stall_timeout_s")
    restart_max_attempts: int = _server_field("restart_max_attempts")
    request_timeout_s: float | None = _server_field("request_timeout_s")
    stream_idle_timeout_s: float | None = _server_field("stream_idle_timeout_s")
    header_timeout_s: float = _server_field("header_timeout_s")
    max_connections: int = _server_field("max_connections")
    max_n: int = _server_field("max_n")
    max_tokens_limit: int = _server_field("max_tokens_limit")
    allowed_media_domains: list[str] = _server_field("allowed_media_domains")
    num_replicas: int | Literal["auto"] = Field(
        json_schema_extra={"flag": "--replicas"},
        default="auto",
        description="Engines (each a tp × pp placement group) behind the one endpoint: a "
        "number, or auto (the default): as many as the cluster's devices hold (the planner's "
        "choice, shown by `llamacluster plan`); above 1, HAProxy balances over them.",
    )
    routing: Literal["least-load", "prefix", "round-robin"] = _server_field("routing")
    admin_key_file: Path | None = _server_field("admin_key_file")
    on_node_loss: Literal["wait", "replan"] = Field(
        json_schema_extra={"flag": "--on-node-loss"},
        default="wait",
        description="While a node of the server's layout is lost: wait for it (the default), "
        "or replan: serve with the planner's smaller layout on the nodes left, if the model "
        "fits them, and move back when the node returns.",
    )
    ready_timeout_s: float = Field(
        json_schema_extra={"flag": "--ready-timeout"},
        default=900.0,
        gt=0,
        description="How long to wait for /ready.",
    )
    supervise: bool = Field(
        json_schema_extra={"flag": "--supervise/--no-supervise"},
        default=True,
        description="Keep each node's Ray running: a systemd unit where systemd runs, else a "
        "small supervisor process; either restarts Ray when it dies (--no-supervise: plain "
        "`ray start`, repaired only by the next `up`).",
    )
    skip: list[str] = Field(default_factory=list, description="Stages not to run.")
    dry_run: bool = Field(default=False, description="Print every stage's commands, run nothing.")
    verbose: bool = Field(default=False, description="Show commands and their output as they run.")
    wait: bool = Field(
        default=False,
        description="When another `up`/`down` holds this cluster, wait for it instead of failing.",
    )

    @model_validator(mode="before")
    @classmethod
    def _no_control_characters(cls, data: object) -> object:
        # A newline or escape in a path would end a shell line on a node or rewrite the terminal.
        if isinstance(data, dict):
            for name in path_fields(cls):
                value = data.get(name)
                if value is not None and any(ord(c) < 32 or ord(c) == 127 for c in str(value)):
                    raise ValueError(f"{str(value)!r} has a control character: paths may not")
        return data

    @field_validator("num_replicas", mode="before")
    @classmethod
    def _replicas_number_or_auto(cls, value: object) -> object:
        from cluster.planner.replicas import MAX_REPLICAS

        text = str(value).strip().lower()
        if text == "auto":
            return "auto"
        if not text.isdigit() or not 1 <= int(text) <= MAX_REPLICAS:
            raise ValueError(
                f"{value!r} is not a replica count: give a whole number from 1 to "
                f"{MAX_REPLICAS}, or auto"
            )
        return int(text)

    @field_validator("admin_key_file")
    @classmethod
    def _admin_keys_readable(cls, value: Path | None) -> Path | None:
        if value is not None:
            read_api_keys(value)  # missing, empty or readable by others: one line, how to fix
        return value

    @field_validator("lora")
    @classmethod
    def _lora_specs(cls, value: list[str]) -> list[str]:
        from serve.lora import check_lora_names, parse_lora_spec

        check_lora_names([parse_lora_spec(spec)[0] for spec in value], [])
        return value

    @field_validator("more_models")
    @classmethod
    def _model_specs(cls, value: list[str]) -> list[str]:
        from cluster.errors import LlamaclusterError
        from serve.models import parse_model_spec

        for spec in value:
            try:
                parse_model_spec(spec)
            except LlamaclusterError as exc:
                raise ValueError(
                    f"{exc.message}; {exc.hint}" if exc.hint else exc.message
                ) from None
        return value

    @field_validator("skip")
    @classmethod
    def _known_stages(cls, value: list[str]) -> list[str]:
        unknown = [s for s in value if s not in STAGE_NAMES]
        if unknown:
            raise ValueError(
                f"unknown stage(s) {', '.join(unknown)}: choose from {', '.join(STAGE_NAMES)}"
            )
        return value

    @field_validator("api_host")
    @classmethod
    def _api_host_is_an_address(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                ipaddress.ip_address(value)
            except ValueError:
                raise ValueError(
                    f"{value!r} is not an IP address: give one of the head's addresses, or "
                    "0.0.0.0 for every interface"
                ) from None
        return value

    @model_validator(mode="after")
    def _inventory_or_local(self) -> UpConfig:
        if self.local and self.inventory is not None:
            raise ValueError("--local and an inventory: pick one")
        if self.tls is not None and (self.tls_cert or self.tls_key):
            raise ValueError("--tls self-signed and --tls-cert/--tls-key: pick one")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("HTTPS needs both --tls-cert and --tls-key")
        if self.tls_cert is not None and self.tls_key is not None:
            from cluster.tls import check_tls_pair

            check_tls_pair(self.tls_cert, self.tls_key)  # missing, 0644, mismatched: one line
        several = self.num_replicas != "auto" and int(self.num_replicas) > 1
        if self.https and self.routing == "prefix" and several:
            raise ValueError(
                "--routing prefix cannot be combined with TLS and several replicas (Ray's routing "
                "step asks the router in plain HTTP): use --routing least-load with TLS"
            )
        if self.more_models and self.routing == "prefix":
            raise ValueError(
                "--routing prefix serves one model per endpoint: use --routing least-load with "
                "several --model"
            )
        if self.more_models and not self.model:
            raise ValueError("further models need a first one: pass --model for it too")
        self._check_local_models()
        self._check_local_adapters()
        return self

    def _check_local_models(self) -> None:
        """With --local every model path is on this machine: one that is not a model directory
        (missing, a file, no config.json) stops `up` before any stage runs, not at the
        download stage after the env and Ray are up."""
        from cluster.stages.download import is_local_model
        from serve.models import parse_model_spec

        if not self.local:
            return
        sources = [self.model] if self.model else []
        sources += [parse_model_spec(spec)["model"] for spec in self.more_models]
        for source in sources:
            if not is_local_model(source):
                continue
            path = Path(source).expanduser().absolute()
            if not path.is_dir():
                what = "is not a directory" if path.exists() else "does not exist"
                raise ValueError(
                    f"--model {source}: {path} {what}; give a model directory "
                    "(with config.json) or a hub repo id"
                )
            if not (path / "config.json").is_file():
                raise ValueError(
                    f"--model {source}: {path} has no config.json; give the directory that "
                    "holds the model's config.json and weights"
                )

    def _check_local_adapters(self) -> None:
        """Adapters given as paths this machine sees (every path with --local) are read now:
        no adapter_config.json, a rank vLLM cannot serve or another base model stops `up`
        before any stage runs. Hub adapters are checked on the head once downloaded."""
        from cluster.stages.download import is_local_model
        from serve.lora import LoraAdapter, check_adapters, check_lora_names, parse_lora_spec
        from serve.vllm_glue import vllm_lora_ranks

        specs = [parse_lora_spec(spec) for spec in self.lora]
        check_lora_names([name for name, _ in specs], self.served_model_name)
        local = [
            LoraAdapter(name=name, path=str(Path(source).expanduser().absolute()))
            for name, source in specs
            if is_local_model(source) and (self.local or Path(source).expanduser().exists())
        ]
        if not local:
            return
        model = self.model or ""
        check_adapters(
            local,
            model_dir=model if model and is_local_model(model) else None,
            model_repo=None if not model or is_local_model(model) else model,
            allowed_ranks=vllm_lora_ranks(),
        )

    @property
    def api_on_all_interfaces(self) -> bool:
        """--api-host 0.0.0.0 (or ::): the API answers on every address of the head."""
        return self.api_host is not None and ipaddress.ip_address(self.api_host).is_unspecified

    @property
    def https(self) -> bool:
        """The API speaks HTTPS (--tls self-signed, or --tls-cert and --tls-key)."""
        return self.tls is not None or self.tls_cert is not None

    @property
    def test_root(self) -> bool:
        """True when system files are edited under a prefix (tests): no system commands run."""
        return self.system_root.resolve() != Path("/")

    def default_env(self) -> Path:
        """The env a --local run uses when none is given: the running interpreter's."""
        return Path(sys.prefix)

    def hashed_fields(self) -> dict[str, object]:
        """The fields whose change makes a rerun of `up` do work (not dry_run, verbose, skip)."""
        return self.model_dump(mode="json", exclude={"dry_run", "verbose", "skip", "wait"})

    def serve_fields(self) -> dict[str, object]:
        """The fields that decide the server alone: changing only these redeploys the server."""
        return self.model_dump(
            mode="json",
            include={
                "model",
                "more_models",
                "revision",
                "served_model_name",
                "lora",
                "tp",
                "pp",
                "max_model_len",
                "gpu_memory_utilization",
                *SERVER_FIELDS,
                "num_replicas",
                "admin_key_file",
                "cpu_kvcache_gb",
                "cpu_threads",
                "quantization",
                "speculative_config",
                "kv_offload_gb",
                "engine_args",
                "api_key_file",
                "api_host",
                "tls",
                "tls_cert",
                "tls_key",
            },
        )
