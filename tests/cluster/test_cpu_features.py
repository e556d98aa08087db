"""Which CPU kernels vLLM will run, from a node's CPU flags; AMX tile state asked per process.

The decision is fed the flags of an AMX machine and of machines without AMX, so both kinds are
checked on every CI machine, whatever its own CPU; the process tests assert what this machine's
CPU implies, so they hold on both kinds too.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from cluster.cpu_features import engine_kernels, local_flags, parse_flags
from cluster.errors import ConfigError
from cluster.inventory import local_cluster
from cluster.stages.preflight import (
    cpu_kernels_of,
    node_state_from_probe,
    parse_probe,
    require_engine_cpus,
)

# The flags line of a Sapphire Rapids part (AMX) and of an Ice Lake part (AVX-512, no AMX),
# abbreviated to a realistic mix; and an AVX2-only and a pre-AVX2 x86 machine.
AMX_CPU = (
    "fpu vme de pse tsc msr pae mce sse sse2 ssse3 sse4_1 sse4_2 avx f16c avx2 bmi2 avx512f "
    "avx512dq avx512cd avx512bw avx512vl avx512_bf16 avx512_vnni amx_bf16 avx512_fp16 amx_tile "
    "amx_int8 arch_capabilities"
)
AVX512_CPU = "fpu sse sse2 avx avx2 avx512f avx512dq avx512bw avx512vl avx512_vnni"
AVX512_BF16_CPU = AVX512_CPU + " avx512_bf16"
AVX2_CPU = "fpu sse sse2 sse4_2 avx avx2 fma bmi2"
OLD_CPU = "fpu sse sse2 sse4_2 avx"


def test_amx_machine_runs_amx_attention_and_needs_the_grant():
    k = engine_kernels(parse_flags(AMX_CPU), arch="x86_64")
    assert (k.library, k.attention, k.needs_amx_grant) == ("_C", "amx", True)
    assert k.problem is None and k.note is None


def test_amx_refused_by_the_kernel_falls_back_to_vec_with_a_note():
    k = engine_kernels(parse_flags(AMX_CPU), arch="x86_64", amx_grant=False)
    assert (k.attention, k.needs_amx_grant, k.problem) == ("vec", True, None)
    assert "refused" in k.note


@pytest.mark.parametrize(
    ("flags", "library"),
    [(AVX512_BF16_CPU, "_C"), (AVX512_CPU, "_C_AVX512"), (AVX2_CPU, "_C_AVX2")],
)
def test_machines_without_amx_run_vec_attention_and_never_ask(flags, library):
    k = engine_kernels(parse_flags(flags), arch="x86_64")
    assert (k.library, k.attention, k.needs_amx_grant, k.problem) == (library, "vec", False, None)


def test_x86_without_avx2_is_refused_and_other_architectures_are_not():
    assert "AVX2" in engine_kernels(parse_flags(OLD_CPU), arch="x86_64").problem
    arm = engine_kernels(set(), arch="aarch64")
    assert (arm.attention, arm.problem, arm.needs_amx_grant) == ("native", None, False)


@pytest.mark.parametrize(("flags", "amx"), [(AMX_CPU, True), (AVX512_BF16_CPU, False)])
def test_the_decision_agrees_with_vllms_own_kernel_choice(monkeypatch, flags, amx):
    """vLLM's attention picker, told the CPU is the one the flags describe, picks what we say."""
    import torch
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_supported", lambda: True)
    ours = engine_kernels(parse_flags(flags), arch="x86_64")
    # vLLM's CPU default block size is 128; bf16 is the demo model's and most models' dtype.
    assert _get_attn_isa(torch.bfloat16, 128, 64) == ours.attention


def _facts(flags: str, grant: str | None = None) -> dict[str, list[str]]:
    text = f"cpus=2\nnuma=1\narch=x86_64\ncpu_flags={flags}\naddr=lo 127.0.0.1/8\naddr=eth0 198.18.0.5/24\n"
    if grant is not None:
        text += f"amx_grant={grant}\n"
    return parse_probe(text)


def test_preflight_records_the_flags_and_refuses_a_cpu_node_without_avx2():
    node = local_cluster().head
    amx = node_state_from_probe(node, _facts(AMX_CPU, "yes"), device="cpu", cpu_slots=None)
    assert amx.device_info["cpu_flags"] == "amx_bf16 amx_int8 amx_tile avx2 avx512_bf16 avx512f"
    assert cpu_kernels_of(amx).attention == "amx"
    assert require_engine_cpus([amx]) == []
    old = node_state_from_probe(node, _facts(OLD_CPU), device="cpu", cpu_slots=None)
    with pytest.raises(ConfigError) as err:
        require_engine_cpus([amx, old])
    assert err.value.message == (
        f"the engine cannot run on these CPUs: {old.label}: the CPU has no AVX2, "
        "which vLLM's x86 CPU kernels need"
    )
    # A GPU node's CPU does not run vLLM's CPU kernels: not refused for its CPU.
    gpu = old.model_copy(update={"device_kind": "gpu"})
    assert require_engine_cpus([gpu]) == []


def test_amx_refused_by_the_nodes_kernel_is_a_warning_not_a_refusal():
    node = local_cluster().head
    refused = node_state_from_probe(node, _facts(AMX_CPU, "no"), device="cpu", cpu_slots=None)
    notes = require_engine_cpus([refused])
    assert len(notes) == 1 and notes[0].startswith(refused.label) and "refused" in notes[0]
    assert cpu_kernels_of(refused).attention == "vec"


def test_the_probe_reads_this_machines_flags():
    """The preflight probe's shell, run here, reports the flags Python reads from /proc/cpuinfo."""
    from cluster.stages.preflight import probe_command

    out = subprocess.run(
        ["bash", "-c", probe_command("/tmp")], capture_output=True, text=True, check=True
    ).stdout
    facts = parse_probe(out)
    assert set(facts["cpu_flags"][0].split()) == local_flags()
    assert ("amx_grant" in facts) == ("amx_tile" in local_flags())


def _xcomp_in_fresh_process(code: str) -> str:
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
    )
    return out.stdout.strip().splitlines()[-1]


def test_a_process_holds_the_amx_state_exactly_when_the_cpu_has_amx_after_asking():
    has_amx = "amx_tile" in local_flags()
    before = _xcomp_in_fresh_process(
        "from cluster.cpu_features import amx_permitted; print(amx_permitted())"
    )
    after = _xcomp_in_fresh_process(
        "from cluster.cpu_features import amx_permitted, request_amx\n"
        "request_amx(); print(amx_permitted())"
    )
    assert (before, after) == ("False", str(has_amx))


def test_every_vllm_process_asks_for_amx_through_the_platform_plugin():
    """Resolving vLLM's platform (what a Ray worker does first) leaves the process holding the
    AMX tile state on an AMX CPU, and not asking at all elsewhere."""
    has_amx = "amx_tile" in local_flags()
    held = _xcomp_in_fresh_process(
        "from vllm.platforms import current_platform\n"
        "current_platform.device_type\n"
        "from cluster.cpu_features import amx_permitted; print(amx_permitted())"
    )
    assert held == str(has_amx)
