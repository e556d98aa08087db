"""Benchmark configuration: endpoints, workload, load shape and SLOs as validated pydantic models."""

from __future__ import annotations

import math
import os
import re
import ssl
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator

from cluster.errors import ConfigError

ApiKind = Literal["chat", "completions"]
DatasetKind = Literal["random", "prompts", "jsonl", "sharegpt"]
WorkloadKind = Literal["requests", "chat-sessions"]


class Endpoint(BaseModel):
    """One OpenAI-compatible server under test."""

    name: str = Field(description="Short label used in tables and ratios (e.g. 'ours', 'vllm').")
    base_url: str = Field(description="Base URL including /v1, e.g. http://10.0.0.1:8000/v1.")
    api_key: SecretStr | None = Field(
        default=None, description="Bearer token; never printed or written to results."
    )
    model: str | None = Field(
        default=None,
        description="Model name sent in requests; None asks the endpoint's /v1/models.",
    )
    ca_cert: Path | None = Field(
        default=None,
        description="PEM certificate an https:// endpoint is trusted by, beside the system's "
        "authorities (e.g. a cluster's self-signed api.crt); None: those alone.",
    )

    @field_validator("ca_cert")
    @classmethod
    def _loadable_ca(cls, value: Path | None) -> Path | None:
        from cluster.endpoint import client_ssl_context

        try:
            client_ssl_context(value)
        except ConfigError as exc:
            raise ValueError(exc.message) from None
        return value

    @field_validator("base_url")
    @classmethod
    def _normalise_url(cls, value: str) -> str:
        value = value.strip().rstrip("/")
        if not re.match(r"^https?://[^/\s]+", value):
            raise ValueError(
                f"base URL {value!r} must start with http:// or https:// "
                "(e.g. http://127.0.0.1:8000/v1)"
            )
        if not value.endswith("/v1"):
            value = value + "/v1"
        return value


def tls_context(endpoints: list[Endpoint]) -> ssl.SSLContext | bool:
    """What the benchmark's HTTP client verifies servers with: the system's authorities
    (``True``), plus every endpoint's ``ca_cert`` when one names a certificate."""
    from cluster.endpoint import client_ssl_context

    files = [ep.ca_cert for ep in endpoints if ep.ca_cert is not None]
    if not files:
        return True
    context = client_ssl_context(files[0])
    assert context is not None
    for path in files[1:]:
        context.load_verify_locations(cafile=str(path))
    return context


class Slo(BaseModel):
    """Service-level objective a request must meet to count towards goodput (None: no bound)."""

    ttft_ms: float | None = Field(default=None, description="Bound on time to first token.")
    tpot_ms: float | None = Field(default=None, description="Bound on time per output token.")
    e2e_ms: float | None = Field(default=None, description="Bound on end-to-end latency.")

    def is_empty(self) -> bool:
        """True when no bound is set (goodput is then not reported)."""
        return self.ttft_ms is None and self.tpot_ms is None and self.e2e_ms is None


class WorkloadConfig(BaseModel):
    """What is sent: prompts, lengths and request options, all reproducible from the seed."""

    api: ApiKind = Field(default="chat", description="chat → /chat/completions, else /completions.")
    dataset: DatasetKind = Field(
        default="random",
        description="random prompts of given lengths, the bundled prompt set, or a user file.",
    )
    dataset_path: Path | None = Field(
        default=None, description="JSONL or ShareGPT JSON file for dataset jsonl/sharegpt."
    )
    input_len: int = Field(default=128, ge=1, description="Prompt tokens for random prompts.")
    output_len: int = Field(
        default=128,
        ge=1,
        description="max_tokens for random and bundled prompts; overrides nothing in user files "
        "unless output_len_override is set.",
    )
    output_len_override: bool = Field(
        json_schema_extra={"flag": "--force-output-len"},
        default=False,
        description="Use output_len for every request, even from user files.",
    )
    ignore_eos: bool = Field(
        default=True,
        description="Ask the server to generate exactly max_tokens (sent only when accepted).",
    )
    tokenizer: str | None = Field(
        default=None,
        description="Local tokenizer dir/file or a cached hub repo id; default: the model name.",
    )
    temperature: float | None = Field(default=None, ge=0, description="Sampling temperature.")
    extra_body: dict = Field(
        default_factory=dict, description="Extra JSON fields merged into every request body."
    )
    seed: int = Field(default=0, description="Seed for prompts and arrival times.")
    workload: WorkloadKind = Field(
        default="requests",
        description="requests: independent requests from the dataset; chat-sessions: "
        "conversations that share one long system prompt, each turn sent with the "
        "conversation so far (its answers included), --concurrency turns in flight (of as many "
        "open conversations, or --open-sessions).",
    )
    turns: int = Field(
        default=4, ge=1, le=1000, description="Turns per conversation (chat-sessions)."
    )
    open_sessions: int | None = Field(
        default=None,
        ge=1,
        le=100_000,
        description="Conversations open at once (chat-sessions): a conversation whose answer "
        "arrived goes to the back of the line, so the turns of different conversations "
        "interleave as a chat service's users' do; default: the concurrency (each conversation "
        "runs turn after turn).",
    )
    system_prompt_len: int = Field(
        default=1000,
        ge=0,
        description="Tokens of the system prompt every conversation shares (chat-sessions); "
        "each user turn has input_len tokens, each answer output_len.",
    )

    @model_validator(mode="after")
    def _path_needed(self) -> WorkloadConfig:
        if self.workload == "chat-sessions" and self.dataset != "random":
            raise ValueError(
                "chat-sessions makes its own conversations: drop --dataset (or use --workload "
                "requests)"
            )
        if self.dataset in ("jsonl", "sharegpt"):
            if self.dataset_path is None:
                raise ValueError(f"dataset {self.dataset} needs a file: pass --dataset-path FILE")
            if not self.dataset_path.is_file():
                raise ValueError(
                    f"dataset file {self.dataset_path} does not exist or is not a file"
                )
        return self


class LoadPoint(BaseModel):
    """One sweep point: closed loop at a concurrency, or open loop at a request rate."""

    concurrency: int | None = Field(default=None, ge=1, description="Requests kept in flight.")
    request_rate: float | None = Field(
        default=None, gt=0, description="Mean arrivals per second (inf: all at once)."
    )

    @property
    def mode(self) -> Literal["closed", "open"]:
        """closed loop (fixed concurrency) or open loop (arrival rate)."""
        return "open" if self.request_rate is not None else "closed"

    @property
    def label(self) -> str:
        """Short text naming the point in tables and files."""
        if self.request_rate is None:
            return f"c={self.concurrency}"
        rate = "inf" if math.isinf(self.request_rate) else f"{self.request_rate:g}"
        cap = f",c≤{self.concurrency}" if self.concurrency else ""
        return f"rate={rate}{cap}"

    @property
    def x_value(self) -> float:
        """The number plotted on the x axis (concurrency or rate)."""
        return float(self.request_rate if self.request_rate is not None else self.concurrency or 0)


class LoadConfig(BaseModel):
    """How hard and how long: sweep points, request count or duration, warm-up, rounds."""

    concurrency: list[int] = Field(
        default_factory=lambda: [1], description="Closed-loop sweep, or the cap for open loop."
    )
    request_rate: list[float] = Field(
        default_factory=list, description="Open-loop sweep (requests/s); empty: closed loop."
    )
    burstiness: float = Field(
        default=1.0,
        gt=0,
        description="Gamma shape of inter-arrival times: 1 = Poisson, <1 burstier, >1 steadier.",
    )
    num_requests: int | None = Field(
        default=None, ge=1, description="Measured requests per point and endpoint."
    )
    duration_s: float | None = Field(
        json_schema_extra={"flag": "--duration"},
        default=None,
        gt=0,
        description="Measured seconds per point and endpoint (instead).",
    )
    warmup_requests: int | None = Field(
        json_schema_extra={"flag": "--warmup"},
        default=None,
        ge=0,
        description="Unmeasured requests before each point; None: concurrency.",
    )
    rounds: int = Field(
        default=1, ge=1, description="Interleaved rounds per point (compare mode: A,B,A,B...)."
    )
    timeout_s: float = Field(
        json_schema_extra={"flag": "--timeout"},
        default=300.0,
        gt=0,
        description="Limit for one whole request.",
    )

    @field_validator("concurrency")
    @classmethod
    def _positive(cls, value: list[int]) -> list[int]:
        if not value or any(c < 1 for c in value):
            raise ValueError("concurrency values must be whole numbers ≥ 1, e.g. 1,2,4,8")
        return value

    @model_validator(mode="after")
    def _count_or_duration(self) -> LoadConfig:
        if self.num_requests is not None and self.duration_s is not None:
            raise ValueError("give either a request count or a duration, not both")
        if self.num_requests is None and self.duration_s is None:
            self.num_requests = 100
        if self.duration_s is not None and any(math.isinf(r) for r in self.request_rate):
            raise ValueError(
                "--request-rate inf sends a fixed number of requests at once: "
                "use --num-requests with it, not --duration"
            )
        if self.request_rate and len(self.concurrency) > 1:
            raise ValueError(
                "with --request-rate, --concurrency is a single cap (e.g. 64), not a sweep"
            )
        return self

    def points(self) -> list[LoadPoint]:
        """The sweep points in the order they run."""
        if self.request_rate:
            cap = self.concurrency[0] if self.concurrency != [1] else None
            return [LoadPoint(request_rate=r, concurrency=cap) for r in self.request_rate]
        return [LoadPoint(concurrency=c) for c in self.concurrency]


class BenchConfig(BaseModel):
    """Everything a benchmark run needs; written (keys redacted) into the JSON result."""

    endpoints: list[Endpoint] = Field(
        json_schema_extra={"flag": "--endpoint/--base-url"},
        description="First is the baseline for ratios.",
    )
    workload: WorkloadConfig = Field(default_factory=WorkloadConfig)
    load: LoadConfig = Field(default_factory=LoadConfig)
    slo: Slo = Field(json_schema_extra={"flag": "--slo"}, default_factory=Slo)
    cost_per_hour: float | None = Field(
        default=None, gt=0, description="Price of the serving hardware per hour (any currency)."
    )

    @model_validator(mode="after")
    def _sessions_closed_loop(self) -> BenchConfig:
        if self.workload.workload == "chat-sessions" and self.load.request_rate:
            raise ValueError(
                "chat-sessions runs a closed loop (each turn waits for the answer before): "
                "drop --request-rate and set --concurrency (conversations at a time)"
            )
        sessions = self.workload.open_sessions
        if sessions is not None:
            if self.workload.workload != "chat-sessions":
                raise ValueError("--open-sessions is for --workload chat-sessions")
            if sessions < max(self.load.concurrency, default=1):
                raise ValueError(
                    f"--open-sessions {sessions} is below --concurrency "
                    f"{max(self.load.concurrency, default=1)}: a conversation has one turn in flight at "
                    "most, so open at least as many as the concurrency"
                )
        return self

    @field_validator("endpoints")
    @classmethod
    def _unique_names(cls, value: list[Endpoint]) -> list[Endpoint]:
        if not value:
            raise ValueError("at least one endpoint is needed: pass --base-url or --endpoint")
        names = [e.name for e in value]
        if len(set(names)) != len(names):
            raise ValueError(f"endpoint names must be unique, got {names}")
        return value

    def public_dict(self) -> dict:
        """The configuration as JSON-ready data with API keys replaced by a marker."""
        data = self.model_dump(mode="json")
        for ep, src in zip(data["endpoints"], self.endpoints, strict=True):
            ep["api_key"] = "***" if src.api_key is not None else None
        return data


# ----- parsing of the compact command-line forms -----------------------------------------------

_DURATION = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(ms|s|m|min|h)?\s*$")
_UNIT_S = {"ms": 1e-3, "s": 1.0, None: 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}


def parse_duration_s(text: str, *, default_unit: str = "s") -> float:
    """'200ms' → 0.2, '30s' / '30' → 30.0, '2m' → 120.0."""
    m = _DURATION.match(text)
    if not m:
        raise ConfigError(f"bad duration {text!r}", hint="write e.g. 200ms, 30s, 2m")
    unit = m.group(2) or default_unit
    return float(m.group(1)) * _UNIT_S[unit]


def parse_slo(text: str) -> Slo:
    """'ttft=200ms,tpot=50ms[,e2e=2s]' → Slo (bare numbers are milliseconds)."""
    fields: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        key = key.strip().lower()
        if not sep or key not in ("ttft", "tpot", "e2e"):
            raise ConfigError(
                f"bad SLO part {part!r}", hint="write e.g. --slo ttft=200ms,tpot=50ms,e2e=5s"
            )
        fields[f"{key}_ms"] = parse_duration_s(value, default_unit="ms") * 1000.0
    return Slo(**fields)


def parse_int_list(text: str, *, what: str) -> list[int]:
    """'1,2,4,8' → [1, 2, 4, 8]."""
    try:
        values = [int(p) for p in text.replace(" ", "").split(",") if p]
    except ValueError:
        raise ConfigError(f"bad {what} list {text!r}", hint="write e.g. 1,2,4,8") from None
    if not values or any(v < 1 for v in values):
        raise ConfigError(f"bad {what} list {text!r}", hint="values must be ≥ 1, e.g. 1,2,4,8")
    return values


def parse_float_list(text: str, *, what: str) -> list[float]:
    """'0.5,1,inf' → [0.5, 1.0, inf]."""
    try:
        values = [float(p) for p in text.replace(" ", "").split(",") if p]
    except ValueError:
        raise ConfigError(f"bad {what} list {text!r}", hint="write e.g. 0.5,1,2,inf") from None
    if not values or any(v <= 0 for v in values):
        raise ConfigError(f"bad {what} list {text!r}", hint="values must be > 0")
    return values


def read_key_file(path: str | Path) -> str:
    """The key a client sends from an API key file (cluster/keys.py: 0600, first key)."""
    from cluster.keys import read_api_key

    return read_api_key(path)


def parse_endpoint(
    text: str, *, default_key: str | None = None, default_ca: Path | None = None
) -> Endpoint:
    """'name=URL[,key=K][,key-file=F][,model=M][,ca-cert=F]' → Endpoint (bare URL: name from
    host); ``default_ca`` is the certificate of endpoints that name none."""
    name, sep, rest = text.partition("=")
    if not sep or name.startswith("http"):
        name, rest = "", text
    url, *opts = rest.split(",")
    key: str | None = default_key
    model: str | None = None
    ca: Path | None = default_ca
    for opt in opts:
        k, sep, v = opt.partition("=")
        k = k.strip().lower()
        if not sep:
            raise ConfigError(
                f"bad endpoint option {opt!r} in {text!r}",
                hint="write name=URL,key=K,key-file=F,model=M",
            )
        if k == "key":
            key = v
        elif k in ("key-file", "key_file"):
            key = read_key_file(v)
        elif k == "model":
            model = v
        elif k in ("ca-cert", "ca_cert"):
            ca = Path(v)
        else:
            raise ConfigError(
                f"unknown endpoint option {k!r} in {text!r}",
                hint="known: key, key-file, model, ca-cert",
            )
    if not name:
        name = re.sub(r"^https?://", "", url).split("/")[0]
    try:
        return Endpoint(name=name, base_url=url, api_key=key, model=model, ca_cert=ca)
    except ValueError as exc:
        raise ConfigError(f"bad endpoint {text!r}: {_first_error(exc)}") from None


def default_api_key() -> str | None:
    """OPENAI_API_KEY from the environment, if set."""
    return os.environ.get("OPENAI_API_KEY") or None


def _first_error(exc: Exception) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors):
        first = errors()[0]
        return str(first.get("msg", exc)).removeprefix("Value error, ")
    return str(exc)
