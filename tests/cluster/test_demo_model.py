"""The demo model builder: hub layout, shards, determinism, size parameters, atomic writes."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

from cluster.demo_model import (
    BUILD_RECORD,
    DEMO_MODEL_REPO_ID,
    MAX_SHARDS,
    build_demo_model,
    default_demo_model_dir,
    ensure_demo_model,
    plan_demo_model,
    plan_shards,
)
from cluster.errors import ConfigError
from tests.support.hub import file_sha256, iter_model_files

HUB_FILES = {
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "model.safetensors.index.json",
    "README.md",
}


def _digests(path: Path) -> dict[str, str]:
    return {p.name: file_sha256(p) for p in iter_model_files(path)}


def _shards(path: Path) -> list[Path]:
    return sorted(path.glob("model-*-of-*.safetensors"))


def test_layout_is_a_hub_llama(demo_model_dir: Path) -> None:
    names = {p.name for p in demo_model_dir.iterdir()}
    assert names >= HUB_FILES
    config = json.loads((demo_model_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["model_type"] == "llama"
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    assert head_dim == config["head_dim"] >= 64
    assert config["num_attention_heads"] % 2 == 0 and config["num_key_value_heads"] % 2 == 0
    assert config["intermediate_size"] % 2 == 0
    tok_config = json.loads((demo_model_dir / "tokenizer_config.json").read_text())
    assert "{% for message in messages %}" in tok_config["chat_template"]
    assert tok_config["bos_token"] and tok_config["eos_token"]
    card = (demo_model_dir / "README.md").read_text()
    assert "random-weight demo model" in card and "gibberish" in card
    assert DEMO_MODEL_REPO_ID in card


def test_shards_differ_in_size_and_match_the_index(demo_model_dir: Path) -> None:
    shards = _shards(demo_model_dir)
    assert len(shards) >= 4
    sizes = [p.stat().st_size for p in shards]
    assert len(set(sizes)) == len(sizes), sizes
    index = json.loads((demo_model_dir / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    config = json.loads((demo_model_dir / "config.json").read_text())
    total = 0
    seen: set[str] = set()
    for shard in shards:
        with safe_open(str(shard), framework="numpy") as fh:
            assert fh.metadata() == {"format": "pt"}
            for name in fh.keys():  # noqa: SIM118 - safe_open has no __iter__
                assert index["weight_map"][name] == shard.name
                shape = fh.get_slice(name).get_shape()
                assert fh.get_slice(name).get_dtype() == "BF16"
                total += math.prod(shape) * 2
                seen.add(name)
    assert seen == set(index["weight_map"])
    assert index["metadata"]["total_size"] == total
    h = config["hidden_size"]
    assert f"model.layers.{config['num_hidden_layers'] - 1}.mlp.down_proj.weight" in seen
    assert {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"} <= seen
    with safe_open(str(demo_model_dir / index["weight_map"]["lm_head.weight"]), "numpy") as fh:
        assert fh.get_slice("lm_head.weight").get_shape() == [config["vocab_size"], h]


def test_tokenizer_round_trips_and_fills_the_vocabulary(demo_model_dir: Path) -> None:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(demo_model_dir / "tokenizer.json"))
    config = json.loads((demo_model_dir / "config.json").read_text())
    assert tok.get_vocab_size() == config["vocab_size"]
    enc = tok.encode("Hello llamas, how are you?")
    assert enc.ids[0] == config["bos_token_id"]
    assert tok.decode(enc.ids) == "Hello llamas, how are you?"
    assert tok.token_to_id("<|eot_id|>") == config["eos_token_id"]


def test_same_seed_same_bytes_across_processes(tmp_path: Path, demo_model_dir: Path) -> None:
    # A fresh interpreter with another hash seed must produce identical files.
    code = (
        "import sys; from cluster.demo_model import build_demo_model; build_demo_model(sys.argv[1])"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "again")], check=True, env=env)
    assert _digests(tmp_path / "again") == _digests(demo_model_dir)


def test_other_seed_other_weights_same_tokenizer(tmp_path: Path, demo_model_dir: Path) -> None:
    other = _digests(build_demo_model(tmp_path / "seed1", seed=1))
    base = _digests(demo_model_dir)
    assert other["tokenizer.json"] == base["tokenizer.json"]
    assert other["config.json"] == base["config.json"]
    assert all(other[s.name] != base[s.name] for s in _shards(demo_model_dir))


@pytest.mark.parametrize(("size_mb", "shards"), [(3.0, 6), (30.0, 16)])
def test_size_and_shard_count_are_honoured(tmp_path: Path, size_mb: float, shards: int) -> None:
    path = build_demo_model(tmp_path / "m", target_size_mb=size_mb, num_shards=shards)
    files = _shards(path)
    assert len(files) == shards
    sizes = [p.stat().st_size for p in files]
    assert len(set(sizes)) == shards
    assert sum(sizes) == pytest.approx(size_mb * 1e6, rel=0.3)
    config = json.loads((path / "config.json").read_text())
    assert config["hidden_size"] // config["num_attention_heads"] >= 64


def test_plan_is_pure_arithmetic() -> None:
    spec = plan_demo_model(300, num_shards=16)
    assert spec.weight_bytes == pytest.approx(300e6, rel=0.05)
    assert spec.head_dim >= 64 and spec.num_key_value_heads % 2 == 0
    sizes = [math.prod(s) * 2 for _, s in spec.tensor_shapes()]
    starts = plan_shards(sizes, 16)
    ends = [*starts[1:], len(sizes)]
    totals = [sum(sizes[a:b]) for a, b in zip(starts, ends, strict=True)]
    assert starts[0] == 0 and len(set(totals)) == 16 and sum(totals) == spec.weight_bytes


def test_bad_parameters_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="shard count"):
        build_demo_model(tmp_path / "a", num_shards=MAX_SHARDS + 1)
    with pytest.raises(ConfigError, match="positive"):
        build_demo_model(tmp_path / "b", target_size_mb=0)
    with pytest.raises(ConfigError, match="cannot split"):
        plan_shards([10, 10, 10], 4)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_reuses_a_complete_build_and_rebuilds_a_damaged_one(tmp_path: Path) -> None:
    path = build_demo_model(tmp_path / "m")
    stamp = (path / "config.json").stat().st_mtime_ns
    assert build_demo_model(path) == path
    assert (path / "config.json").stat().st_mtime_ns == stamp  # reused, not rewritten
    shard = _shards(path)[0]
    with open(shard, "r+b") as fh:
        fh.truncate(10)
    build_demo_model(path)
    assert shard.stat().st_size > 10
    assert _digests(path) == _digests(build_demo_model(tmp_path / "fresh"))
    # Other parameters replace the old demo build in place.
    build_demo_model(path, num_shards=5)
    assert len(_shards(path)) == 5
    assert json.loads((path / BUILD_RECORD).read_text())["params"]["num_shards"] == 5
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_concurrent_builds_of_one_path_agree(tmp_path: Path) -> None:
    code = (
        "import sys; from cluster.demo_model import build_demo_model; build_demo_model(sys.argv[1])"
    )
    target = tmp_path / "shared"
    procs = [subprocess.Popen([sys.executable, "-c", code, str(target)]) for _ in range(2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    assert _digests(target) == _digests(build_demo_model(tmp_path / "solo"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shared", "solo"]


def test_never_leaves_a_half_built_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import cluster.demo_model as dm

    def fail(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(dm, "_write_shards", fail)
    with pytest.raises(OSError, match="No space"):
        build_demo_model(tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_overwrite_a_foreign_directory(tmp_path: Path) -> None:
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not a demo model"):
        build_demo_model(tmp_path)
    assert (tmp_path / "mine.txt").read_text() == "keep me"


def test_default_location_and_ensure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLAMACLUSTER_HOME", str(tmp_path / "home"))
    assert default_demo_model_dir() == tmp_path / "home" / "demo-model"
    path = ensure_demo_model()
    assert path == tmp_path / "home" / "demo-model"
    assert (path / "config.json").is_file()


def test_cli_builds_and_says_it_is_gibberish(tmp_path: Path) -> None:
    from cluster.cli.app import main

    cli = "import sys; from cluster.cli.app import main; sys.exit(main())"
    args = ["demo-model", str(tmp_path / "m"), "--shards", "5", "--seed", "3"]
    proc = subprocess.run(
        [sys.executable, "-c", cli, *args],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "gibberish" in proc.stdout and str(tmp_path / "m") in proc.stdout
    assert len(_shards(tmp_path / "m")) == 5
    assert main(["demo-model", str(tmp_path / "x"), "--shards", "0"]) == ConfigError.exit_code


_ENGINE_SCRIPT = """
import json, math, sys

from vllm import LLM, SamplingParams

if __name__ == "__main__":
    llm = LLM(model=sys.argv[1], max_model_len=256, seed=0, enforce_eager=True)
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=1)
    gen = llm.generate(["Hello llamas, how are you?"], params)[0]
    chat = llm.chat([{"role": "user", "content": "Say hello."}], params)[0]
    logprobs = [lp for step in gen.outputs[0].logprobs for lp in step.values()]
    print("RESULT " + json.dumps({
        "gen_tokens": list(gen.outputs[0].token_ids),
        "finite": all(math.isfinite(lp.logprob) for lp in logprobs),
        "chat_prompt": list(chat.prompt_token_ids),
        "chat_tokens": list(chat.outputs[0].token_ids),
        "chat_text": chat.outputs[0].text,
    }))
"""


@pytest.mark.engine
@pytest.mark.timeout(600)
def test_vllm_loads_and_generates(demo_model_dir: Path, tmp_path: Path) -> None:
    """Real vLLM (CPU) loads the demo model, generates finite tokens, and applies its chat template."""
    from tokenizers import Tokenizer

    script = tmp_path / "engine.py"
    script.write_text(_ENGINE_SCRIPT)
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(
        [sys.executable, str(script), str(demo_model_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,  # the engine's own processes die with this group
    )
    try:
        out, _ = proc.communicate(timeout=560)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait()
    line = next((x for x in out.splitlines() if x.startswith("RESULT ")), None)
    assert proc.returncode == 0 and line, out[-4000:]
    result = json.loads(line[len("RESULT ") :])
    assert len(result["gen_tokens"]) == 8 and result["finite"]
    assert len(result["chat_tokens"]) == 8
    tok = Tokenizer.from_file(str(demo_model_dir / "tokenizer.json"))
    expected = tok.encode(
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nSay hello.<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
        add_special_tokens=False,
    ).ids
    assert result["chat_prompt"] == expected
