"""Planner arithmetic, layout choice, errors and the `plan` command, on configs the tests write."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cluster.cli.app import main
from cluster.device_specs import DEVICES, get_device
from cluster.errors import ConfigError
from cluster.planner import (
    GIB,
    INT4_SCALE_OVERHEAD_BYTES,
    ClusterShape,
    PlanOptions,
    choose_parallelism,
    count_parameters,
    experts_touched,
    kv_bytes_per_token,
    kv_bytes_per_token_per_layer,
    load_model_shape,
    parse_model_shape,
    pipeline_stage_layers,
    plan_deployment,
    tp_violation,
    weight_bytes,
)

# Shapes as published in each model's config.json.
LLAMA_7B = {  # LLaMA-7B (the published-analysis model)
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "num_hidden_layers": 32,
    "hidden_size": 4096,
    "num_attention_heads": 32,
    "intermediate_size": 11008,
    "vocab_size": 32000,
    "tie_word_embeddings": False,
    "max_position_embeddings": 2048,
    "torch_dtype": "float16",
}
LLAMA3_70B = {
    "model_type": "llama",
    "num_hidden_layers": 80,
    "hidden_size": 8192,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "intermediate_size": 28672,
    "vocab_size": 128256,
    "tie_word_embeddings": False,
    "max_position_embeddings": 8192,
    "torch_dtype": "bfloat16",
}
LLAMA31_405B = {
    "model_type": "llama",
    "num_hidden_layers": 126,
    "hidden_size": 16384,
    "num_attention_heads": 128,
    "num_key_value_heads": 8,
    "intermediate_size": 53248,
    "vocab_size": 128256,
    "tie_word_embeddings": False,
    "max_position_embeddings": 131072,
    "torch_dtype": "bfloat16",
}
MIXTRAL_8X7B = {
    "model_type": "mixtral",
    "num_hidden_layers": 32,
    "hidden_size": 4096,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "intermediate_size": 14336,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
    "vocab_size": 32000,
    "tie_word_embeddings": False,
    "max_position_embeddings": 32768,
    "torch_dtype": "bfloat16",
}
QWEN25_05B = {  # tied embeddings; 494.03 M parameters on its model card (with biases)
    "model_type": "qwen2",
    "num_hidden_layers": 24,
    "hidden_size": 896,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "intermediate_size": 4864,
    "vocab_size": 151936,
    "tie_word_embeddings": True,
    "max_position_embeddings": 32768,
    "torch_dtype": "bfloat16",
}
DEEPSEEK_V3 = {  # 671 B total, 37 B activated per its model card
    "model_type": "deepseek_v3",
    "hidden_size": 7168,
    "num_hidden_layers": 61,
    "num_attention_heads": 128,
    "num_key_value_heads": 128,
    "q_lora_rank": 1536,
    "kv_lora_rank": 512,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "intermediate_size": 18432,
    "moe_intermediate_size": 2048,
    "n_routed_experts": 256,
    "n_shared_experts": 1,
    "num_experts_per_tok": 8,
    "first_k_dense_replace": 3,
    "moe_layer_freq": 1,
    "vocab_size": 129280,
    "tie_word_embeddings": False,
    "max_position_embeddings": 163840,
    "torch_dtype": "bfloat16",
    "quantization_config": {"quant_method": "fp8", "fmt": "e4m3"},
}
QWEN15_MOE = {  # Qwen1.5-MoE-A2.7B: 14.3 B total, 2.7 B activated
    "model_type": "qwen2_moe",
    "hidden_size": 2048,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "intermediate_size": 5632,
    "moe_intermediate_size": 1408,
    "shared_expert_intermediate_size": 5632,
    "num_experts": 60,
    "num_experts_per_tok": 4,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "vocab_size": 151936,
    "tie_word_embeddings": False,
    "max_position_embeddings": 8192,
}

A100_80 = get_device("a100-80gb")
H100 = get_device("h100-sxm")


def shape_of(config: dict, name: str = "test-model"):
    return parse_model_shape(config, name=name)


def write_model_dir(root: Path, config: dict, name: str = "model") -> Path:
    path = root / name
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return path


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


# --- the published-analysis check -----------------------------------------------------------


def test_llama7b_matches_published_analysis_within_5_percent():
    """llm-analysis (cli99), examples/llama: LLaMA-7B, 16-bit, one A100-SXM 80GB, prompt 512,
    batch 1, ideal efficiency: decode 6.73 ms/token, prefill 22.41 ms."""
    assert A100_80.bandwidth_gbs == 2039 and A100_80.bf16_tflops == 312
    plan = plan_deployment(
        shape_of(LLAMA_7B, "llama-7b"),
        ClusterShape(device=A100_80),
        PlanOptions(dtype="fp16", prompt_len=512, concurrency=1),
    )
    assert (plan.tp, plan.pp) == (1, 1)
    decode = plan.performance.decode_batch1
    prefill = plan.performance.prefill
    assert decode.bound == "memory" and prefill.bound == "compute"
    assert decode.total_ms == pytest.approx(6.73, rel=0.05)
    assert prefill.total_ms == pytest.approx(22.41, rel=0.05)
    # The systematic differences (docs/PLANNER.md): the analysis reads the input embedding table
    # and 2x the KV cache of 544 tokens, and counts logits and full (non-causal) attention for all
    # 512 prompt tokens; here decode reads the LM head and the 513-token KV once, and prefill
    # counts logits of the last token and causal attention. Both land below, by < 2 % and < 5 %.
    assert decode.total_ms == pytest.approx(6.613, abs=0.005)
    assert prefill.total_ms == pytest.approx(21.476, abs=0.005)


# --- model arithmetic -------------------------------------------------------------------------


def test_gqa_kv_bytes_llama3_70b():
    shape = shape_of(LLAMA3_70B)
    assert shape.num_kv_heads == 8 and shape.head_dim == 128
    assert kv_bytes_per_token(shape, "bf16") == 320 * 1024
    assert kv_bytes_per_token(shape, "fp8") == 160 * 1024
    # tp=2 splits the 8 KV heads; tp=16 replicates them, one head per rank.
    assert kv_bytes_per_token_per_layer(shape, "bf16", tp=2) * 80 == 160 * 1024
    assert kv_bytes_per_token_per_layer(shape, "bf16", tp=16) == 2 * 1 * 128 * 2


def test_mha_kv_bytes_llama7b():
    # No num_key_value_heads in the config: every head has its own K and V.
    assert kv_bytes_per_token(shape_of(LLAMA_7B), "fp16") == 2 * 32 * 4096 * 2


def test_tied_embeddings_counted_once():
    tied = shape_of(QWEN25_05B)
    untied = shape_of({**QWEN25_05B, "tie_word_embeddings": False})
    assert tied.tied_embeddings and not untied.tied_embeddings
    p_tied, p_untied = count_parameters(tied), count_parameters(untied)
    assert p_tied.lm_head == 0
    assert p_untied.total - p_tied.total == 151936 * 896
    assert p_tied.total == pytest.approx(494_032_768, rel=0.001)  # biases are left out


def test_tie_default_follows_model_type():
    gemma = {k: v for k, v in QWEN25_05B.items() if k != "tie_word_embeddings"}
    assert shape_of({**gemma, "model_type": "gemma"}).tied_embeddings
    assert not shape_of(gemma).tied_embeddings


def test_llama7b_parameter_count():
    assert count_parameters(shape_of(LLAMA_7B)).total == 6_738_415_616


def test_moe_total_vs_active_mixtral():
    params = count_parameters(shape_of(MIXTRAL_8X7B))
    assert params.total / 1e9 == pytest.approx(46.7, abs=0.05)
    assert params.active / 1e9 == pytest.approx(12.9, abs=0.05)


def test_moe_deepseek_v3_with_latent_attention():
    shape = shape_of(DEEPSEEK_V3)
    assert shape.mla is not None and shape.moe is not None
    assert len(shape.moe.moe_layer_ids) == 61 - 3
    params = count_parameters(shape)
    assert params.total / 1e9 == pytest.approx(671, rel=0.01)
    assert params.active / 1e9 == pytest.approx(37, rel=0.03)
    # MLA caches one 512-wide latent + the 64-dim RoPE key per layer, not K and V per head.
    assert kv_bytes_per_token(shape, "bf16") == 61 * (512 + 64) * 2
    assert shape.quantization == "fp8"


def test_moe_qwen_shared_expert():
    params = count_parameters(shape_of(QWEN15_MOE))
    assert params.total / 1e9 == pytest.approx(14.3, abs=0.05)
    assert params.active / 1e9 == pytest.approx(2.7, abs=0.05)


def test_weight_bytes_per_dtype():
    shape = shape_of(LLAMA3_70B)
    p = count_parameters(shape)
    linear, rest = p.attention + p.mlp, p.total - p.attention - p.mlp
    assert weight_bytes(shape, "bf16") == 2 * p.total
    assert weight_bytes(shape, "fp32") == 4 * p.total
    assert weight_bytes(shape, "fp8") == linear + 2 * rest
    assert weight_bytes(shape, "int4") == pytest.approx(
        linear * (0.5 + INT4_SCALE_OVERHEAD_BYTES) + 2 * rest
    )
    assert pytest.approx(2.5 / 128) == INT4_SCALE_OVERHEAD_BYTES


def test_quantized_checkpoint_sets_default_dtype():
    awq = shape_of({**LLAMA3_70B, "quantization_config": {"quant_method": "awq", "bits": 4}})
    assert awq.quantization == "int4"
    plan = plan_deployment(
        awq, ClusterShape(nodes=1, devices_per_node=8, device=A100_80), PlanOptions()
    )
    assert plan.weight_dtype == "int4" and plan.kv_dtype == "bf16"
    assert (plan.tp, plan.pp) == (1, 1)


def test_text_config_nesting():
    multimodal = {
        "architectures": ["LlavaForConditionalGeneration"],
        "model_type": "llava",
        "torch_dtype": "float16",
        "vision_config": {"hidden_size": 1024, "num_hidden_layers": 24},
        "text_config": {k: v for k, v in LLAMA_7B.items() if k != "torch_dtype"},
    }
    shape = shape_of(multimodal)
    assert (shape.num_layers, shape.hidden_size, shape.model_type) == (32, 4096, "llama")
    assert shape.config_dtype == "fp16"


def test_missing_key_is_a_config_error():
    with pytest.raises(ConfigError, match="num_hidden_layers"):
        shape_of({k: v for k, v in LLAMA_7B.items() if k != "num_hidden_layers"})


def test_experts_touched_grows_with_batch():
    assert experts_touched(8, 2, 1) == pytest.approx(2)
    assert 2 < experts_touched(8, 2, 4) < 8
    assert experts_touched(8, 2, 256) == pytest.approx(8, abs=1e-6)


# --- layout rules -----------------------------------------------------------------------------


def test_tp_rules_follow_vllm():
    llama70 = shape_of(LLAMA3_70B)  # 64 heads, 8 KV heads
    assert tp_violation(llama70, 8) is None
    assert tp_violation(llama70, 16) is None  # KV heads replicated twice
    qwen7b = shape_of({**LLAMA3_70B, "num_attention_heads": 28, "num_key_value_heads": 4})
    assert "28 attention heads" in tp_violation(qwen7b, 8)
    odd_kv = shape_of({**LLAMA3_70B, "num_attention_heads": 48, "num_key_value_heads": 6})
    assert "6 KV heads" in tp_violation(odd_kv, 4)
    assert "multiple of the 6 KV heads" in tp_violation(odd_kv, 8)
    assert tp_violation(odd_kv, 12) is None


def test_tp_stays_where_heads_divide():
    # 28 heads: tp=8 is not allowed, so 8 GPUs are used as tp=4 x pp=2 when needed.
    qwen = shape_of({**LLAMA3_70B, "num_attention_heads": 28, "num_key_value_heads": 4})
    cluster = ClusterShape(nodes=1, devices_per_node=8, device=get_device("a10"))
    assert choose_parallelism(qwen, cluster, options=PlanOptions()) == (4, 2)


def test_pipeline_stage_layers_like_vllm():
    assert pipeline_stage_layers(80, 1) == [80]
    assert pipeline_stage_layers(126, 2) == [63, 63]
    assert pipeline_stage_layers(126, 4) == [31, 32, 32, 31]
    assert pipeline_stage_layers(80, 3) == [27, 27, 26]  # the last stage also holds the LM head
    with pytest.raises(ConfigError):
        pipeline_stage_layers(4, 5)


def _vllm_get_pp_indices():
    """vLLM's own get_pp_indices, compiled from its installed source without importing vLLM
    (which pulls in torch and takes tens of seconds on a busy 2-core box)."""
    import ast
    import importlib.util
    import logging
    import types

    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("vLLM is not installed")
    source = Path(next(iter(spec.submodule_search_locations))) / "distributed" / "utils.py"
    tree = ast.parse(source.read_text(encoding="utf-8"))
    func = next(
        node
        for node in tree.body
        if isinstance(node, ast.FunctionDef) and node.name == "get_pp_indices"
    )
    namespace = {
        "envs": types.SimpleNamespace(VLLM_PP_LAYER_PARTITION=None),
        "logger": logging.getLogger("vllm-get-pp-indices"),
    }
    exec(compile(ast.Module(body=[func], type_ignores=[]), str(source), "exec"), namespace)
    return namespace["get_pp_indices"]


def test_pipeline_stage_layers_match_vllm_code():
    get_pp_indices = _vllm_get_pp_indices()
    for layers, pp in [(80, 3), (126, 4), (61, 4), (32, 5), (95, 8), (7, 7), (40, 6)]:
        ends = [get_pp_indices(layers, rank, pp) for rank in range(pp)]
        assert [end - start for start, end in ends] == pipeline_stage_layers(layers, pp)


def test_70b_on_8_a100_respects_mem_fraction():
    shape = shape_of(LLAMA3_70B)
    cluster = ClusterShape(nodes=1, devices_per_node=8, device=A100_80)
    # 65.7 GiB of weights per device at tp=2: fits under 0.9 x 80 GiB with room for 8k tokens...
    assert choose_parallelism(shape, cluster, options=PlanOptions(mem_fraction=0.9)) == (2, 1)
    plan = plan_deployment(shape, cluster, PlanOptions(mem_fraction=0.9))
    stage = plan.memory[0]
    assert stage.weights_gib == pytest.approx(65.7, abs=0.1)
    assert stage.weights_gib + stage.headroom_gib + stage.kv_cache_gib == pytest.approx(72.0)
    assert plan.kv_tokens >= 8192 and plan.sequences_fit == plan.kv_tokens // 8192
    # ...but not under 0.85, nor with Llama-3.1's 128k context: then tp=4 (never pp in a node).
    assert choose_parallelism(shape, cluster, options=PlanOptions(mem_fraction=0.85)) == (4, 1)
    long = PlanOptions(max_model_len=131072)
    assert choose_parallelism(shape, cluster, options=long) == (4, 1)


def test_405b_on_two_h100_nodes_is_tp8_pp2():
    shape = shape_of(LLAMA31_405B)
    cluster = ClusterShape(nodes=2, devices_per_node=8, device=H100, link_gbps=100)
    plan = plan_deployment(shape, cluster, PlanOptions(cost_per_hour=2 * 8 * 3.0))
    assert (plan.tp, plan.pp) == (8, 2)
    assert [m.layers for m in plan.memory] == ["0-62", "63-125"]
    assert all(m.kv_cache_gib > 0 for m in plan.memory)
    comm = plan.communication
    assert comm.pp_hops == 1 and comm.pp_hops_across_nodes == 1
    assert comm.tp_allreduce_bytes_per_token_per_layer == 2 * 16384 * 2 * (2 * 7 / 8)
    assert comm.pp_hop_bytes_per_token == 2 * 16384 * 2
    assert plan.cost is not None
    assert plan.cost.tokens_per_cent * plan.cost.dollars_per_million_tokens == pytest.approx(1e4)
    # Decode is bound by reading ~756 GiB of weights at 16 x 3.35 TB/s (two stages in turn).
    assert plan.performance.decode_batch1.bound == "memory"
    per_stage = plan.memory[0].weights_gib * GIB / 3350e9 * 1e3
    assert plan.performance.decode_batch1.memory_ms == pytest.approx(2 * per_stage, rel=0.03)


def test_nothing_fits_says_how_much_is_missing():
    shape = shape_of(LLAMA31_405B)
    with pytest.raises(ConfigError) as info:
        choose_parallelism(
            shape, ClusterShape(nodes=1, devices_per_node=8, device=H100), options=PlanOptions()
        )
    err = info.value
    assert "does not fit on 1 node x 8 NVIDIA H100" in err.message
    assert "tp=8, pp=1" in err.message
    assert "94.5 GiB weights" in err.message and "may use 72.0 GiB (0.9 x 80 GiB)" in err.message
    assert err.hint and "--dtype int4" in err.hint and "devices" in err.hint


def test_forced_layouts_checked():
    shape = shape_of(LLAMA3_70B)
    cluster = ClusterShape(nodes=1, devices_per_node=8, device=A100_80)
    assert choose_parallelism(shape, cluster, options=PlanOptions(tp=8)) == (8, 1)
    assert choose_parallelism(shape, cluster, options=PlanOptions(tp=2, pp=2)) == (2, 2)
    with pytest.raises(ConfigError, match="exceeds the 8 devices"):
        choose_parallelism(shape, cluster, options=PlanOptions(tp=16))
    with pytest.raises(ConfigError, match="needs 16 devices"):
        choose_parallelism(shape, cluster, options=PlanOptions(tp=8, pp=2))


def test_more_tp_means_faster_decode():
    shape = shape_of(LLAMA3_70B)
    cluster = ClusterShape(nodes=1, devices_per_node=8, device=A100_80)
    t2 = plan_deployment(shape, cluster, PlanOptions(tp=2)).performance.decode_batch1
    t8 = plan_deployment(shape, cluster, PlanOptions(tp=8)).performance.decode_batch1
    assert t8.memory_ms < t2.memory_ms / 3
    assert t8.tp_comm_ms > t2.tp_comm_ms > 0


def test_efficiency_overrides_scale_the_expected_figures():
    shape = shape_of(LLAMA_7B)
    cluster = ClusterShape(device=A100_80)
    plain = plan_deployment(shape, cluster, PlanOptions(concurrency=1)).performance
    real = plan_deployment(
        shape, cluster, PlanOptions(concurrency=1, flops_efficiency=0.5, bandwidth_efficiency=0.8)
    ).performance
    # The ideal bound ignores the flags; the expected figures divide by them.
    assert real.ideal == plain.ideal
    assert real.expected.decode_batch1.total_ms == pytest.approx(
        real.ideal.decode_batch1.total_ms / 0.8
    )
    assert real.expected.prefill.total_ms == pytest.approx(real.ideal.prefill.total_ms / 0.5)
    assert "--bandwidth-efficiency" in real.expected.efficiency


def test_device_table_and_overrides():
    expected = {"a10", "a100-40gb", "a100-80gb", "h100-sxm", "h100-pcie", "h200", "gh200", "l4"}
    assert expected | {"l40s", "rtx3060", "rtx4090", "cpu"} <= set(DEVICES)
    assert get_device("RTX3060").memory_gib == 12 and get_device("a10").memory_gib == 24
    custom = get_device("cpu", memory_gib=256, bandwidth_gbs=300, bf16_tflops=4)
    assert (custom.memory_gib, custom.bandwidth_gbs, custom.bf16_tflops) == (256, 300, 4)
    with pytest.raises(ConfigError, match="unknown device"):
        get_device("tpu-v9")


# --- loading configs and the CLI -------------------------------------------------------------


def test_local_dir_and_file(tmp_path):
    path = write_model_dir(tmp_path, LLAMA_7B)
    assert load_model_shape(str(path)).num_layers == 32
    assert load_model_shape(str(path / "config.json")).hidden_size == 4096
    with pytest.raises(ConfigError, match=r"no config\.json"):
        load_model_shape(str(tmp_path))
    with pytest.raises(ConfigError, match="no such directory"):
        load_model_shape(str(tmp_path / "missing"))
    (path / "config.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ConfigError, match="cannot read"):
        load_model_shape(str(path))


def test_cli_json(tmp_path, capsys):
    path = write_model_dir(tmp_path, LLAMA_7B)
    code, out, _ = run_cli(
        ["plan", "--model", str(path), "--gpu", "a100-80gb", "--dtype", "fp16",
         "--prompt-len", "512", "--concurrency", "1", "--cost-per-hour", "2", "--json"],
        capsys,
    )  # fmt: skip
    assert code == 0
    plan = json.loads(out)
    assert (plan["tp"], plan["pp"], plan["devices_used"]) == (1, 1, 1)
    assert plan["model"]["params"]["total"] == 6_738_415_616
    ideal, expected = plan["performance"]["ideal"], plan["performance"]["expected"]
    assert ideal["decode_batch1"]["total_ms"] == pytest.approx(6.73, rel=0.05)
    assert ideal["prefill"]["total_ms"] == pytest.approx(22.41, rel=0.05)
    # An A100 has no calibration of its own: the Hopper curve, and the output says so.
    assert "nvidia-ampere" in expected["efficiency"] and "nvidia-hopper" in expected["efficiency"]
    assert expected["decode_batch1"]["total_ms"] > 1.3 * ideal["decode_batch1"]["total_ms"]
    assert plan["cost"]["dollars_per_million_tokens"] > 0
    assert plan["cluster"]["device"]["bandwidth_gbs"] == 2039


def test_cli_table(tmp_path, capsys):
    path = write_model_dir(tmp_path, MIXTRAL_8X7B)
    code, out, _ = run_cli(["plan", "--model", str(path), "--gpus-per-node", "2"], capsys)
    assert code == 0
    assert "46.70 B total, 12.88 B active" in out and "tp=2 x pp=1" in out
    assert "ideal" in out and "expected" in out and "nvidia-hopper curve" in out
    # Piped output (not a terminal) keeps whole cells instead of rich's 80-column "…".
    assert "…" not in out


def test_cli_inventory_gives_node_count(tmp_path, capsys):
    path = write_model_dir(tmp_path, LLAMA31_405B)
    ips = tmp_path / "ips.txt"
    ips.write_text("# head first\nubuntu@10.0.0.1\nubuntu@10.0.0.2\n", encoding="utf-8")
    args = [
        "plan",
        "--model",
        str(path),
        "--ips",
        str(ips),
        "--gpus-per-node",
        "8",
        "--gpu",
        "h100",
    ]
    code, out, _ = run_cli([*args, "--json"], capsys)
    assert code == 0
    plan = json.loads(out)
    assert plan["cluster"]["nodes"] == 2 and (plan["tp"], plan["pp"]) == (8, 2)
    code, _, err = run_cli([*args, "--nodes", "3"], capsys)
    assert code == 3 and "disagrees" in err


def test_cli_overrides_reach_the_plan(tmp_path, capsys):
    path = write_model_dir(tmp_path, LLAMA_7B)
    code, out, _ = run_cli(
        ["plan", "--model", str(path), "--gpu", "cpu", "--gpu-mem-gb", "64",
         "--mem-bandwidth-gbs", "200", "--tflops", "3", "--max-model-len", "1024", "--json"],
        capsys,
    )  # fmt: skip
    assert code == 0
    device = json.loads(out)["cluster"]["device"]
    assert (device["memory_gib"], device["bandwidth_gbs"], device["bf16_tflops"]) == (64, 200, 3)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--gpu", "a10", "--nodes", "1"], "does not fit"),
        (["--dtype", "fp7"], "unknown --dtype 'fp7'"),
        (["--kv-dtype", "int4"], "unknown --kv-dtype"),
        (["--gpu", "nope"], "unknown device"),
        (["--tp", "3", "--gpus-per-node", "8"], "cannot use --tp 3"),
    ],
)
def test_cli_errors_exit_3_with_one_line(tmp_path, capsys, args, message):
    path = write_model_dir(tmp_path, LLAMA31_405B)
    code, out, err = run_cli(["plan", "--model", str(path), *args], capsys)
    assert code == 3
    assert message in err and "Traceback" not in err and out == ""


# --- the hub (loopback, through HF_ENDPOINT) --------------------------------------------------


@pytest.fixture
def config_hub(hub, tmp_path, monkeypatch):
    """The loopback hub serving a Llama-3-70B config next to a (never fetched) weights file."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    repo = write_model_dir(tmp_path, LLAMA3_70B, "llama3-70b")
    (repo / "model-00001-of-00001.safetensors").write_bytes(b"\0" * 4096)
    hub.add_repo("planner-test/llama3-70b", repo)
    hub.add_repo("planner-test/llama3-70b-gated", repo, gated=True)
    return hub


def test_hub_config_only(config_hub, capsys):
    args = ["plan", "--model", "planner-test/llama3-70b", "--gpus-per-node", "8", "--gpu", "a100"]
    code, out, _ = run_cli([*args, "--json"], capsys)
    assert code == 0
    plan = json.loads(out)
    assert plan["model"]["name"] == "planner-test/llama3-70b" and (plan["tp"], plan["pp"]) == (2, 1)
    fetched = {r.filename for r in config_hub.fetched(repo_id="planner-test/llama3-70b")}
    assert fetched == {"config.json"}


def test_hub_errors_and_token(config_hub, capsys, monkeypatch):
    code, _, err = run_cli(["plan", "--model", "planner-test/nope"], capsys)
    assert code == 3 and "planner-test/nope" in err and config_hub.url in err
    code, _, err = run_cli(["plan", "--model", "planner-test/llama3-70b-gated"], capsys)
    assert code == 3 and "gated" in err and "HF_TOKEN" in err
    monkeypatch.setenv("HF_TOKEN", config_hub.token)
    code, out, _ = run_cli(
        ["plan", "--model", "planner-test/llama3-70b-gated", "--gpus-per-node", "8", "--json"],
        capsys,
    )
    assert code == 0 and json.loads(out)["model"]["layers"] == 80
