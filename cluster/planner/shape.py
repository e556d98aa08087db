"""Model shape: the numbers of a decoder-only transformer that decide its memory and speed
(ModelShape, with its MoE and latent-attention parts), read from a parsed config.json."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from cluster.errors import ConfigError
from cluster.planner.dtypes import WEIGHT_DTYPE_BYTES, normalize_dtype

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
