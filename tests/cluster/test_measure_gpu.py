"""The GPU micro-benchmark as a real program, its record in the state, and how the planner scales
the fitted curve by what a GPU node measured."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from cluster.device_specs import UNLISTED_GPU_FAMILY, get_device, measured_gpu_device
from cluster.measure import (
    GpuDeviceMeasurement,
    GpuMeasurement,
    GpuRequest,
    call,
    copy_rate_gbs,
    matmul_tflops,
    stream_ring,
)
from cluster.planner import ClusterShape, PlanOptions, plan_deployment
from cluster.planner.calibration import CALIBRATION_DIR, calibration_files, calibration_shape
from cluster.planner.efficiency import CALIBRATION_RATES, CURVES
from cluster.runner.local import LocalRunner
from cluster.stages.measure import gpu_is_current, measured_gpu_spec
from cluster.state import ClusterState, MeasureSection, NodeState, load_state
from tests.cluster.test_measure import _cpu

pytestmark = pytest.mark.timeout(120)

REFERENCE = CALIBRATION_RATES["nvidia-hopper"]
LLAMA_8B = calibration_shape("llama-3.1-8b")


def _cuda_visible() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def _device(copy: float, matmul: float = 700.0, *, name: str = "NVIDIA H200", index: int = 0):
    return GpuDeviceMeasurement(
        index=index,
        name=name,
        memory_gib=141.0,
        copy_gbs=copy,
        copy_mib=2048,
        matmul_tflops=matmul,
        matmul_size=8192,
        stream_gbs={16: copy * 0.5, 64: copy * 0.7, 256: copy * 0.8},
        seconds=1.5,
    )


def _gpu(
    copy: float = REFERENCE.copy_gbs, matmul: float = REFERENCE.matmul_tflops or 700.0, **kw
) -> GpuMeasurement:
    return GpuMeasurement(
        devices=[_device(copy, matmul, **kw)], torch="2.11.0+cu130", seconds=2.0, at=1.8e9
    )


def _gpu_node(name: str, *, devices: int = 1, ip: str = "") -> NodeState:
    return NodeState(
        name=name,
        label=name,
        host=ip or name,
        private_ip=ip or None,
        devices=devices,
        device_kind="gpu",
        device_info={"gpu": "NVIDIA H200", "memory_mib": "143771"},
    )


def _plan(device, *, prompt: int = 512, concurrency: int = 1):
    options = PlanOptions(
        prompt_len=prompt, concurrency=concurrency, max_model_len=2048, mem_fraction=1.0
    )
    return plan_deployment(LLAMA_8B, ClusterShape(device=device), options)


# ------------------------------------------------------------------------- the real program


@pytest.mark.skipif(_cuda_visible(), reason="torch sees a CUDA device here")
def test_gpu_verb_without_cuda_fails_with_one_clear_line():
    reply = call(sys.executable, "gpu", GpuRequest()).run(LocalRunner().run, timeout=120)
    assert not reply.ok and reply.result.returncode == 1
    assert reply.error.startswith("no CUDA device visible to torch"), reply.error
    assert "Traceback" not in reply.result.stderr
    assert reply.data is not None and "CUDA build of torch" in reply.data["hint"]


@pytest.mark.skipif(not _cuda_visible(), reason="no CUDA device visible to torch")
def test_gpu_verb_measures_each_visible_device():
    request = GpuRequest(devices=[0], copy_mib=256, matmul_size=2048, stream_mib=[16], repeats=2)
    reply = call(sys.executable, "gpu", request).run(LocalRunner().run, timeout=120)
    m = GpuMeasurement.model_validate(reply.value(what="the GPU micro-benchmark"))
    d = m.devices[0]
    assert d.index == 0 and d.name and d.memory_gib > 1
    assert 10 < d.copy_gbs < 20_000 and 0.1 < d.matmul_tflops < 10_000
    assert set(d.stream_gbs) == {16} and d.copy_mib == 256 and d.matmul_size == 2048
    assert "TB/s" in m.describe()


def test_gpu_arithmetic():
    # Read plus written bytes, as the calibration file's copy_tb_s: 2 GiB each way in 1 ms.
    assert copy_rate_gbs(2 << 30, 1e-3) == pytest.approx(4294.967296)
    assert matmul_tflops(8192, 1e-3) == pytest.approx(1099.511627776)
    # 16 MiB matrices of 4096 columns: 2048 rows, 64 of them fill the 1 GiB ring.
    assert stream_ring(16) == (2048, 64)
    assert stream_ring(256) == (32768, 4)
    assert stream_ring(2048) == (262144, 2)


def test_the_reference_copy_rate_is_the_calibration_files():
    first = calibration_files(CURVES["nvidia-hopper"].source)[0]
    data = json.loads(first.read_text())
    assert REFERENCE.copy_gbs == pytest.approx(data["copy_tb_s"] * 1e3, abs=1e-3)
    assert get_device(REFERENCE.device_key).name.startswith(data["device"])


def test_the_reference_matmul_rate_is_the_gpu_verbs_on_an_h200():
    """The gpu verb's own reply on an H200 (kept beside the calibration): its matmul is the
    reference, and its copy rate says it is the same kind of card as the calibration's."""
    reply = GpuMeasurement.model_validate_json(
        (CALIBRATION_DIR / "h200-gpu-verb-2026-11-30.json").read_text()
    )
    assert reply.slowest.name == "NVIDIA H200"
    assert REFERENCE.matmul_tflops == pytest.approx(reply.matmul_tflops, abs=1e-3)
    assert reply.copy_gbs / REFERENCE.copy_gbs == pytest.approx(1.0, abs=0.02)


# ------------------------------------------------------------------------------- the record


def test_gpu_measurement_round_trips_and_old_states_still_load(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMACLUSTER_HOME", str(tmp_path))
    two = GpuMeasurement(
        devices=[_device(4200.0), _device(3900.0, 650.0, index=1)], torch="2.11", seconds=4.0
    )
    assert two.slowest.index == 1 and two.copy_gbs == 3900.0 and two.matmul_tflops == 650.0
    assert two.describe().startswith("2 x NVIDIA H200 141.0 GiB: copy 3.90 TB/s")
    assert "(slowest of 2)" in two.describe()
    state = ClusterState(
        name="gpus",
        nodes=[_gpu_node("head")],
        measure=MeasureSection(cpu={"head": _cpu()}, gpu={"head": two}),
    )
    state.save()
    again = load_state("gpus")
    assert again.measure == state.measure and again.measure.gpu["head"].devices[1].stream_gbs[64]
    # A state written before GPUs were measured: its measure section has no "gpu".
    old = state.model_dump(mode="json")
    del old["measure"]["gpu"]
    old["name"] = "old"
    path = tmp_path / "clusters" / "old" / "state.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(old))
    assert load_state("old").measure.gpu == {}


def test_a_gpu_node_needs_a_gpu_measurement_of_all_its_devices():
    node = _gpu_node("head", devices=2)
    assert not gpu_is_current(node, None)
    assert not gpu_is_current(node, _gpu())  # one device measured, two counted
    two = GpuMeasurement(devices=[_device(4200.0), _device(4100.0, index=1)], torch="t", seconds=1)
    assert gpu_is_current(node, two)
    moved = two.model_copy(update={"machine_id": "a"})
    assert not gpu_is_current(node.model_copy(update={"machine_id": "b"}), moved)
    assert gpu_is_current(NodeState(name="w", label="w", host="w"), None)  # a CPU node


def test_status_shows_each_gpu_nodes_measurement():
    from cluster.stages.base import ClusterContext, Reporter
    from cluster.stages.measure import Measure

    state = ClusterState(
        name="s",
        nodes=[_gpu_node("head")],
        measure=MeasureSection(cpu={"head": _cpu()}, gpu={"head": _gpu(3400.0)}),
    )
    ctx = ClusterContext(cluster=None, state=state, runners=[], reporter=Reporter())  # type: ignore[arg-type]
    check = Measure().check(ctx)
    assert check.ok and "GPU NVIDIA H200 141.0 GiB: copy 3.40 TB/s" in check.per_node["head"]
    assert "GPU NVIDIA H200" in check.message


# ------------------------------------------------------------------------------ the planner


def test_a_measurement_at_the_calibration_devices_rates_changes_nothing():
    today = _plan(get_device("h200")).performance.expected
    spec = measured_gpu_device(_gpu(), where="head")
    assert spec.key == "h200" and spec.measured_copy_gbs == REFERENCE.copy_gbs
    measured = _plan(spec).performance.expected
    for figure in ("decode_batch1", "decode_at_concurrency", "prefill"):
        assert getattr(measured, figure).total_ms == getattr(today, figure).total_ms
    assert measured.ttft_ms == today.ttft_ms
    assert "copy 4.25 TB/s = 1.00 x the calibration device's" in measured.efficiency


def test_decode_follows_the_copy_ratio_and_the_notes_say_so():
    today = _plan(get_device("h200"))
    plan = _plan(measured_gpu_device(_gpu(REFERENCE.copy_gbs * 0.8), where="head"))
    ratio = (
        plan.performance.expected.decode_batch1.total_ms
        / today.performance.expected.decode_batch1.total_ms
    )
    assert ratio == pytest.approx(1 / 0.8, rel=1e-9)
    # The matmul measured at the reference's rate: prefill (compute bound) stays as it was.
    assert plan.performance.expected.prefill.total_ms == pytest.approx(
        today.performance.expected.prefill.total_ms, rel=1e-9
    )
    # The ideal bound is the datasheet's, measured or not.
    assert plan.performance.ideal == today.performance.ideal
    note = next(n for n in plan.notes if n.startswith("expected speeds:"))
    when = plan.cluster.device.measured_at
    assert when is not None and when.startswith("head 20")
    assert f"measured on {when}: copy 3.40 TB/s = 0.80 x the calibration device's" in note
    assert "bf16 matmul 811 TFLOP/s = 1.00 x its (811 TFLOP/s)" in note


def test_prefill_follows_the_matmul_ratio(monkeypatch):
    reference = REFERENCE.model_copy(update={"matmul_tflops": 700.0})
    monkeypatch.setitem(CALIBRATION_RATES, "nvidia-hopper", reference)
    today = _plan(get_device("h200")).performance.expected
    same = _plan(measured_gpu_device(_gpu(matmul=700.0))).performance.expected
    assert same.prefill.total_ms == today.prefill.total_ms
    slower = _plan(measured_gpu_device(_gpu(matmul=560.0)))
    assert slower.performance.expected.prefill.total_ms == pytest.approx(
        today.prefill.total_ms / 0.8, rel=1e-9
    )
    assert slower.performance.expected.decode_batch1.total_ms == pytest.approx(
        today.decode_batch1.total_ms, rel=1e-9
    )
    assert "bf16 matmul 560 TFLOP/s = 0.80 x its (700 TFLOP/s)" in slower.notes[0]


def test_other_cards_land_at_the_absolute_rate_their_measurement_gives():
    # An H100 and a card the table lacks, each measured at the same copy rate as an H200 at
    # 0.7x, expect the same decode step: the ratio is to the calibration device, not a datasheet.
    copy = REFERENCE.copy_gbs * 0.7
    h200 = _plan(measured_gpu_device(_gpu(copy))).performance.expected.decode_batch1.total_ms
    h100_spec = measured_gpu_device(_gpu(copy, name="NVIDIA H100 80GB HBM3"))
    assert h100_spec.key == "h100-sxm" and h100_spec.memory_gib == 141.0
    h100 = _plan(h100_spec).performance.expected.decode_batch1.total_ms
    unlisted = measured_gpu_device(_gpu(copy, name="NVIDIA Z9"))
    assert unlisted.family == UNLISTED_GPU_FAMILY and unlisted.bandwidth_gbs == copy
    other = _plan(unlisted)
    assert h100 == pytest.approx(h200, rel=1e-9)
    assert other.performance.expected.decode_batch1.total_ms == pytest.approx(h200, rel=1e-9)
    assert "using the nvidia-hopper curve" in other.notes[0]


def test_the_plan_takes_the_slowest_measured_gpu_node_only_when_all_are_measured():
    nodes = [_gpu_node("head"), _gpu_node("worker1")]
    recorded = MeasureSection(gpu={"head": _gpu(4200.0), "worker1": _gpu(3000.0)})
    spec = measured_gpu_spec(nodes, recorded)
    assert spec is not None and spec.measured_copy_gbs == 3000.0
    assert spec.measured_at is not None and spec.measured_at.startswith("worker1 ")
    assert measured_gpu_spec(nodes, MeasureSection(gpu={"head": _gpu()})) is None
    assert measured_gpu_spec(nodes, MeasureSection()) is None
    cpu_nodes = [NodeState(name="head", label="head", host="h")]
    assert measured_gpu_spec(cpu_nodes, MeasureSection(gpu={"head": _gpu()})) is None


def test_plan_ips_plans_the_recorded_gpus_with_their_measurement(
    demo_model_dir, tmp_path, monkeypatch
):
    from cluster.state import default_cluster_name

    inv = tmp_path / "ips.txt"
    inv.write_text("10.0.0.1\n")
    home = tmp_path / "home"
    monkeypatch.setenv("LLAMACLUSTER_HOME", str(home))
    state = ClusterState(
        name=default_cluster_name(inv),
        nodes=[_gpu_node("head", ip="10.0.0.1")],
        measure=MeasureSection(cpu={"head": _cpu()}, gpu={"head": _gpu(3400.0)}),
    )
    state.save()
    env = {**os.environ, "LLAMACLUSTER_HOME": str(home)}
    argv = [sys.executable, "-c", "from cluster.cli.app import run; run()", "plan", "--model",
            str(demo_model_dir), "--ips", str(inv), "--json"]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    plan = json.loads(done.stdout)
    device = plan["cluster"]["device"]
    assert device["key"] == "h200" and device["measured_copy_gbs"] == 3400.0
    assert any("copy 3.40 TB/s = 0.80 x" in n for n in plan["notes"])
    assert "measured: GPU NVIDIA H200" in done.stderr
    # Another card named on the command line is planned from its datasheet, as before.
    argv += ["--gpu", "a100"]
    other = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False, env=env)
    assert json.loads(other.stdout)["cluster"]["device"]["measured_copy_gbs"] is None


@pytest.mark.skipif(_cuda_visible(), reason="torch sees a CUDA device here")
def test_the_stage_runs_the_verb_on_gpu_nodes_only_and_warns_why_it_failed():
    import io

    from rich.console import Console

    from cluster.inventory import local_cluster
    from cluster.runner.ssh import runner_for
    from cluster.stages.base import ClusterContext, Reporter
    from cluster.stages.measure import measure_gpus

    cluster = local_cluster()
    node = cluster.head
    cpu = NodeState(name=node.name, label=node.label, host=node.host, devices=1)
    state = ClusterState(name="local", nodes=[cpu])
    out = io.StringIO()
    ctx = ClusterContext(
        cluster=cluster,
        state=state,
        runners=[runner_for(node)],
        reporter=Reporter(Console(file=out, width=400)),
    )
    assert measure_gpus(ctx, sys.executable) == {}  # a CPU node: nothing runs
    state.nodes = [cpu.model_copy(update={"device_kind": "gpu"})]
    # The verb fails here (no CUDA): a warning naming why, and the table plans the node.
    assert measure_gpus(ctx, sys.executable) == {}
    said = out.getvalue()
    assert "GPU micro-benchmark failed on" in said and "no CUDA device" in said
    assert "CUDA build of torch" in said and "planned from the device table" in said
    # While a server runs, its engines hold the GPUs: nothing runs, the record is kept.
    recorded = _gpu(3400.0)
    state.measure.gpu = {node.name: recorded}
    state.server.config_digest = "serving"
    assert measure_gpus(ctx, sys.executable) == {node.name: recorded}
    assert "GPUs not measured: the server's engines hold them" in out.getvalue()
