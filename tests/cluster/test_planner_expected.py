"""The planner's expected figures: the stored efficiency curve against a re-fit of the H200
calibration file, every measured row within 10 % (rows held out of the fit included), and the
choice of efficiency per device (curve, family fallback, measured device, override flags)."""

from __future__ import annotations

import pytest

from cluster.device_specs import get_device, measured_cpu_device
from cluster.measure import DENSE_CALLS_PER_LAYER, CpuMeasurement, call_overhead_s
from cluster.planner import ClusterShape, PlanOptions, plan_deployment
from cluster.planner.calibration import (
    CALIBRATION_DIR,
    calibration_copy_gbs,
    calibration_shape,
    fit_curve,
    load_calibrations,
)
from cluster.planner.efficiency import CURVES, expected_efficiency

H200 = get_device("h200")
CURVE = CURVES["nvidia-hopper"]
DEVICE_NAME, ROWS = load_calibrations(CURVE.source)

# What the measuring script's summary gives as the planner's ideal for each row, ms.
IDEAL_MS = {
    "llama-7b decode b1 ctx512": 2.81,
    "llama-7b prefill 512": 6.78,
    "llama-3.1-8b decode b1 ctx512": 3.14,
    "llama-3.1-8b decode b8 ctx512": 3.24,
    "llama-3.1-8b decode b32 ctx512": 3.58,
    "llama-3.1-8b decode b128 ctx512": 4.92,
    "llama-3.1-8b decode b256 ctx1024": 10.29,
    "llama-3.1-8b prefill 512": 7.30,
    "llama-3.1-70b decode b1 ctx512": 28.99,
    "llama-3.1-70b decode b32 ctx512": 30.08,
    "llama-3.1-70b prefill 512": 71.22,
}


def test_stored_curve_is_the_fit_of_the_calibration_file():
    """The constants in cluster/planner/efficiency.py are what fit_curve makes of the file."""
    refit = fit_curve(
        H200,
        ROWS,
        family=CURVE.family,
        device_name=DEVICE_NAME,
        source=CURVE.source,
        measured_on=CURVE.measured_on,
        held_out=set(CURVE.held_out_rows),
        copy_gbs=calibration_copy_gbs(CURVE.source),
    )
    assert refit == CURVE
    assert CURVE.device == DEVICE_NAME == "NVIDIA H200"
    # Held out: decode batches between fitted ones, the 70B at batch 32, a 3B and a 14B shape
    # at batches never fitted, the 8B at a long context, the long prefills.
    assert set(CURVE.held_out_rows) == {
        "llama-3.1-8b decode b8 ctx512",
        "llama-3.1-70b decode b32 ctx512",
        "llama-3.1-8b prefill 2048",
        "llama-3.2-3b-shape decode b16 ctx1024",
        "qwen2.5-14b-shape decode b32 ctx1024",
        "llama-3.1-8b decode b64 ctx2048",
        "llama-3.1-8b prefill 4096",
    }
    assert len(ROWS) == 21 and set(CURVE.fitted_rows).isdisjoint(CURVE.held_out_rows)
    assert CALIBRATION_DIR.joinpath("h200-holdout-2026-11-30.json").is_file()


def _plan_for(row):
    """The plan of one calibration row: its model on one H200, the row's batch and context."""
    context = row.ctx if row.kind == "decode" else row.tokens
    options = PlanOptions(
        prompt_len=context,
        concurrency=row.batch if row.kind == "decode" else 1,
        max_model_len=8192,
        mem_fraction=1.0,  # the 70B's 131 GiB of weights on the 141 GiB device, as measured
    )
    return plan_deployment(calibration_shape(row.model), ClusterShape(device=H200), options)


@pytest.mark.parametrize("row", ROWS, ids=lambda r: r.label)
def test_expected_lands_within_10_percent_of_every_measured_row(row):
    plan = _plan_for(row)
    perf = plan.performance
    assert (plan.tp, plan.pp) == (1, 1)
    if row.kind == "decode":
        assert perf.effective_concurrency == row.batch
        ideal, expected = perf.ideal.decode_at_concurrency, perf.expected.decode_at_concurrency
    else:
        ideal, expected = perf.ideal.prefill, perf.expected.prefill
        # The whole prompt fits in one chunk: the TTFT is the prefill step.
        assert perf.expected.ttft_ms == pytest.approx(expected.total_ms)
    assert expected.total_ms == pytest.approx(row.ms, rel=0.10), row.label
    if row.label in IDEAL_MS:
        assert ideal.total_ms == pytest.approx(IDEAL_MS[row.label], abs=0.01)
    # The measured step is slower than the roofline, and the expected figure says so.
    assert ideal.total_ms < 0.8 * row.ms


def test_families_fall_back_and_say_which():
    own = expected_efficiency(H200).label
    assert "fitted on NVIDIA H200" in own and "no calibration" not in own
    h100 = expected_efficiency(get_device("h100-sxm")).label
    assert "nvidia-hopper" in h100 and "h100-sxm has no calibration of its own" in h100
    a100 = expected_efficiency(get_device("a100-80gb")).label
    assert "no calibration for the nvidia-ampere family" in a100 and "nvidia-hopper" in a100
    cpu = expected_efficiency(get_device("cpu"))
    assert "expected equals ideal" in cpu.label and cpu.weights(1e9) == cpu.compute(1e12) == 1.0


def test_measured_device_is_taken_at_its_rates():
    """Measured bandwidth and FLOP/s are achieved rates: expected equals the roofline at them."""
    measured = get_device("cpu").model_copy(
        update={"bandwidth_gbs": 40.0, "bf16_tflops": 0.8, "measured": True}
    )
    plan = plan_deployment(
        calibration_shape("llama-7b"),
        ClusterShape(device=measured),
        PlanOptions(max_model_len=2048, concurrency=4, dtype="bf16"),
    )
    perf = plan.performance
    assert perf.expected.decode_batch1 == perf.ideal.decode_batch1
    assert perf.expected.prefill == perf.ideal.prefill
    assert "measured" in perf.expected.efficiency
    # 13.2 GB of weights at 40 GB/s: about 330 ms per token.
    assert perf.expected.decode_batch1.total_ms == pytest.approx(13.48e9 / 40e9 * 1e3, rel=0.02)


def _measurement(*, call_ms: float | None, kernels_ms: float | None) -> CpuMeasurement:
    return CpuMeasurement(
        read_gbs=40.0,
        copy_gbs=40.0,
        triad_gbs=40.0,
        gemv_gbs=36.0,
        gemv_call_ms=call_ms,
        layer_kernels_ms=kernels_ms,
        matmul_tflops=0.4,
        dtype="bf16",
        matmul_size=4096,
        threads=1,
        array_mib=256,
        library="torch",
        seconds=6.0,
        at=1_800_000_000.0,
    )


def _decode_b1(measurement: CpuMeasurement):
    plan = plan_deployment(
        calibration_shape("llama-7b"),
        ClusterShape(device=measured_cpu_device(measurement)),
        PlanOptions(max_model_len=2048, concurrency=1, dtype="bf16"),
    )
    return plan.performance


@pytest.mark.parametrize(("call_ms", "kernels_ms"), [(0.01, 0.03), (0.05, 0.2), (0.0, 0.5)])
def test_measured_layer_cost_is_added_per_layer_from_the_measurement(call_ms, kernels_ms):
    """Expected decode = bytes at the measured rates + layers x the measured fixed cost, where
    that cost is DENSE_CALLS_PER_LAYER x the dense kernel's per-call cost + the small kernels;
    the ideal bound stays bytes only."""
    with_cost = _decode_b1(_measurement(call_ms=call_ms, kernels_ms=kernels_ms))
    per_layer = DENSE_CALLS_PER_LAYER * call_ms + kernels_ms
    layers = calibration_shape("llama-7b").num_layers
    step = with_cost.expected.decode_batch1
    assert step.layer_overhead_ms == pytest.approx(layers * per_layer)
    assert step.total_ms == pytest.approx(
        with_cost.ideal.decode_batch1.total_ms + layers * per_layer
    )
    assert with_cost.ideal.decode_batch1.layer_overhead_ms == 0.0
    assert f"{per_layer:.3f} ms per layer" in with_cost.expected.efficiency


def test_a_measurement_without_layer_costs_plans_bytes_only():
    """Measurements recorded before the layer cost existed still load and plan (no term)."""
    old = CpuMeasurement.model_validate(
        _measurement(call_ms=None, kernels_ms=None).model_dump(
            exclude={"gemv_call_ms", "layer_kernels_ms"}
        )
    )
    assert old.layer_overhead_ms is None and measured_cpu_device(old).layer_overhead_ms == 0.0
    perf = _decode_b1(old)
    assert perf.expected.decode_batch1 == perf.ideal.decode_batch1
    # Half measured is not measured: no term from one part alone.
    assert _measurement(call_ms=0.02, kernels_ms=None).layer_overhead_ms is None


def test_gpu_expected_figures_have_no_layer_term():
    perf = plan_deployment(
        calibration_shape("llama-3.1-8b"),
        ClusterShape(device=H200),
        PlanOptions(max_model_len=2048, concurrency=1),
    ).performance
    assert perf.expected.decode_batch1.layer_overhead_ms == 0.0
    assert expected_efficiency(H200).layer_ms == 0.0


def test_call_overhead_is_the_time_beyond_the_bytes():
    assert call_overhead_s(100e-6, 2e6, 40e9) == pytest.approx(50e-6)
    assert call_overhead_s(40e-6, 2e6, 40e9) == 0.0  # noise never makes it negative


def test_one_override_keeps_the_other_curve():
    eff = expected_efficiency(H200, bandwidth_efficiency=0.5)
    assert eff.weights(1e6) == eff.weights(1e10) == eff.kv == 0.5
    assert eff.compute(1e12) == CURVE.compute(1e12) < 1
    assert "--bandwidth-efficiency" in eff.label and "nvidia-hopper" in eff.label


def test_curve_is_monotone_and_below_one():
    sizes = [1e6, 1e7, 1e8, 4e8, 1e9, 4e9, 1e11]
    weights = [CURVE.weights(x) for x in sizes]
    compute = [CURVE.compute(x * 1e3) for x in sizes]
    assert weights == sorted(weights) and compute == sorted(compute)
    assert all(0 < e < 1 for e in weights + compute)
    # However large the layer, weights stream no faster than the device copied memory.
    assert max(weights) == CURVE.weight_cap == pytest.approx(4254.53 / H200.bandwidth_gbs, abs=1e-4)
