"""Builds the random-weight demo Llama checkpoint, laid out exactly like a model on the hub."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cluster.errors import ConfigError

if TYPE_CHECKING:
    import numpy as np

#: Repository id the demo model goes by (loopback hub, served model name).
DEMO_MODEL_REPO_ID = "llamacluster/demo-tiny-llama"
#: Written last inside the model directory; records how the model was built.
BUILD_RECORD = "llamacluster-demo.json"
#: Bumped whenever the builder's output bytes change, so stale builds are rebuilt.
BUILDER_VERSION = 1
#: Said wherever a person sees the demo model.
GIBBERISH_NOTICE = (
    "random-weight demo model: it runs the whole serving path, but its output is gibberish"
)

#: Most shards a demo model can have (all of different sizes).
MAX_SHARDS = 32

_BYTES_PER_PARAM = 2  # bfloat16
_HEAD_DIM = 64  # vLLM's CPU attention needs head_dim >= 64
_VOCAB_SIZE = 512
_MAX_POSITIONS = 2048
_INIT_STD = 0.02  # small enough that activations stay finite through every layer
_BOS = "<|begin_of_text|>"
_EOS = "<|end_of_text|>"
_EOT = "<|eot_id|>"
_SPECIAL_TOKENS = [_BOS, _EOS, "<|start_header_id|>", "<|end_header_id|>", _EOT, "<|pad|>"]

# Llama-3 style chat template; works with both plain-string and list-of-parts message content.
_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['content'] is string %}{% set content = message['content'] %}"
    "{% else %}{% set content = message['content'] | selectattr('type', 'equalto', 'text')"
    " | map(attribute='text') | join('') %}{% endif %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{{ content | trim }}<|eot_id|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)

# A small, fixed training text for the tokenizer: varied enough to learn a few hundred merges.
_CORPUS = """\
The llama is a domesticated South American camelid, widely used as a meat and pack animal by
Andean cultures since the pre-Columbian era. Llamas are social animals and live with others as a
herd. Their wool is soft and contains only a small amount of lanolin.
A cluster is a set of machines that work together. The head node starts the scheduler, and every
worker node joins it. Requests arrive over HTTP, are placed in a queue, and are answered token by
token while the next batch is prepared. Tensor parallel workers split each layer; pipeline
parallel workers split the stack of layers.
Hello! How are you today? I am fine, thank you. What would you like to talk about? Tell me a
story about a mountain, a river, and a small village where the people build clocks.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 16 32 64 128 256 512 1024 2048 4096.
def main(argv):\n    for item in argv:\n        print(item)\n    return 0
{"model": "demo", "messages": [{"role": "user", "content": "Say hello."}], "stream": true}
The weather is cold in the mountains and warm in the valley. Bring water, a map, and a coat.
System: you are a helpful assistant. User: what is the capital of France? Assistant: Paris.
"""


@dataclass(frozen=True)
class DemoModelSpec:
    """The architecture of a demo model; a pure function of the requested size and shard count."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int = _VOCAB_SIZE
    max_position_embeddings: int = _MAX_POSITIONS

    @property
    def head_dim(self) -> int:
        """Width of one attention head (hidden / heads)."""
        return self.hidden_size // self.num_attention_heads

    def tensor_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        """Every weight of the checkpoint with its shape, in the order the shards store them."""
        h, i, d = self.hidden_size, self.intermediate_size, self.head_dim
        q, kv = self.num_attention_heads * d, self.num_key_value_heads * d
        shapes: list[tuple[str, tuple[int, ...]]] = [
            ("model.embed_tokens.weight", (self.vocab_size, h))
        ]
        for n in range(self.num_hidden_layers):
            p = f"model.layers.{n}"
            shapes += [
                (f"{p}.input_layernorm.weight", (h,)),
                (f"{p}.self_attn.q_proj.weight", (q, h)),
                (f"{p}.self_attn.k_proj.weight", (kv, h)),
                (f"{p}.self_attn.v_proj.weight", (kv, h)),
                (f"{p}.self_attn.o_proj.weight", (h, q)),
                (f"{p}.post_attention_layernorm.weight", (h,)),
                (f"{p}.mlp.gate_proj.weight", (i, h)),
                (f"{p}.mlp.up_proj.weight", (i, h)),
                (f"{p}.mlp.down_proj.weight", (h, i)),
            ]
        shapes += [("model.norm.weight", (h,)), ("lm_head.weight", (self.vocab_size, h))]
        return shapes

    @property
    def weight_bytes(self) -> int:
        """Bytes of all weights in bfloat16 (the sum of the shards' tensor data)."""
        return sum(math.prod(s) for _, s in self.tensor_shapes()) * _BYTES_PER_PARAM


#: The default demo model: hidden 256, 4 heads of 64, 2 KV heads, 4 layers (about 7 MB).
TINY_SPEC = DemoModelSpec(
    hidden_size=256,
    intermediate_size=768,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
)

# Widths to grow into as the requested size rises: (hidden, heads, kv heads, largest size in MB).
_WIDTHS = [(256, 4, 2, 40.0), (512, 8, 4, 200.0), (1024, 16, 8, 2000.0), (2048, 32, 8, math.inf)]


def plan_demo_model(target_size_mb: float | None = None, *, num_shards: int = 4) -> DemoModelSpec:
    """Choose an architecture whose weights total about ``target_size_mb`` (None: the tiny default).

    Width is chosen from a fixed ladder, then the layer count and the MLP width are set to land
    near the target; enough layers are kept that ``num_shards`` shards can all differ in size.
    """
    if not 1 <= num_shards <= MAX_SHARDS:
        raise ConfigError(f"shard count must be between 1 and {MAX_SHARDS}, got {num_shards}")
    if target_size_mb is None:
        spec = TINY_SPEC
    else:
        if not target_size_mb > 0:
            raise ConfigError(f"model size must be positive, got {target_size_mb} MB")
        target = target_size_mb * 1e6
        hidden, heads, kv_heads, _ = next(w for w in _WIDTHS if target_size_mb <= w[3])
        base = DemoModelSpec(
            hidden_size=hidden,
            intermediate_size=_round_to(hidden * 8 // 3, 64),
            num_hidden_layers=1,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
        )
        fixed = 2 * base.vocab_size * hidden * _BYTES_PER_PARAM + hidden * _BYTES_PER_PARAM
        per_layer = base.weight_bytes - fixed
        layers = max(2, _min_layers(num_shards), round((target - fixed) / per_layer))
        attn_and_norms = per_layer - 3 * hidden * base.intermediate_size * _BYTES_PER_PARAM
        mlp_per_layer = (target - fixed) / layers - attn_and_norms
        inter = max(64, _round_to(mlp_per_layer / (3 * hidden * _BYTES_PER_PARAM), 64))
        spec = dataclasses.replace(base, num_hidden_layers=layers, intermediate_size=inter)
    if spec.num_hidden_layers < _min_layers(num_shards):
        spec = dataclasses.replace(spec, num_hidden_layers=_min_layers(num_shards))
    return spec


def _min_layers(num_shards: int) -> int:
    """About one layer (9 tensors) per shard beyond the fourth, so many shards can all differ."""
    return max(0, num_shards - 1) if num_shards > 4 else 0


def _round_to(value: float, multiple: int) -> int:
    return max(multiple, round(value / multiple) * multiple)


def plan_shards(sizes: list[int], num_shards: int) -> list[int]:
    """Split tensors (in order) into ``num_shards`` contiguous groups of pairwise different sizes.

    Returns the index of the first tensor of each shard. Shard k aims at a share proportional to
    ``num_shards + k`` (so sizes differ by design); where identical layers would give two shards
    the same size, the nearest boundary that keeps every size distinct is taken instead.
    """
    n = len(sizes)
    if num_shards < 1 or num_shards > n:
        raise ConfigError(
            f"cannot split {n} tensors into {num_shards} shards",
            hint="ask for fewer shards or a larger --size-mb",
        )
    prefix = [0]
    for size in sizes:
        prefix.append(prefix[-1] + size)
    weights = [num_shards + k for k in range(num_shards)]
    goals = [prefix[n] * sum(weights[: k + 1]) / sum(weights) for k in range(num_shards)]
    starts, used = [0], set()
    for k in range(num_shards - 1):
        start, last_end = starts[-1], n - (num_shards - 1 - k)  # one tensor left per later shard
        own_goal = prefix[n] * weights[k] / sum(weights)

        def badness(end: int, start: int = start, k: int = k, own_goal: float = own_goal) -> tuple:
            # Avoid slivers (a lone norm vector), then stay close to the running goal.
            return (prefix[end] - prefix[start] < 0.3 * own_goal, abs(prefix[end] - goals[k]))

        end = min(range(start + 1, last_end + 1), key=badness)
        while end <= last_end and prefix[end] - prefix[start] in used:
            end += 1  # identical layers give identical sizes: take one more tensor
        if end > last_end:
            break
        used.add(prefix[end] - prefix[start])
        starts.append(end)
    else:
        if prefix[n] - prefix[starts[-1]] not in used:
            return starts
        # The remainder clashes: move the last boundary until both last shards are new sizes.
        before = starts[-2]
        others = used - {prefix[starts[-1]] - prefix[before]}
        for end in sorted(range(before + 1, n), key=lambda e: abs(e - starts[-1])):
            second, last = prefix[end] - prefix[before], prefix[n] - prefix[end]
            if second != last and not {second, last} & others:
                return [*starts[:-1], end]
    raise ConfigError(
        f"cannot split the weights into {num_shards} shards of different sizes",
        hint="ask for fewer shards or a larger --size-mb",
    )


def default_demo_model_dir() -> Path:
    """Where the built-in demo model lives: ``$LLAMACLUSTER_HOME/demo-model`` or the user cache."""
    home = os.environ.get("LLAMACLUSTER_HOME")
    if home:
        return Path(home).expanduser() / "demo-model"
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "llamacluster" / "demo-model"


def ensure_demo_model(
    path: str | os.PathLike[str] | None = None,
    *,
    seed: int = 0,
    target_size_mb: float | None = None,
    num_shards: int = 4,
) -> Path:
    """Return the demo model directory (default location unless ``path``), building it if needed.

    This is the explicit default model of a local run when no ``--model`` is given.
    """
    where = default_demo_model_dir() if path is None else path
    return build_demo_model(where, seed=seed, target_size_mb=target_size_mb, num_shards=num_shards)


def build_demo_model(
    path: str | os.PathLike[str],
    *,
    seed: int = 0,
    target_size_mb: float | None = None,
    num_shards: int = 4,
) -> Path:
    """Write a random-weight Llama checkpoint to ``path`` exactly as a hub model looks.

    Files: config.json, generation_config.json, tokenizer.json, tokenizer_config.json,
    special_tokens_map.json, model-0000k-of-0000n.safetensors shards of pairwise different sizes,
    model.safetensors.index.json, and a README.md model card. The bytes depend only on the
    arguments (same seed, same files). The model is built in a temporary directory next to
    ``path`` and renamed into place, so ``path`` never holds a half-built model; a complete model
    built with the same arguments is reused as it is. Needs numpy, safetensors and tokenizers only.
    """
    target = Path(path).expanduser().absolute()
    spec = plan_demo_model(target_size_mb, num_shards=num_shards)
    params = {
        "builder_version": BUILDER_VERSION,
        "seed": seed,
        "target_size_mb": target_size_mb,
        "num_shards": num_shards,
    }
    if _is_complete_build(target, params):
        return target
    if target.exists() and _read_build_record(target) is None and not _is_empty_dir(target):
        raise ConfigError(
            f"{target} exists and is not a demo model; refusing to overwrite it",
            hint="pass an empty or new directory",
        )
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{target.name}.building-", dir=target.parent))
    except OSError as exc:
        raise ConfigError(f"cannot create {target.parent}: {exc.strerror}") from exc
    try:
        _write_model(work, spec, seed=seed, num_shards=num_shards, params=params)
        _move_into_place(work, target, params)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def _write_model(
    work: Path, spec: DemoModelSpec, *, seed: int, num_shards: int, params: dict[str, object]
) -> None:
    tokenizer_json, vocab = _train_tokenizer(spec.vocab_size)
    special_ids = {tok: vocab[tok] for tok in _SPECIAL_TOKENS}
    _write_text(work / "tokenizer.json", tokenizer_json)
    _write_json(work / "config.json", _config(spec, special_ids))
    _write_json(
        work / "generation_config.json",
        {
            "bos_token_id": special_ids[_BOS],
            "eos_token_id": [special_ids[_EOS], special_ids[_EOT]],
            "do_sample": True,
            "temperature": 0.6,
            "top_p": 0.9,
        },
    )
    _write_json(work / "tokenizer_config.json", _tokenizer_config(spec, special_ids))
    _write_json(
        work / "special_tokens_map.json",
        {"bos_token": _BOS, "eos_token": _EOT, "pad_token": "<|pad|>"},
    )
    _write_shards(work, spec, seed=seed, num_shards=num_shards)
    _write_text(work / "README.md", _model_card(spec, shard_count=num_shards, seed=seed))
    files = {p.name: p.stat().st_size for p in sorted(work.iterdir())}
    _write_json(work / BUILD_RECORD, {"params": params, "files": files, "notice": GIBBERISH_NOTICE})
    _fsync_dir(work)


def _config(spec: DemoModelSpec, special_ids: dict[str, int]) -> dict[str, object]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_hidden_layers,
        "num_attention_heads": spec.num_attention_heads,
        "num_key_value_heads": spec.num_key_value_heads,
        "head_dim": spec.head_dim,
        "vocab_size": spec.vocab_size,
        "max_position_embeddings": spec.max_position_embeddings,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "initializer_range": _INIT_STD,
        "bos_token_id": special_ids[_BOS],
        "eos_token_id": special_ids[_EOT],
        "pad_token_id": special_ids["<|pad|>"],
        "torch_dtype": "bfloat16",
        "use_cache": True,
    }


def _tokenizer_config(spec: DemoModelSpec, special_ids: dict[str, int]) -> dict[str, object]:
    decoder = {
        str(idx): {
            "content": tok,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for tok, idx in sorted(special_ids.items(), key=lambda kv: kv[1])
    }
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": _BOS,
        "eos_token": _EOT,
        "pad_token": "<|pad|>",
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": spec.max_position_embeddings,
        "chat_template": _CHAT_TEMPLATE,
        "added_tokens_decoder": decoder,
    }


def _train_tokenizer(vocab_size: int) -> tuple[str, dict[str, int]]:
    """Train a byte-level BPE on the built-in corpus; reserved tokens fill it to ``vocab_size``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 16,
        special_tokens=_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.splitlines(), trainer=trainer)
    missing = vocab_size - tok.get_vocab_size()
    tok.add_special_tokens([f"<|reserved_special_token_{k}|>" for k in range(missing)])
    bos_id = tok.token_to_id(_BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{_BOS} $A", pair=f"{_BOS} $A {_BOS} $B", special_tokens=[(_BOS, bos_id)]
    )
    if tok.get_vocab_size() != vocab_size:
        raise AssertionError(f"tokenizer has {tok.get_vocab_size()} tokens, wanted {vocab_size}")
    return tok.to_str(pretty=True), tok.get_vocab()


def _tensor_values(name: str, shape: tuple[int, ...], *, seed: int, index: int) -> np.ndarray:
    """bfloat16 bits (uint16) of one weight: norms are 1, everything else normal(0, 0.02)."""
    import numpy as np

    if name.endswith("norm.weight"):
        values = np.ones(shape, dtype=np.float32)
    else:
        rng = np.random.default_rng([seed, index])
        values = rng.standard_normal(shape, dtype=np.float32)
        values *= np.float32(_INIT_STD)
    bits = values.view(np.uint32)
    # Round to nearest even when dropping the low 16 bits (float32 -> bfloat16).
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    return np.ascontiguousarray(rounded.astype(np.uint16))


def _write_shards(work: Path, spec: DemoModelSpec, *, seed: int, num_shards: int) -> None:
    """Write the weights as ``num_shards`` safetensors files plus model.safetensors.index.json."""
    from safetensors import TensorSpec, serialize_file

    shapes = spec.tensor_shapes()
    sizes = [math.prod(s) * _BYTES_PER_PARAM for _, s in shapes]
    starts = plan_shards(sizes, num_shards)
    ends = [*starts[1:], len(shapes)]
    weight_map: dict[str, str] = {}
    for k, (first, stop) in enumerate(zip(starts, ends, strict=True)):
        shard_name = f"model-{k + 1:05d}-of-{num_shards:05d}.safetensors"
        arrays = {
            name: _tensor_values(name, shape, seed=seed, index=idx)
            for idx, (name, shape) in enumerate(shapes[first:stop], start=first)
        }
        specs = {
            name: TensorSpec(
                dtype="bfloat16",
                shape=list(arr.shape),
                data_ptr=arr.ctypes.data,
                data_len=arr.nbytes,
            )
            for name, arr in arrays.items()
        }
        serialize_file(specs, str(work / shard_name), metadata={"format": "pt"})
        _fsync_file(work / shard_name)
        weight_map.update(dict.fromkeys(arrays, shard_name))
    index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
    _write_json(work / "model.safetensors.index.json", index)


def _model_card(spec: DemoModelSpec, *, shard_count: int, seed: object) -> str:
    return f"""---
license: apache-2.0
library_name: transformers
pipeline_tag: text-generation
tags: [llama, demo, random-weights]
---

# {DEMO_MODEL_REPO_ID}

**This is a {GIBBERISH_NOTICE}.** Its weights are random numbers (seed {seed}); it was not
trained and knows nothing. It exists so that llamacluster can show and test the whole path
(download, loading, tensor and pipeline parallel serving, the OpenAI API, benchmarks) on any
machine without a model hub.

| | |
| --- | --- |
| architecture | LlamaForCausalLM |
| hidden size / MLP width | {spec.hidden_size} / {spec.intermediate_size} |
| layers | {spec.num_hidden_layers} |
| attention heads / KV heads / head dim | {spec.num_attention_heads} / {spec.num_key_value_heads} / {spec.head_dim} |
| vocabulary | {spec.vocab_size} (byte-level BPE trained on a few paragraphs) |
| weights | {spec.weight_bytes / 1e6:.1f} MB bfloat16 in {shard_count} safetensors shards |

Rebuild it with `llamacluster demo-model PATH --seed {seed}`.
"""


def _write_json(path: Path, data: object) -> None:
    _write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def _write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_build_record(target: Path) -> dict | None:
    try:
        record = json.loads((target / BUILD_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _is_complete_build(target: Path, params: dict[str, object]) -> bool:
    """True when ``target`` holds a finished demo build made with exactly ``params``."""
    record = _read_build_record(target)
    return record is not None and record.get("params") == params and _files_match(target, record)


def _files_match(target: Path, record: dict) -> bool:
    files = record.get("files")
    if not isinstance(files, dict):
        return False
    for name, size in files.items():
        try:
            if (target / name).stat().st_size != size:
                return False
        except OSError:
            return False
    return True


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def _move_into_place(work: Path, target: Path, params: dict[str, object]) -> None:
    """Rename the finished build onto ``target``; an older demo build there is swapped out."""
    if _is_complete_build(target, params):
        return  # another process finished the same build first: keep it, it may be in use
    old: Path | None = None
    if target.exists() and not _is_empty_dir(target):
        old = target.with_name(f".{target.name}.old-{os.getpid()}-{work.name[-8:]}")
        os.rename(target, old)
    try:
        os.rename(work, target)
    except OSError:
        if not _is_complete_build(target, params):  # else someone else's identical build won
            raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(target.parent)
