"""Deployment sizing from a model's config.json: parameters, memory, tp x pp, speed and cost bounds."""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    computed_field,
    field_validator,
)

from cluster.device_specs import DeviceSpec
from cluster.errors import ConfigError, DownloadError

GIB = 2**30

# ---------------------------------------------------------------------------------------------
# Data types
# ---------------------------------------------------------------------------------------------

# Weight-only int4 (AWQ / GPTQ layout) stores, per group of 128 weights, one fp16 scale and one
# packed 4-bit zero point: (2 + 0.5) / 128 = 0.0195 extra bytes per weight (about 4 %).
INT4_GROUP_SIZE = 128
INT4_SCALE_OVERHEAD_BYTES = (2 + 0.5) / INT4_GROUP_SIZE

# Bytes per parameter of the *linear* layers (attention, MLP, experts). Embeddings, the LM head,
# norms and MoE routers stay in 16-bit (32-bit for fp32 models), as quantized checkpoints and
# vLLM keep them. fp8/int8 per-channel or per-tensor scales are negligible and not counted.
WEIGHT_DTYPE_BYTES: dict[str, float] = {
    "fp32": 4.0,
    "bf16": 2.0,
    "fp16": 2.0,
    "fp8": 1.0,
    "int8": 1.0,
    "int4": 0.5 + INT4_SCALE_OVERHEAD_BYTES,
}
KV_DTYPE_BYTES: dict[str, int] = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1}
QUANTIZED_DTYPES = frozenset({"fp8", "int8", "int4"})

_DTYPE_ALIASES = {
    "bfloat16": "bf16",
    "float16": "fp16",
    "half": "fp16",
    "float32": "fp32",
    "float": "fp32",
    "fp8_e4m3": "fp8",
    "fp8_e5m2": "fp8",
    "float8": "fp8",
    "awq": "int4",
    "gptq": "int4",
    "w4a16": "int4",
    "w8a8": "int8",
}

# ---------------------------------------------------------------------------------------------
# Runtime constants (documented in docs/PLANNER.md)
# ---------------------------------------------------------------------------------------------

# Memory vLLM needs on each device besides weights and KV cache: the CUDA context, NCCL and
# custom all-reduce buffers, CUDA graphs. Measured values are 0.5-1.5 GiB per GPU.
RUNTIME_OVERHEAD_GIB = 1.0
# vLLM profiles the peak activation memory with one batch of max_num_batched_tokens; its OpenAI
# server defaults to 8192 tokens on >= 70 GiB devices and 2048 on smaller ones.
LARGE_DEVICE_GIB = 70
ACTIVATION_TOKENS_LARGE = 8192
ACTIVATION_TOKENS_SMALL = 2048
# Logits are computed in fp32 for at most max_num_seqs sequences per step (vLLM default 256).
LOGITS_SEQS = 256
# vLLM's Llama-style models pass both hidden_states and residual between pipeline stages.
PP_TENSORS_PER_HOP = 2
# Tensor parallelism: one all-reduce after attention and one after the MLP, per layer.
TP_ALLREDUCES_PER_LAYER = 2

# Model types whose config.json leaves tie_word_embeddings out because their class default is True.
_TIED_BY_DEFAULT = frozenset({"gemma", "gemma2", "gemma3", "gemma3_text", "gpt2", "opt", "bloom"})
# Model types with a plain two-matrix MLP (up, down) rather than a gated three-matrix one.
_UNGATED_MLP = frozenset(
    {
        "gpt2",
        "opt",
        "gpt_neox",
        "falcon",
        "bloom",
        "gpt_bigcode",
        "starcoder2",
        "phi",
        "gptj",
        "mpt",
    }
)


def normalize_dtype(name: str, *, allowed: dict[str, Any], what: str) -> str:
    """Canonical short name (bf16, fp16, fp8, int4...) for a dtype spelling, or a ConfigError."""
    key = name.strip().lower().replace("torch.", "")
    key = _DTYPE_ALIASES.get(key, key)
    if key not in allowed:
        raise ConfigError(
            f"unknown {what} {name!r}", hint=f"use one of: auto, {', '.join(allowed)}"
        )
    return key


# ---------------------------------------------------------------------------------------------
# Model shape
# ---------------------------------------------------------------------------------------------


class MoEShape(BaseModel):
    """Mixture-of-experts part of a model (Mixtral, Qwen-MoE, DeepSeek-style configs)."""

    model_config = ConfigDict(frozen=True)

    num_experts: int = Field(gt=0, description="Routed experts per MoE layer.")
    experts_per_token: int = Field(gt=0, description="Routed experts each token uses (top-k).")
    expert_intermediate_size: int = Field(gt=0, description="FFN width of one routed expert.")
    shared_intermediate_size: int = Field(
        default=0, ge=0, description="Total FFN width of the always-on shared expert(s); 0 if none."
    )
    moe_layer_ids: tuple[int, ...] = Field(
        description="Indices of the layers whose MLP is MoE (others use the dense MLP).",
        repr=False,
    )


class MLAShape(BaseModel):
    """Multi-head latent attention (DeepSeek V2/V3): a compressed KV latent instead of K and V."""

    model_config = ConfigDict(frozen=True)

    q_lora_rank: int | None = Field(description="Query compression rank; None = full q projection.")
    kv_lora_rank: int = Field(gt=0, description="Width of the cached KV latent.")
    qk_nope_head_dim: int = Field(ge=0, description="Per-head query/key dims without RoPE.")
    qk_rope_head_dim: int = Field(ge=0, description="Per-head query/key dims with RoPE (cached).")
    v_head_dim: int = Field(gt=0, description="Per-head value dims.")


class ModelShape(BaseModel):
    """The numbers of a decoder-only transformer that decide its memory and speed."""

    model_config = ConfigDict(frozen=True)

    name: str = Field(default="", description="Repo id or directory the config came from.")
    model_type: str = Field(default="", description="config.json model_type (text part).")
    num_layers: int = Field(gt=0, description="Decoder layers.")
    hidden_size: int = Field(gt=0, description="Residual stream width.")
    num_heads: int = Field(gt=0, description="Attention (query) heads.")
    num_kv_heads: int = Field(gt=0, description="Key/value heads (< num_heads for GQA/MQA).")
    head_dim: int = Field(gt=0, description="Dims per attention head.")
    intermediate_size: int = Field(gt=0, description="Dense MLP width.")
    vocab_size: int = Field(gt=0, description="Vocabulary size (embedding and LM head rows).")
    tied_embeddings: bool = Field(default=False, description="LM head shares the input embedding.")
    gated_mlp: bool = Field(default=True, description="Three-matrix gated MLP (SwiGLU/GeGLU).")
    max_position_embeddings: int | None = Field(
        default=None,
        description="Longest context the config allows (vLLM's default max_model_len).",
    )
    config_dtype: str = Field(default="bf16", description="Checkpoint dtype from config.json.")
    quantization: str | None = Field(
        default=None, description="Weight dtype of a quantized checkpoint (fp8, int8, int4)."
    )
    moe: MoEShape | None = Field(default=None, description="Mixture-of-experts part, if any.")
    mla: MLAShape | None = Field(default=None, description="Latent attention part, if any.")

    def is_moe_layer(self, index: int) -> bool:
        """Whether layer ``index`` has a mixture-of-experts MLP."""
        return self.moe is not None and index in self.moe.moe_layer_ids


def _pick(cfg: dict[str, Any], *keys: str, default: Any = None) -> Any:
    """The first key present with a non-null value."""
    for key in keys:
        if cfg.get(key) is not None:
            return cfg[key]
    return default


def _require(cfg: dict[str, Any], what: str, *keys: str) -> int:
    value = _pick(cfg, *keys)
    if value is None:
        raise ConfigError(
            f"config.json has no {what} (looked for {', '.join(keys)})",
            hint="pass a decoder-only transformer's config (text model, or a multimodal config "
            "with a text_config)",
        )
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"config.json {keys[0]} is not a number: {value!r}") from None


def _quantization_of(cfg: dict[str, Any]) -> str | None:
    """Weight dtype of a quantized checkpoint from its quantization_config, if any."""
    quant = cfg.get("quantization_config") or cfg.get("compression_config")
    if not isinstance(quant, dict):
        return None
    method = str(quant.get("quant_method", "")).lower()
    if (
        method in ("fp8", "fbgemm_fp8", "modelopt")
        or "fp8" in str(quant.get("quant_algo", "")).lower()
    ):
        return "fp8"
    bits = quant.get("bits") or quant.get("w_bit") or quant.get("weight_bits")
    if bits is None and quant.get("load_in_4bit"):
        bits = 4
    if bits is None and quant.get("load_in_8bit"):
        bits = 8
    if bits is None:
        for group in (quant.get("config_groups") or {}).values():
            weights = group.get("weights") if isinstance(group, dict) else None
            if isinstance(weights, dict) and weights.get("num_bits"):
                bits = weights["num_bits"]
                if str(weights.get("type", "")).lower() == "float" and int(bits) == 8:
                    return "fp8"
                break
    if bits is None:
        return None
    return {4: "int4", 8: "int8"}.get(int(bits))


def _moe_of(cfg: dict[str, Any], num_layers: int) -> MoEShape | None:
    experts = _pick(cfg, "num_local_experts", "n_routed_experts", "num_experts", "moe_num_experts")
    if not experts or int(experts) <= 1:
        return None
    top_k = _pick(cfg, "num_experts_per_tok", "num_experts_per_token", "moe_top_k", "top_k")
    if top_k is None:
        raise ConfigError("config.json has experts but no num_experts_per_tok")
    expert_width = _pick(cfg, "moe_intermediate_size", "intermediate_size")
    shared = int(_pick(cfg, "shared_expert_intermediate_size", default=0) or 0)
    if not shared and _pick(cfg, "n_shared_experts"):
        shared = int(cfg["n_shared_experts"]) * int(expert_width)
    # Which layers are MoE: DeepSeek (first_k_dense_replace, moe_layer_freq) and Qwen-MoE
    # (decoder_sparse_step, mlp_only_layers) spell it differently.
    first_dense = int(_pick(cfg, "first_k_dense_replace", default=0) or 0)
    dense_ids = {int(i) for i in (cfg.get("mlp_only_layers") or [])}
    if cfg.get("decoder_sparse_step"):
        step = int(cfg["decoder_sparse_step"])
        sparse = [i for i in range(num_layers) if (i + 1) % step == 0]
    else:
        freq = int(_pick(cfg, "moe_layer_freq", default=1) or 1)
        sparse = [i for i in range(num_layers) if i % freq == 0]
    ids = tuple(i for i in sparse if i >= first_dense and i not in dense_ids)
    return MoEShape(
        num_experts=int(experts),
        experts_per_token=int(top_k),
        expert_intermediate_size=int(expert_width),
        shared_intermediate_size=shared,
        moe_layer_ids=ids,
    )


def parse_model_shape(config: dict[str, Any], *, name: str = "") -> ModelShape:
    """Read a Hugging Face config.json (already parsed) into a ModelShape.

    Understands the common spellings (Llama/Mistral/Qwen/Gemma, GPT-2/OPT/Falcon style keys),
    MoE configs (Mixtral, Qwen-MoE, DeepSeek), latent attention (DeepSeek) and multimodal
    configs whose language model sits under ``text_config``. Missing essentials are a
    ConfigError naming the key.
    """
    if not isinstance(config, dict):
        raise ConfigError("config.json is not a JSON object")
    cfg = config
    for nested in ("text_config", "llm_config", "language_config"):
        if isinstance(config.get(nested), dict):
            # The text part wins; top-level keys fill what it leaves out (e.g. the dtype).
            cfg = {**{k: v for k, v in config.items() if not isinstance(v, dict)}, **config[nested]}
            break
    model_type = str(cfg.get("model_type") or config.get("model_type") or "")
    num_layers = _require(
        cfg, "layer count", "num_hidden_layers", "n_layer", "num_layers", "n_layers"
    )
    hidden = _require(cfg, "hidden size", "hidden_size", "n_embd", "d_model", "dim")
    heads = _require(
        cfg, "attention head count", "num_attention_heads", "n_head", "num_heads", "n_heads"
    )
    kv_heads = _pick(
        cfg, "num_key_value_heads", "num_kv_heads", "n_kv_heads", "multi_query_group_num"
    )
    if kv_heads is None:
        kv_heads = 1 if cfg.get("multi_query") else heads
    head_dim = _pick(cfg, "head_dim", "kv_channels", default=hidden // heads)
    intermediate = _pick(cfg, "intermediate_size", "n_inner", "ffn_dim", "ffn_hidden_size")
    if intermediate is None:
        intermediate = 4 * hidden
    vocab = _require(cfg, "vocabulary size", "vocab_size", "padded_vocab_size")
    tied = cfg.get("tie_word_embeddings")
    if tied is None:
        tied = config.get("tie_word_embeddings")
    if tied is None:
        tied = model_type in _TIED_BY_DEFAULT
    max_pos = _pick(
        cfg, "max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"
    )
    raw_dtype = str(_pick(cfg, "torch_dtype", "dtype", default="bfloat16"))
    try:
        config_dtype = normalize_dtype(raw_dtype, allowed=WEIGHT_DTYPE_BYTES, what="dtype")
    except ConfigError:
        config_dtype = "bf16"
    mla = None
    if cfg.get("kv_lora_rank"):
        mla = MLAShape(
            q_lora_rank=cfg.get("q_lora_rank") or None,
            kv_lora_rank=int(cfg["kv_lora_rank"]),
            qk_nope_head_dim=int(cfg.get("qk_nope_head_dim", 0)),
            qk_rope_head_dim=int(cfg.get("qk_rope_head_dim", 0)),
            v_head_dim=int(cfg.get("v_head_dim", head_dim)),
        )
    return ModelShape(
        name=name,
        model_type=model_type,
        num_layers=num_layers,
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=int(kv_heads),
        head_dim=int(head_dim),
        intermediate_size=int(intermediate),
        vocab_size=vocab,
        tied_embeddings=bool(tied),
        gated_mlp=model_type not in _UNGATED_MLP,
        max_position_embeddings=int(max_pos) if max_pos else None,
        config_dtype=config_dtype,
        quantization=_quantization_of(cfg) or _quantization_of(config),
        moe=_moe_of(cfg, num_layers),
        mla=mla,
    )


_REPO_ID_RE = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


def load_model_config(source: str, *, revision: str | None = None) -> dict[str, Any]:
    """config.json of a local directory (or the file itself), else of a hub repo id.

    The hub is asked for ``config.json`` alone (no weights) through huggingface_hub, with
    HF_ENDPOINT and HF_TOKEN read at call time. A missing repo or file is a ConfigError; an
    unreachable hub is a DownloadError.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        path = path / "config.json"
        if not path.is_file():
            raise ConfigError(
                f"{source} has no config.json",
                hint="point --model at a Hugging Face model directory",
            )
    elif not path.is_file():
        if source.startswith((".", "/", "~")) or not _REPO_ID_RE.match(source):
            raise ConfigError(
                f"{source}: no such directory, and not a hub repo id",
                hint="pass a local model directory or a repo id like meta-llama/Llama-3.1-8B",
            )
        path = Path(_download_config(source, revision=revision))
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(
            f"cannot read {path}: {exc}", hint="check that it is valid JSON"
        ) from None


def _download_config(repo_id: str, *, revision: str | None) -> str:
    from huggingface_hub import errors as hf_errors
    from huggingface_hub import hf_hub_download

    endpoint = os.environ.get("HF_ENDPOINT") or None
    where = endpoint or "the Hugging Face hub"
    try:
        return hf_hub_download(
            repo_id,
            "config.json",
            revision=revision,
            endpoint=endpoint,
            token=os.environ.get("HF_TOKEN") or None,
        )
    except hf_errors.GatedRepoError:
        raise ConfigError(
            f"{repo_id} is gated on {where}",
            hint="accept its license on the hub and export HF_TOKEN",
        ) from None
    except hf_errors.RepositoryNotFoundError:
        raise ConfigError(
            f"no repo {repo_id!r} on {where}",
            hint="check the repo id (and HF_TOKEN for private repos), or pass a local directory",
        ) from None
    except hf_errors.RevisionNotFoundError:
        raise ConfigError(f"{repo_id} has no revision {revision!r}") from None
    except hf_errors.RemoteEntryNotFoundError:
        raise ConfigError(f"{repo_id} has no config.json on {where}") from None
    except hf_errors.LocalEntryNotFoundError as exc:
        # huggingface_hub wraps the failed lookup; a 4xx answer means the hub was reached.
        response = getattr(exc.__cause__, "response", None)
        status = getattr(response, "status_code", None)
        if isinstance(exc.__cause__, hf_errors.EntryNotFoundError) or status == 404:
            raise ConfigError(
                f"no {repo_id}/config.json on {where} (HTTP {status or 404})",
                hint="check the repo id (and HF_TOKEN for private repos), or pass a local directory",
            ) from None
        if status in (401, 403):
            raise ConfigError(
                f"{where} refused {repo_id}/config.json (HTTP {status})",
                hint="export HF_TOKEN with access to the repo",
            ) from None
        raise DownloadError(
            f"cannot reach {where} for {repo_id}/config.json, and it is not in the local cache",
            hint="check the network and HF_ENDPOINT, or pass a local model directory",
        ) from None
    except OSError as exc:
        raise DownloadError(
            f"cannot fetch config.json of {repo_id} from {where}: {type(exc).__name__}: {exc}",
            hint="check the network, HF_ENDPOINT and HF_TOKEN, or pass a local model directory",
        ) from None


def load_model_shape(source: str, *, revision: str | None = None) -> ModelShape:
    """ModelShape of a local model directory or hub repo id (config.json only)."""
    return parse_model_shape(load_model_config(source, revision=revision), name=source)


# ---------------------------------------------------------------------------------------------
# Parameters
# ---------------------------------------------------------------------------------------------


def _kv_heads_per_device(shape: ModelShape, tp: int) -> int:
    # vLLM replicates KV heads when tp exceeds their number, so each device keeps at least one.
    return max(1, shape.num_kv_heads // tp)


def attention_params_per_device(shape: ModelShape, tp: int = 1) -> float:
    """Attention projection weights one tensor-parallel rank holds (tp=1: the whole layer's)."""
    h, heads = shape.hidden_size, shape.num_heads / tp
    if shape.mla is not None:
        m = shape.mla
        qk = m.qk_nope_head_dim + m.qk_rope_head_dim
        # The down-projections (q_a, kv_a) are replicated on every rank; the rest is split.
        q_in = m.q_lora_rank or 0
        q = h * q_in + q_in * heads * qk if q_in else h * heads * qk
        kv = h * (m.kv_lora_rank + m.qk_rope_head_dim)
        kv += m.kv_lora_rank * heads * (m.qk_nope_head_dim + m.v_head_dim)
        return q + kv + heads * m.v_head_dim * h
    d = shape.head_dim
    kv = _kv_heads_per_device(shape, tp)
    return h * d * (heads + 2 * kv) + heads * d * h


def dense_mlp_params(shape: ModelShape) -> int:
    """Weights of one dense MLP (gate/up/down or up/down)."""
    return (3 if shape.gated_mlp else 2) * shape.hidden_size * shape.intermediate_size


def expert_params(shape: ModelShape) -> int:
    """Weights of one routed expert (always a gated MLP); 0 for dense models."""
    return 0 if shape.moe is None else 3 * shape.hidden_size * shape.moe.expert_intermediate_size


def shared_expert_params(shape: ModelShape) -> int:
    """Weights of the always-on shared expert(s) of one MoE layer."""
    return 0 if shape.moe is None else 3 * shape.hidden_size * shape.moe.shared_intermediate_size


def _norm_params(shape: ModelShape) -> int:
    extra = 0
    if shape.mla is not None:
        extra = (shape.mla.q_lora_rank or 0) + shape.mla.kv_lora_rank
    return 2 * shape.hidden_size + extra


def _router_params(shape: ModelShape) -> int:
    return 0 if shape.moe is None else shape.hidden_size * shape.moe.num_experts


class ParamCount(BaseModel):
    """Parameter counts; ``active`` is what one token touches (MoE: top-k experts + shared)."""

    total: int = Field(description="All parameters (tied embeddings counted once).")
    active: int = Field(description="Parameters used per token (equals total for dense models).")
    embedding: int = Field(description="Input embedding.")
    lm_head: int = Field(description="Output projection (0 when tied to the embedding).")
    attention: int = Field(description="Attention projections, all layers.")
    mlp: int = Field(description="MLPs, experts and shared experts, all layers.")
    other: int = Field(description="Norms and MoE routers.")


def count_parameters(shape: ModelShape) -> ParamCount:
    """Total and active parameter counts from the shape (biases are left out: < 0.1 %)."""
    embed = shape.vocab_size * shape.hidden_size
    lm_head = 0 if shape.tied_embeddings else embed
    attn = int(attention_params_per_device(shape)) * shape.num_layers
    other = shape.num_layers * _norm_params(shape) + shape.hidden_size
    mlp = active_mlp = 0
    for i in range(shape.num_layers):
        if shape.is_moe_layer(i):
            assert shape.moe is not None
            base = shared_expert_params(shape)
            mlp += base + shape.moe.num_experts * expert_params(shape)
            active_mlp += base + shape.moe.experts_per_token * expert_params(shape)
            other += _router_params(shape)
        else:
            mlp += dense_mlp_params(shape)
            active_mlp += dense_mlp_params(shape)
    total = embed + lm_head + attn + mlp + other
    return ParamCount(
        total=total,
        active=total - mlp + active_mlp,
        embedding=embed,
        lm_head=lm_head,
        attention=attn,
        mlp=mlp,
        other=other,
    )


def resolve_weight_dtype(shape: ModelShape, dtype: str = "auto") -> str:
    """The weight dtype to plan with: the given one, else the checkpoint's quantization, else its
    dtype (an fp32 checkpoint is served in bf16, as vLLM's "auto" does)."""
    if dtype == "auto":
        if shape.quantization:
            return shape.quantization
        return "bf16" if shape.config_dtype == "fp32" else shape.config_dtype
    return normalize_dtype(dtype, allowed=WEIGHT_DTYPE_BYTES, what="weight dtype")


def _base_bytes(weight_dtype: str) -> int:
    """Bytes of the unquantized parts (embeddings, norms, routers) and of activations."""
    return 4 if weight_dtype == "fp32" else 2


def resolve_kv_dtype(kv_dtype: str, weight_dtype: str) -> str:
    """KV-cache dtype: "auto" follows the model's compute dtype (16-bit, or fp32)."""
    if kv_dtype == "auto":
        return {"fp32": "fp32", "fp16": "fp16"}.get(weight_dtype, "bf16")
    return normalize_dtype(kv_dtype, allowed=KV_DTYPE_BYTES, what="KV-cache dtype")


def weight_bytes(shape: ModelShape, dtype: str = "bf16") -> float:
    """Bytes of all weights in ``dtype`` (quantized dtypes apply to the linear layers only)."""
    dtype = resolve_weight_dtype(shape, dtype)
    p = count_parameters(shape)
    linear = p.attention + p.mlp
    return linear * WEIGHT_DTYPE_BYTES[dtype] + (p.total - linear) * _base_bytes(dtype)


def kv_bytes_per_token_per_layer(shape: ModelShape, kv_dtype: str = "bf16", *, tp: int = 1) -> int:
    """KV-cache bytes one token adds to one layer on one tensor-parallel rank.

    Standard/GQA attention: K and V for each KV head the rank holds (at least one: vLLM
    replicates KV heads when tp exceeds their number). Latent attention (MLA): one compressed
    latent plus the RoPE key, replicated on every rank.
    """
    nbytes = KV_DTYPE_BYTES[normalize_dtype(kv_dtype, allowed=KV_DTYPE_BYTES, what="KV dtype")]
    if shape.mla is not None:
        return (shape.mla.kv_lora_rank + shape.mla.qk_rope_head_dim) * nbytes
    kv = _kv_heads_per_device(shape, tp)
    return 2 * kv * shape.head_dim * nbytes


def kv_bytes_per_token(shape: ModelShape, kv_dtype: str = "bf16") -> int:
    """KV-cache bytes per token for the whole model: 2 x layers x kv_heads x head_dim x bytes."""
    return shape.num_layers * kv_bytes_per_token_per_layer(shape, kv_dtype)


# ---------------------------------------------------------------------------------------------
# Cluster, options and parallel layouts
# ---------------------------------------------------------------------------------------------


class ClusterShape(BaseModel):
    """What the planner needs to know about the machines: how many, how many devices, which."""

    model_config = ConfigDict(frozen=True)

    nodes: int = Field(default=1, ge=1, description="Machines in the cluster.")
    devices_per_node: int = Field(
        default=1, ge=1, description="Accelerators (or CPU slots) per node."
    )
    device: DeviceSpec = Field(description="The device every node has.")
    link_gbps: float = Field(
        default=100.0,
        gt=0,
        description="Network between nodes in Gbit/s (pipeline hops across nodes).",
    )

    @computed_field(description="nodes x devices_per_node.")
    @property
    def total_devices(self) -> int:
        return self.nodes * self.devices_per_node


class PlanOptions(BaseModel):
    """The workload and the knobs of a plan; defaults match `llamacluster plan`'s."""

    model_config = ConfigDict(frozen=True)

    dtype: str = Field(
        default="auto", description="Weight dtype: auto, bf16, fp16, fp8, int8, int4, fp32."
    )
    kv_dtype: str = Field(
        default="auto", description="KV-cache dtype: auto, bf16, fp16, fp8, fp32."
    )
    max_model_len: int | None = Field(
        default=None, gt=0, description="Context the server must hold; None = the config's maximum."
    )
    prompt_len: int = Field(
        default=512, gt=0, description="Prompt tokens for the prefill estimate."
    )
    concurrency: int = Field(default=32, gt=0, description="Sequences decoding at once.")
    mem_fraction: float = Field(
        default=0.9,
        gt=0,
        le=1,
        description="Share of device memory vLLM may use (gpu_memory_utilization).",
    )
    flops_efficiency: float = Field(
        default=1.0, gt=0, le=1, description="Achieved / peak FLOP/s; 1.0 = the ideal bound."
    )
    bandwidth_efficiency: float = Field(
        default=1.0,
        gt=0,
        le=1,
        description="Achieved / peak memory bandwidth; 1.0 = the ideal bound.",
    )
    cost_per_hour: float | None = Field(
        default=None, gt=0, description="Price of the whole cluster per hour, in dollars."
    )
    tp: int | None = Field(default=None, ge=1, description="Force this tensor-parallel size.")
    pp: int | None = Field(default=None, ge=1, description="Force this pipeline-parallel size.")

    @field_validator("dtype", "kv_dtype")
    @classmethod
    def _check_dtypes(cls, value: str, info: ValidationInfo) -> str:
        if value == "auto":
            return value
        table = WEIGHT_DTYPE_BYTES if info.field_name == "dtype" else KV_DTYPE_BYTES
        flag = "--" + str(info.field_name).replace("_", "-")
        return normalize_dtype(value, allowed=table, what=flag)


def tp_violation(shape: ModelShape, tp: int) -> str | None:
    """Why vLLM would refuse tensor-parallel size ``tp`` for this model, or None if it accepts it.

    vLLM's rules (vllm/config/model.py, vllm/model_executor/layers/linear.py): the attention heads
    must divide evenly; KV heads must divide evenly by tp, or, when tp exceeds them, tp must be a
    multiple of their number (each KV head is then replicated tp / kv_heads times).
    """
    if shape.num_heads % tp:
        return f"{shape.num_heads} attention heads are not divisible by tp={tp}"
    if shape.mla is None:
        kv = shape.num_kv_heads
        if tp <= kv and kv % tp:
            return f"{kv} KV heads are not divisible by tp={tp}"
        if tp > kv and tp % kv:
            return f"tp={tp} is not a multiple of the {kv} KV heads (needed to replicate them)"
    return None


def pipeline_stage_layers(num_layers: int, pp: int) -> list[int]:
    """Layers per pipeline stage, split the way vLLM's get_pp_indices does (remainder layers go
    to the stages before the last, which also holds the final norm and LM head)."""
    if not 1 <= pp <= num_layers:
        raise ConfigError(f"pp={pp} must be between 1 and the {num_layers} layers")
    parts = [num_layers // pp] * pp
    for i in range(2, num_layers % pp + 2):
        parts[-i] += 1
    return parts


@dataclass(frozen=True)
class _Stage:
    """Per-device numbers of one pipeline stage (one tensor-parallel rank of it)."""

    index: int
    first_layer: int
    num_layers: int
    weight_bytes: float  # what the rank stores
    dense_read_bytes: float  # read every decode step, besides routed experts (no input embedding)
    expert_bytes: float  # one routed expert on this rank
    moe_layers: int
    dense_linear_params: float  # linear params per token besides routed experts (no LM head)
    expert_linear_params: float  # one routed expert on this rank
    lm_head_params: float
    attn_flops_per_pair: float  # attention FLOPs per (query token, context token) pair
    kv_bytes_per_token: int


def _build_stages(
    shape: ModelShape, *, tp: int, pp: int, weight_dtype: str, kv_dtype: str
) -> list[_Stage]:
    qbytes, bbytes = WEIGHT_DTYPE_BYTES[weight_dtype], _base_bytes(weight_dtype)
    embed_dev = shape.vocab_size * shape.hidden_size / tp
    attn = attention_params_per_device(shape, tp)
    if shape.mla is not None:
        qk = shape.mla.qk_nope_head_dim + shape.mla.qk_rope_head_dim
        pair_flops = 2 * (shape.num_heads / tp) * (qk + shape.mla.v_head_dim)
    else:
        pair_flops = 2 * (shape.num_heads / tp) * 2 * shape.head_dim  # QK^T and AV
    kv_layer = kv_bytes_per_token_per_layer(shape, kv_dtype, tp=tp)
    stages: list[_Stage] = []
    start = 0
    for index, count in enumerate(pipeline_stage_layers(shape.num_layers, pp)):
        first, last = index == 0, index == pp - 1
        dense_linear = float(attn) * count
        all_experts = 0.0
        moe_layers = 0
        small = _norm_params(shape) * count
        for layer in range(start, start + count):
            if shape.is_moe_layer(layer):
                assert shape.moe is not None
                moe_layers += 1
                dense_linear += shared_expert_params(shape) / tp
                all_experts += shape.moe.num_experts * expert_params(shape) / tp
                small += _router_params(shape)
            else:
                dense_linear += dense_mlp_params(shape) / tp
        # vLLM keeps the embedding on the first stage, and on the last too when the LM head is
        # tied to it; the last stage holds the LM head and the final norm.
        embed_copies = int(first) + int(last and shape.tied_embeddings and not first)
        lm_head = embed_dev if last else 0.0
        stored_lm_head = lm_head if (last and not shape.tied_embeddings) else 0.0
        if last:
            small += shape.hidden_size
        stored = (dense_linear + all_experts) * qbytes
        stored += (small + embed_copies * embed_dev + stored_lm_head) * bbytes
        read = dense_linear * qbytes + (small + lm_head) * bbytes
        stages.append(
            _Stage(
                index=index,
                first_layer=start,
                num_layers=count,
                weight_bytes=stored,
                dense_read_bytes=read,
                expert_bytes=expert_params(shape) / tp * qbytes,
                moe_layers=moe_layers,
                dense_linear_params=dense_linear,
                expert_linear_params=expert_params(shape) / tp,
                lm_head_params=lm_head,
                attn_flops_per_pair=pair_flops * count,
                kv_bytes_per_token=kv_layer * count,
            )
        )
        start += count
    return stages


def runtime_headroom_bytes(
    shape: ModelShape, device: DeviceSpec, *, tp: int, act_bytes: int
) -> float:
    """Per-device memory for everything but weights and KV cache (see RUNTIME_OVERHEAD_GIB).

    Fixed runtime overhead + the activation peak of one batch of vLLM's default
    max_num_batched_tokens (residual, norm output, QKV, gate/up output) + fp32 logits for the
    default max_num_seqs.
    """
    tokens = (
        ACTIVATION_TOKENS_LARGE
        if device.memory_gib >= LARGE_DEVICE_GIB
        else ACTIVATION_TOKENS_SMALL
    )
    ffn = shape.intermediate_size
    if shape.moe is not None:
        moe = shape.moe
        ffn = max(
            ffn, moe.experts_per_token * moe.expert_intermediate_size + moe.shared_intermediate_size
        )
    qkv = (shape.num_heads / tp + 2 * _kv_heads_per_device(shape, tp)) * shape.head_dim
    per_token = (4 * shape.hidden_size + 2 * ffn / tp + qkv) * act_bytes
    logits = LOGITS_SEQS * shape.vocab_size / tp * 4
    return RUNTIME_OVERHEAD_GIB * GIB + tokens * per_token + logits


class StageMemory(BaseModel):
    """Memory of one device (one tensor-parallel rank) of a pipeline stage."""

    stage: int = Field(description="Pipeline stage index.")
    layers: str = Field(description="Layer range of the stage, e.g. '0-39'.")
    device_gib: float = Field(description="Device memory.")
    budget_gib: float = Field(description="mem_fraction x device memory: what vLLM may use.")
    weights_gib: float = Field(description="Weights this device holds.")
    headroom_gib: float = Field(description="Runtime overhead and activation peak.")
    kv_cache_gib: float = Field(description="Left for the KV cache (budget - weights - headroom).")
    kv_bytes_per_token: int = Field(description="KV bytes one token needs on this device.")
    kv_tokens: int = Field(description="Tokens of KV cache this device holds.")


def _stage_memory(
    stage: _Stage,
    shape: ModelShape,
    cluster: ClusterShape,
    *,
    tp: int,
    weight_dtype: str,
    mem_fraction: float,
) -> StageMemory:
    budget = mem_fraction * cluster.device.memory_gib * GIB
    headroom = runtime_headroom_bytes(
        shape, cluster.device, tp=tp, act_bytes=_base_bytes(weight_dtype)
    )
    kv_space = budget - stage.weight_bytes - headroom
    return StageMemory(
        stage=stage.index,
        layers=f"{stage.first_layer}-{stage.first_layer + stage.num_layers - 1}",
        device_gib=cluster.device.memory_gib,
        budget_gib=budget / GIB,
        weights_gib=stage.weight_bytes / GIB,
        headroom_gib=headroom / GIB,
        kv_cache_gib=kv_space / GIB,
        kv_bytes_per_token=stage.kv_bytes_per_token,
        kv_tokens=max(0, int(kv_space // stage.kv_bytes_per_token)) if kv_space > 0 else 0,
    )


class _Layout(BaseModel):
    tp: int
    pp: int
    stages: list[StageMemory]
    kv_tokens: int


def _candidate_layouts(
    shape: ModelShape, cluster: ClusterShape, options: PlanOptions
) -> list[tuple[int, int]]:
    """Every (tp, pp) allowed, smallest device count first, then the larger tp (fewer stages).

    tp is a power of two that vLLM accepts, inside one node. Pipeline stages are added only once
    tp fills what a node allows (or tp is forced): tensor parallelism wants the fast in-node link,
    pipeline hops cost little and may cross the network. Stages are spread over the nodes
    (devices_per_node // tp per node) and never outnumber the layers.
    """
    tps = []
    tp = 1
    while tp <= cluster.devices_per_node:
        if tp_violation(shape, tp) is None:
            tps.append(tp)
        tp *= 2
    widest = max(tps)
    out = []
    for tp in tps:
        if options.tp not in (None, tp):
            continue
        max_pp = min(shape.num_layers, cluster.nodes * (cluster.devices_per_node // tp))
        if tp != widest and options.tp is None and options.pp is None:
            max_pp = 1
        out.extend((tp, pp) for pp in range(1, max_pp + 1) if options.pp in (None, pp))
    return sorted(out, key=lambda layout: (layout[0] * layout[1], -layout[0]))


def _check_forced_layout(shape: ModelShape, cluster: ClusterShape, options: PlanOptions) -> None:
    if options.tp is not None:
        why = tp_violation(shape, options.tp)
        if why is None and options.tp > cluster.devices_per_node:
            why = f"tp={options.tp} exceeds the {cluster.devices_per_node} devices of one node"
        if why is None and options.tp & (options.tp - 1):
            why = f"tp={options.tp} is not a power of two"
        if why:
            raise ConfigError(
                f"cannot use --tp {options.tp}: {why}", hint="pick another --tp or leave it out"
            )
    if options.pp is not None and options.pp > shape.num_layers:
        raise ConfigError(f"--pp {options.pp} exceeds the model's {shape.num_layers} layers")
    tp = options.tp or 1
    if options.pp is not None and options.pp * tp > cluster.total_devices:
        raise ConfigError(
            f"tp={tp} x pp={options.pp} needs {tp * options.pp} devices; the cluster has "
            f"{cluster.total_devices}",
            hint="lower --tp/--pp or add nodes",
        )


def _evaluate(
    shape: ModelShape,
    cluster: ClusterShape,
    options: PlanOptions,
    *,
    tp: int,
    pp: int,
    weight_dtype: str,
    kv_dtype: str,
) -> tuple[_Layout, list[_Stage]]:
    stages = _build_stages(shape, tp=tp, pp=pp, weight_dtype=weight_dtype, kv_dtype=kv_dtype)
    memory = [
        _stage_memory(
            s, shape, cluster, tp=tp, weight_dtype=weight_dtype, mem_fraction=options.mem_fraction
        )
        for s in stages
    ]
    return _Layout(tp=tp, pp=pp, stages=memory, kv_tokens=min(m.kv_tokens for m in memory)), stages


def _max_model_len(shape: ModelShape, options: PlanOptions) -> int:
    if options.max_model_len is not None:
        return options.max_model_len
    if shape.max_position_embeddings is None:
        raise ConfigError(
            "config.json does not say the model's context length", hint="pass --max-model-len"
        )
    return shape.max_position_embeddings


def _describe_cluster(cluster: ClusterShape) -> str:
    return (
        f"{cluster.nodes} node{'s' if cluster.nodes > 1 else ''} x {cluster.devices_per_node} "
        f"{cluster.device.name} ({cluster.device.memory_gib:g} GiB)"
    )


def _no_fit_error(
    shape: ModelShape,
    cluster: ClusterShape,
    options: PlanOptions,
    layouts: list[tuple[int, int]],
    *,
    weight_dtype: str,
    kv_dtype: str,
    max_len: int,
) -> ConfigError:
    tp, pp = max(layouts, key=lambda layout: (layout[0] * layout[1], layout[0]))
    layout, _ = _evaluate(
        shape, cluster, options, tp=tp, pp=pp, weight_dtype=weight_dtype, kv_dtype=kv_dtype
    )

    def shortfall(m: StageMemory) -> float:
        return m.weights_gib + m.headroom_gib + m.kv_bytes_per_token * max_len / GIB - m.budget_gib

    worst = max(layout.stages, key=shortfall)
    need_kv = worst.kv_bytes_per_token * max_len / GIB
    need = worst.weights_gib + worst.headroom_gib + need_kv
    # Devices needed if memory split perfectly: all weights + one sequence of KV over the
    # per-device budget left after headroom.
    total_need = (
        weight_bytes(shape, weight_dtype) / GIB
        + kv_bytes_per_token(shape, kv_dtype) * max_len / GIB
    )
    per_device = worst.budget_gib - worst.headroom_gib
    devices = math.ceil(total_need / per_device) if per_device > 0 else None
    int4 = weight_bytes(shape, "int4") / GIB
    name = shape.name or shape.model_type or "the model"
    more = f"about {devices} or more devices" if devices else "devices with more memory"
    return ConfigError(
        f"{name} ({weight_bytes(shape, weight_dtype) / GIB:.1f} GiB of {weight_dtype} weights) does "
        f"not fit on {_describe_cluster(cluster)}: at the largest layout (tp={tp}, pp={pp}) the "
        f"fullest device needs {need:.1f} GiB ({worst.weights_gib:.1f} GiB weights + "
        f"{worst.headroom_gib:.1f} GiB runtime headroom + {need_kv:.2f} GiB KV cache for one "
        f"{max_len}-token "
        f"sequence) but may use {worst.budget_gib:.1f} GiB ({options.mem_fraction:g} x "
        f"{worst.device_gib:g} GiB)",
        hint=f"use {more}, smaller weights (--dtype int4: {int4:.1f} GiB), a shorter "
        "--max-model-len, --kv-dtype fp8, or a higher --mem-fraction",
    )


def choose_parallelism(
    shape: ModelShape, cluster: ClusterShape, *, options: PlanOptions | None = None
) -> tuple[int, int]:
    """The smallest tp x pp that fits: tp inside a node (power of two vLLM accepts), pp across
    nodes, each device's weights + runtime headroom + one max_model_len sequence of KV cache
    within mem_fraction of its memory (vLLM refuses to start otherwise).

    Raises ConfigError with the numbers when no layout fits.
    """
    options = options or PlanOptions()
    _check_forced_layout(shape, cluster, options)
    weight_dtype = resolve_weight_dtype(shape, options.dtype)
    kv_dtype = resolve_kv_dtype(options.kv_dtype, weight_dtype)
    max_len = _max_model_len(shape, options)
    layouts = _candidate_layouts(shape, cluster, options)
    if not layouts:
        raise ConfigError(
            f"no tensor/pipeline layout of {_describe_cluster(cluster)} suits this model",
            hint="check --tp/--pp against the devices per node and the model's heads",
        )
    for tp, pp in layouts:
        layout, _ = _evaluate(
            shape, cluster, options, tp=tp, pp=pp, weight_dtype=weight_dtype, kv_dtype=kv_dtype
        )
        if layout.kv_tokens >= max_len:
            return tp, pp
    raise _no_fit_error(
        shape,
        cluster,
        options,
        layouts,
        weight_dtype=weight_dtype,
        kv_dtype=kv_dtype,
        max_len=max_len,
    )


# ---------------------------------------------------------------------------------------------
# Speed
# ---------------------------------------------------------------------------------------------


def experts_touched(num_experts: int, experts_per_token: int, tokens: float) -> float:
    """Expected distinct experts a batch of ``tokens`` routes to (uniform routing): each must be
    read from memory once per step, so MoE decode reads more than the active weights at batch > 1."""
    if tokens <= 0:
        return 0.0
    return num_experts * (1 - (1 - experts_per_token / num_experts) ** tokens)


class StepTime(BaseModel):
    """One forward step on the whole pipeline, split into its bounds."""

    total_ms: float = Field(
        description="Step time: sum over stages of max(memory, compute) + communication."
    )
    memory_ms: float = Field(
        description="Time to read weights and KV cache at the given bandwidth."
    )
    compute_ms: float = Field(description="Time for the FLOPs at the given peak.")
    tp_comm_ms: float = Field(description="Tensor-parallel all-reduces.")
    pp_comm_ms: float = Field(description="Pipeline stage hops.")
    bound: Literal["memory", "compute"] = Field(description="Which bound dominates the stages.")


def _step_time(
    shape: ModelShape,
    cluster: ClusterShape,
    stages: list[_Stage],
    options: PlanOptions,
    *,
    tp: int,
    act_bytes: int,
    seqs: int,
    new_tokens: int,
    past_tokens: int,
) -> StepTime:
    """Time of one step of ``seqs`` sequences each adding ``new_tokens`` after ``past_tokens``."""
    dev = cluster.device
    bandwidth = dev.bandwidth_gbs * 1e9 * options.bandwidth_efficiency
    flops = dev.bf16_tflops * 1e12 * options.flops_efficiency
    tokens = seqs * new_tokens
    # Causal attention: each new token attends to the past and to the new tokens before it.
    pairs = seqs * (new_tokens * past_tokens + new_tokens * (new_tokens + 1) / 2)
    kv_tokens = seqs * (past_tokens + new_tokens)
    mem_total = compute_total = busy = 0.0
    memory_bound_time = 0.0
    for s in stages:
        touched = 0.0
        if s.moe_layers and shape.moe is not None:
            touched = experts_touched(shape.moe.num_experts, shape.moe.experts_per_token, tokens)
        mem_bytes = s.dense_read_bytes + s.moe_layers * touched * s.expert_bytes
        mem_bytes += kv_tokens * s.kv_bytes_per_token  # read the context, write the new tokens
        linear = s.dense_linear_params + (
            s.moe_layers * shape.moe.experts_per_token * s.expert_linear_params
            if shape.moe
            else 0.0
        )
        # vLLM computes logits only for the last token of each sequence.
        flop = 2 * linear * tokens + 2 * s.lm_head_params * seqs + s.attn_flops_per_pair * pairs
        mem_t, comp_t = mem_bytes / bandwidth, flop / flops
        mem_total += mem_t
        compute_total += comp_t
        busy += max(mem_t, comp_t)
        memory_bound_time += mem_t if mem_t >= comp_t else 0.0
    comm = communication(shape, cluster, tp=tp, pp=len(stages), act_bytes=act_bytes)
    tp_ms = comm.tp_ms_per_token * tokens
    pp_ms = comm.pp_ms_per_token * tokens
    return StepTime(
        total_ms=busy * 1e3 + tp_ms + pp_ms,
        memory_ms=mem_total * 1e3,
        compute_ms=compute_total * 1e3,
        tp_comm_ms=tp_ms,
        pp_comm_ms=pp_ms,
        bound="memory" if memory_bound_time >= busy / 2 else "compute",
    )


class Communication(BaseModel):
    """Bytes the layout moves per token and the time that adds at the given link speeds."""

    tp_allreduce_bytes_per_token_per_layer: float = Field(
        description="Bytes each rank sends per token per layer: 2 all-reduces x hidden x act bytes x 2(tp-1)/tp (ring)."
    )
    tp_link_gbs: float = Field(description="Link the all-reduces use (inside a node), GB/s.")
    tp_ms_per_token: float = Field(description="All-reduce time per token over all layers.")
    pp_hop_bytes_per_token: float = Field(
        description="Bytes per token per stage hop: hidden_states + residual, hidden x act bytes each."
    )
    pp_hops: int = Field(description="Stage boundaries (pp - 1).")
    pp_hops_across_nodes: int = Field(description="Boundaries that cross the network.")
    network_gbs: float = Field(description="Inter-node link (--link-gbps / 8), GB/s.")
    pp_ms_per_token: float = Field(description="Hop time per token over all boundaries.")


def communication(
    shape: ModelShape, cluster: ClusterShape, *, tp: int, pp: int, act_bytes: int
) -> Communication:
    """Tensor- and pipeline-parallel traffic per token (bandwidth terms; per-message latency,
    5-20 us per all-reduce in practice, is not modelled)."""
    intra = cluster.device.interconnect_gbs * 1e9
    network = cluster.link_gbps / 8 * 1e9
    ring = 2 * (tp - 1) / tp
    ar_bytes = TP_ALLREDUCES_PER_LAYER * shape.hidden_size * act_bytes * ring
    hop_bytes = PP_TENSORS_PER_HOP * shape.hidden_size * act_bytes
    stages_per_node = max(1, cluster.devices_per_node // tp)
    across = sum(1 for i in range(pp - 1) if i // stages_per_node != (i + 1) // stages_per_node)
    pp_s = across * hop_bytes / network + (pp - 1 - across) * hop_bytes / intra
    return Communication(
        tp_allreduce_bytes_per_token_per_layer=ar_bytes,
        tp_link_gbs=cluster.device.interconnect_gbs,
        tp_ms_per_token=ar_bytes * shape.num_layers / intra * 1e3,
        pp_hop_bytes_per_token=hop_bytes,
        pp_hops=pp - 1,
        pp_hops_across_nodes=across,
        network_gbs=cluster.link_gbps / 8,
        pp_ms_per_token=pp_s * 1e3,
    )


# ---------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------


class ModelSummary(BaseModel):
    """What the planner read from the config."""

    name: str
    model_type: str
    layers: int
    hidden_size: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab_size: int
    tied_embeddings: bool
    num_experts: int | None = None
    experts_per_token: int | None = None
    latent_attention: bool = False
    params: ParamCount
    weight_gib_by_dtype: dict[str, float] = Field(description="All weights in each dtype, GiB.")
    kv_bytes_per_token: int = Field(description="Whole model, at the plan's KV dtype.")


class Performance(BaseModel):
    """Ideal-bound speed estimates (divide by efficiency < 1 for realistic numbers)."""

    context_tokens: int = Field(
        description="Context each decoding sequence has (the prompt length)."
    )
    decode_batch1: StepTime = Field(description="One sequence: time per output token.")
    concurrency: int = Field(description="Requested concurrent sequences.")
    effective_concurrency: int = Field(
        description="Concurrency the KV cache holds at this context."
    )
    decode_at_concurrency: StepTime = Field(description="Time per output token of each sequence.")
    throughput_tokens_per_s: float = Field(
        description="Output tokens/s of the deployment at that concurrency."
    )
    prefill: StepTime = Field(
        description="One prompt of prompt_len tokens (time to first token floor)."
    )


class Cost(BaseModel):
    """Price of the output tokens at the estimated throughput."""

    cost_per_hour: float = Field(description="Whole cluster, dollars per hour.")
    dollars_per_million_tokens: float
    tokens_per_cent: float


class Plan(BaseModel):
    """Everything `llamacluster plan` reports; `up` reads tp and pp from it."""

    model: ModelSummary
    cluster: ClusterShape
    options: PlanOptions
    weight_dtype: str
    kv_dtype: str
    max_model_len: int
    tp: int
    pp: int
    memory: list[StageMemory] = Field(description="Per device of each pipeline stage.")
    kv_tokens: int = Field(description="KV-cache tokens the deployment holds (smallest stage).")
    sequences_fit: int = Field(description="Sequences of max_model_len tokens that fit at once.")
    performance: Performance
    communication: Communication
    cost: Cost | None = None
    notes: list[str] = Field(default_factory=list)

    @computed_field(description="tp x pp.")
    @property
    def devices_used(self) -> int:
        return self.tp * self.pp


def plan_deployment(
    model_shape: ModelShape, cluster_shape: ClusterShape, options: PlanOptions | None = None
) -> Plan:
    """Size a deployment: layout (tp x pp), per-device memory, speed bounds, traffic and cost.

    Used by `llamacluster plan` and by `up` for its tp x pp defaults; raises ConfigError (with
    the numbers) when nothing fits.
    """
    options = options or PlanOptions()
    shape, cluster = model_shape, cluster_shape
    tp, pp = choose_parallelism(shape, cluster, options=options)
    weight_dtype = resolve_weight_dtype(shape, options.dtype)
    kv_dtype = resolve_kv_dtype(options.kv_dtype, weight_dtype)
    act_bytes = _base_bytes(weight_dtype)
    max_len = _max_model_len(shape, options)
    layout, stages = _evaluate(
        shape, cluster, options, tp=tp, pp=pp, weight_dtype=weight_dtype, kv_dtype=kv_dtype
    )
    step = dict(tp=tp, act_bytes=act_bytes)
    context = options.prompt_len
    fit_at_context = max(1, layout.kv_tokens // (context + 1))
    effective = min(options.concurrency, fit_at_context)
    # With pp > 1 vLLM keeps pp micro-batches in flight; each stage works on concurrency / pp.
    micro = max(1, math.ceil(effective / pp))
    batch1 = _step_time(
        shape, cluster, stages, options, seqs=1, new_tokens=1, past_tokens=context, **step
    )
    at_conc = _step_time(
        shape, cluster, stages, options, seqs=micro, new_tokens=1, past_tokens=context, **step
    )
    prefill = _step_time(
        shape, cluster, stages, options, seqs=1, new_tokens=context, past_tokens=0, **step
    )
    throughput = effective / (at_conc.total_ms / 1e3)
    notes = [
        "speeds are ideal bounds (efficiency 1.0) unless --flops-efficiency/--bandwidth-efficiency "
        "say otherwise"
        if options.flops_efficiency == 1.0 and options.bandwidth_efficiency == 1.0
        else f"speeds use flops efficiency {options.flops_efficiency:g} and bandwidth efficiency "
        f"{options.bandwidth_efficiency:g}",
    ]
    if effective < options.concurrency:
        notes.append(
            f"the KV cache holds only {fit_at_context} sequences of {context + 1} tokens; "
            f"throughput is for {effective}, not {options.concurrency}"
        )
    if context > max_len:
        notes.append(f"prompt length {context} exceeds max_model_len {max_len}")
    cost = None
    if options.cost_per_hour is not None:
        per_hour = throughput * 3600
        cost = Cost(
            cost_per_hour=options.cost_per_hour,
            dollars_per_million_tokens=options.cost_per_hour / per_hour * 1e6,
            tokens_per_cent=per_hour / (options.cost_per_hour * 100),
        )
    counts = count_parameters(shape)
    return Plan(
        model=ModelSummary(
            name=shape.name,
            model_type=shape.model_type,
            layers=shape.num_layers,
            hidden_size=shape.hidden_size,
            heads=shape.num_heads,
            kv_heads=shape.num_kv_heads,
            head_dim=shape.head_dim,
            vocab_size=shape.vocab_size,
            tied_embeddings=shape.tied_embeddings,
            num_experts=shape.moe.num_experts if shape.moe else None,
            experts_per_token=shape.moe.experts_per_token if shape.moe else None,
            latent_attention=shape.mla is not None,
            params=counts,
            weight_gib_by_dtype={d: weight_bytes(shape, d) / GIB for d in ("bf16", "fp8", "int4")},
            kv_bytes_per_token=kv_bytes_per_token(shape, kv_dtype),
        ),
        cluster=cluster,
        options=options,
        weight_dtype=weight_dtype,
        kv_dtype=kv_dtype,
        max_model_len=max_len,
        tp=tp,
        pp=pp,
        memory=layout.stages,
        kv_tokens=layout.kv_tokens,
        sequences_fit=layout.kv_tokens // max_len,
        performance=Performance(
            context_tokens=context,
            decode_batch1=batch1,
            concurrency=options.concurrency,
            effective_concurrency=effective,
            decode_at_concurrency=at_conc,
            throughput_tokens_per_s=throughput,
            prefill=prefill,
        ),
        communication=communication(shape, cluster, tp=tp, pp=pp, act_bytes=act_bytes),
        cost=cost,
        notes=notes,
    )
