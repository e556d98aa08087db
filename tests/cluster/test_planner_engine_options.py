"""--quantization, --speculative-config and --kv-offload-gb: what the planner counts for them, the
`plan` flags, and that `up`'s ServeConfig hands them to vLLM's own argument parser."""

from __future__ import annotations

import json

import pytest

from cluster.cli.app import main
from cluster.device_specs import get_device
from cluster.errors import ConfigError
from cluster.planner import ClusterShape, PlanOptions, draft_cost, plan_deployment
from cluster.planner.calibration import calibration_shape
from cluster.planner.dtypes import GIB
from tests.cluster.test_planner import LLAMA_7B, write_model_dir

H100 = ClusterShape(device=get_device("h100-sxm"))
LLAMA8B = calibration_shape("llama-3.1-8b")


def _plan(**options):
    return plan_deployment(LLAMA8B, H100, PlanOptions(max_model_len=8192, **options))


def test_fp8_quantization_halves_linear_weights_and_speeds_decode():
    bf16, fp8 = _plan(), _plan(quantization="fp8")
    assert fp8.weight_dtype == "fp8"
    saved = bf16.memory[0].weights_gib - fp8.memory[0].weights_gib
    # The linear layers (6.98 B parameters) go from 2 bytes to 1.
    assert saved == pytest.approx(6.98e9 / GIB, rel=0.01)
    assert fp8.memory[0].kv_tokens > bf16.memory[0].kv_tokens
    b1 = "decode_batch1"
    assert (
        getattr(fp8.performance.expected, b1).total_ms
        < getattr(bf16.performance.expected, b1).total_ms
    )
    # Fewer bytes per layer sit lower on the efficiency curve: the gain is less than 2x the ideal's.
    ideal_gain = (
        bf16.performance.ideal.decode_batch1.total_ms / fp8.performance.ideal.decode_batch1.total_ms
    )
    real_gain = (
        bf16.performance.expected.decode_batch1.total_ms
        / fp8.performance.expected.decode_batch1.total_ms
    )
    assert real_gain < ideal_gain
    with pytest.raises(ConfigError, match="contradicts"):
        _plan(quantization="awq", dtype="fp8")
    with pytest.raises(ConfigError, match="unknown --quantization 'fp5'"):
        _plan(quantization="fp5")


def test_speculative_drafts_cost_memory():
    base = _plan()
    ngram = _plan(draft=draft_cost({"method": "ngram", "num_speculative_tokens": 4}, LLAMA8B))
    assert ngram.memory == base.memory
    eagle = _plan(draft=draft_cost({"method": "eagle", "num_speculative_tokens": 3}, LLAMA8B))
    # One decoder layer (218 M parameters, bf16) plus a 2h x h projection; one layer of KV.
    extra = eagle.memory[0].weights_gib - base.memory[0].weights_gib
    assert extra == pytest.approx((218.1e6 + 2 * 4096**2) * 2 / GIB, rel=0.01)
    assert eagle.memory[0].kv_bytes_per_token == base.memory[0].kv_bytes_per_token * 33 // 32
    draft = calibration_shape("llama-7b")
    separate = _plan(draft=draft_cost({"model": "llama-7b"}, LLAMA8B, draft_shape=draft))
    assert separate.speculative is not None and separate.speculative.method == "draft_model"
    assert separate.memory[0].weights_gib - base.memory[0].weights_gib == pytest.approx(
        6.738e9 * 2 / GIB, rel=0.01
    )
    with pytest.raises(ConfigError, match="needs the draft model's config"):
        draft_cost({"method": "draft_model"}, LLAMA8B)


def test_kv_offload_is_a_host_prefix_cache():
    plan = _plan(kv_offload_gib=64)
    offload = plan.kv_offload
    assert offload is not None and offload.host_link_gbs == 64
    assert offload.tokens == int(64 * GIB / (32 * 8 * 128 * 2 * 2))  # 128 KiB per token
    # Decode concurrency and device memory are unchanged; a cached prompt loads faster than a
    # prefill computes it.
    assert plan.memory == _plan().memory
    assert offload.prompt_load_ms < offload.prompt_recompute_ms
    assert any("KV offload" in note for note in plan.notes)


def test_plan_flags(tmp_path, capsys):
    model = write_model_dir(tmp_path, LLAMA_7B)
    draft = write_model_dir(tmp_path, {**LLAMA_7B, "num_hidden_layers": 2}, name="draft")
    spec = json.dumps({"method": "draft_model", "model": str(draft), "num_speculative_tokens": 2})
    args = ["plan", "--model", str(model), "--gpu", "h100", "--quantization", "fp8",
            "--kv-offload-gb", "32", "--speculative-config", spec]  # fmt: skip
    assert main([*args, "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["weight_dtype"] == "fp8" and plan["kv_offload"]["host_gib"] == 32
    assert plan["speculative"]["num_speculative_tokens"] == 2
    assert plan["options"]["speculative_config"]["model"] == str(draft)
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "KV offload" in out and "speculative decoding (draft_model" in out
    assert main([*args[:-1], "{not json"]) == 3
    err = capsys.readouterr().err
    assert "--speculative-config is not JSON" in err and "Traceback" not in err


def test_serve_config_reaches_vllms_parser():
    """The ServeConfig fields `up` fills become vLLM's own engine arguments."""
    pytest.importorskip("vllm")
    from serve.config import ServeConfig
    from serve.vllm_glue import parse_vllm_args

    config = ServeConfig(
        model="org/model",
        no_auth=True,
        quantization="fp8",
        speculative_config={"method": "ngram", "num_speculative_tokens": 4},
        kv_offload_gb=4.0,
    )
    args = parse_vllm_args(config)
    assert args.quantization == "fp8" and args.kv_offloading_size == 4.0
    assert args.speculative_config == {"method": "ngram", "num_speculative_tokens": 4}
