"""Achieved / peak efficiency of a device family: the fitted curves that turn the planner's ideal
roofline into an expected figure, and the choice of efficiency for a plan (curve, measured device
or the --bandwidth-efficiency/--flops-efficiency overrides)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

from cluster.device_specs import DEVICES, UNLISTED_GPU_FAMILY, DeviceSpec

# Scales of the curves' x axes: weight bytes per layer in GB, FLOPs per layer in TFLOP.
WEIGHT_BYTES_SCALE = 1e9
FLOPS_SCALE = 1e12
# Efficiency a device whose bandwidth and FLOP/s were measured on it gets: the figures are
# already achieved rates (a copy / matmul loop), so the expected time is the roofline at them.
MEASURED_EFFICIENCY = 1.0


def inverse_efficiency_curve(
    floor: float, overhead: float, exponent: float, scale: float
) -> Callable[[float], float]:
    """``x -> 1 / (floor + overhead * (x / scale) ** -exponent)``, capped at 1.

    With exponent 1 the overhead term is a fixed time per layer on top of the streaming time at
    efficiency 1/floor: small layers lose to per-kernel costs, large ones approach 1/floor.
    """

    def efficiency(x: float) -> float:
        inverse = floor + overhead * (max(x, 1.0) / scale) ** -exponent
        return min(1.0, 1.0 / inverse)

    return efficiency


class EfficiencyCurve(BaseModel):
    """Efficiency of one device family, fitted to step times measured on one of its devices.

    Decode is memory bound: weight reads run at ``1 / (a + b / (GB per layer)^c)`` of the
    datasheet bandwidth (larger layers stream better), KV-cache reads at a constant share.
    Prefill is compute bound: ``1 / (a + b / (TFLOP per layer)^c)`` of the dense bf16 peak.
    """

    model_config = ConfigDict(frozen=True)

    family: str = Field(description="Device family the curve serves (DeviceSpec.family).")
    device: str = Field(description="The device the calibration ran on.")
    source: str = Field(
        description="Calibration files the parameters were fitted to (joined by ' + ')."
    )
    measured_on: str = Field(description="Date of the calibration run (YYYY-MM-DD).")
    weight_floor: float = Field(gt=0, description="a of the weight-read curve (1/a: the limit).")
    weight_overhead: float = Field(ge=0, description="b of the weight-read curve.")
    weight_exponent: float = Field(gt=0, description="c of the weight-read curve.")
    kv_efficiency: float = Field(gt=0, le=1, description="Share of bandwidth KV-cache reads get.")
    weight_cap: float = Field(
        default=1.0,
        gt=0,
        le=1,
        description="Ceiling of the weight-read efficiency: the calibration device's copy rate "
        "over its datasheet bandwidth (no kernel streams memory faster than a plain copy).",
    )
    flops_floor: float = Field(gt=0, description="a of the prefill FLOP curve (1/a: the limit).")
    flops_overhead: float = Field(ge=0, description="b of the prefill FLOP curve.")
    flops_exponent: float = Field(gt=0, description="c of the prefill FLOP curve.")
    fitted_rows: list[str] = Field(description="Calibration rows the fit used.")
    held_out_rows: list[str] = Field(description="Rows left out of the fit (checked by tests).")

    def weights(self, bytes_per_layer: float) -> float:
        """Bandwidth efficiency of weight reads for layers of ``bytes_per_layer`` bytes."""
        curve = inverse_efficiency_curve(
            self.weight_floor, self.weight_overhead, self.weight_exponent, WEIGHT_BYTES_SCALE
        )
        return min(self.weight_cap, curve(bytes_per_layer))

    def compute(self, flops_per_layer: float) -> float:
        """FLOP efficiency for layers of ``flops_per_layer`` FLOPs per step."""
        return inverse_efficiency_curve(
            self.flops_floor, self.flops_overhead, self.flops_exponent, FLOPS_SCALE
        )(flops_per_layer)


@dataclass(frozen=True)
class StepEfficiency:
    """Efficiencies the speed model divides by: weight reads (by bytes per layer), KV reads,
    and compute (by FLOPs per layer)."""

    weights: Callable[[float], float]
    kv: float
    compute: Callable[[float], float]
    label: str  # where the numbers come from, for the plan's notes
    layer_ms: float = 0.0  # fixed time per layer per step on top of the bounds (measured devices)

    @classmethod
    def constant(
        cls, bandwidth: float, flops: float, label: str, *, layer_ms: float = 0.0
    ) -> StepEfficiency:
        """The same efficiency for every layer size (ideal: 1.0, or the override flags)."""
        return cls(lambda _: bandwidth, bandwidth, lambda _: flops, label, layer_ms)

    @classmethod
    def of_curve(cls, curve: EfficiencyCurve, label: str) -> StepEfficiency:
        return cls(curve.weights, curve.kv_efficiency, curve.compute, label)


IDEAL = StepEfficiency.constant(1.0, 1.0, "ideal bound (efficiency 1.0)")

# Fitted by cluster.planner.calibration.fit_curve to the calibration files named in `source`
# (kept in cluster/planner/calibration/; llama_step.py measured the first, devcheck/
# plan_holdout.py the second: other model sizes and longer contexts, the same method);
# tests/cluster/test_planner_expected.py re-runs the fit and compares.
CURVES: dict[str, EfficiencyCurve] = {
    c.family: c
    for c in (
        EfficiencyCurve(
            family="nvidia-hopper",
            device="NVIDIA H200",
            source="h200-2026-11-30.json + h200-holdout-2026-11-30.json",
            measured_on="2026-11-30",
            weight_floor=0.833475,
            weight_overhead=0.580467,
            weight_exponent=0.5,
            kv_efficiency=0.754141,
            weight_cap=0.886361,
            flops_floor=1.488391,
            flops_overhead=0.163212,
            flops_exponent=0.5,
            fitted_rows=[
                "llama-7b decode b1 ctx512",
                "llama-7b prefill 512",
                "llama-3.1-8b decode b1 ctx512",
                "llama-3.1-8b decode b32 ctx512",
                "llama-3.1-8b decode b128 ctx512",
                "llama-3.1-8b decode b256 ctx1024",
                "llama-3.1-8b prefill 512",
                "llama-3.1-70b decode b1 ctx512",
                "llama-3.1-70b prefill 512",
                "llama-3.2-3b-shape decode b1 ctx512",
                "llama-3.2-3b-shape decode b64 ctx2048",
                "llama-3.2-3b-shape prefill 1024",
                "qwen2.5-14b-shape decode b1 ctx512",
                "qwen2.5-14b-shape prefill 512",
            ],
            held_out_rows=[
                "llama-3.1-8b decode b8 ctx512",
                "llama-3.1-8b prefill 2048",
                "llama-3.1-70b decode b32 ctx512",
                "llama-3.2-3b-shape decode b16 ctx1024",
                "qwen2.5-14b-shape decode b32 ctx1024",
                "llama-3.1-8b decode b64 ctx2048",
                "llama-3.1-8b prefill 4096",
            ],
        ),
    )
}
# Families without a calibration of their own borrow the closest one's curve (and say so).
FALLBACK_FAMILY = {
    "nvidia-ampere": "nvidia-hopper",
    "nvidia-ada": "nvidia-hopper",
    UNLISTED_GPU_FAMILY: "nvidia-hopper",
}


class CalibrationRates(BaseModel):
    """What a curve's calibration device achieved by the GPU micro-benchmark's methods
    (cluster/measure.py, verb gpu): the reference a measured GPU node's rates are divided by."""

    model_config = ConfigDict(frozen=True)

    device_key: str = Field(description="The calibration device's table key: the curve's peaks.")
    copy_gbs: float = Field(
        gt=0,
        description="Its device-to-device copy of two 2 GiB buffers, bytes read + written, GB/s "
        "(the calibration file's copy_tb_s).",
    )
    matmul_tflops: float | None = Field(
        default=None,
        gt=0,
        description="Its square bf16 matmul as the gpu verb times it, TFLOP/s; None where the "
        "calibration did not record it (prefill is then not scaled by a measurement).",
    )
    source: str = Field(description="Where the reference figures come from.")


# The calibration devices' own rates, per curve (tests/cluster/test_measure_gpu.py compares the
# copy rate with the calibration file).
CALIBRATION_RATES: dict[str, CalibrationRates] = {
    "nvidia-hopper": CalibrationRates(
        device_key="h200",
        copy_gbs=4254.532086,
        # The gpu verb on an H200 of the same kind (its copy: 0.99 x the calibration's).
        matmul_tflops=810.941139,
        source="h200-2026-11-30.json copy_tb_s; matmul: h200-gpu-verb-2026-11-30.json",
    ),
}


def scale_to_measurement(
    base: StepEfficiency,
    device: DeviceSpec,
    curve: EfficiencyCurve,
    reference: CalibrationRates | None,
) -> StepEfficiency:
    """``base`` (``curve`` applied to ``device``) scaled to what the device's node measured:
    the memory side by its copy rate over the calibration device's, the compute side by its
    matmul rate over the calibration device's (when both are known). The factors are taken
    against the calibration device's peaks, so a measured card of another model or a card the
    table lacks lands at the absolute rate the calibration device's curve gives for those
    ratios. Unmeasured devices (or curves without reference rates) keep ``base``."""
    if reference is None or device.measured_copy_gbs is None:
        return base
    peaks = DEVICES[reference.device_key]
    copy_ratio = device.measured_copy_gbs / reference.copy_gbs
    memory = peaks.bandwidth_gbs * copy_ratio / device.bandwidth_gbs
    notes = [
        f"measured on {device.measured_at}: copy {device.measured_copy_gbs / 1e3:.2f} TB/s = "
        f"{copy_ratio:.2f} x the calibration device's ({reference.copy_gbs / 1e3:.2f} TB/s, "
        f"{curve.device})"
    ]
    compute_factor = 1.0
    matmul = device.measured_matmul_tflops
    if matmul is not None and reference.matmul_tflops is not None:
        matmul_ratio = matmul / reference.matmul_tflops
        compute_factor = peaks.bf16_tflops * matmul_ratio / device.bf16_tflops
        notes.append(
            f"bf16 matmul {matmul:.0f} TFLOP/s = {matmul_ratio:.2f} x its "
            f"({reference.matmul_tflops:.0f} TFLOP/s)"
        )
    elif matmul is not None:
        notes.append("prefill not scaled: the calibration recorded no matmul rate of its own")
    weights, compute = base.weights, base.compute
    return StepEfficiency(
        lambda x: weights(x) * memory,
        base.kv * memory,
        lambda x: compute(x) * compute_factor,
        f"{base.label}; {'; '.join(notes)}",
        base.layer_ms,
    )


def expected_efficiency(
    device: DeviceSpec,
    *,
    bandwidth_efficiency: float | None = None,
    flops_efficiency: float | None = None,
) -> StepEfficiency:
    """The efficiency the expected figures use, and a label saying where it comes from.

    Explicit overrides win (each replaces its own curve); a measured device is taken at its
    measured rates plus its measured fixed cost per layer; otherwise the family's curve, or the
    curve a family without calibration falls back to, scaled by a GPU node's measured rates
    over the calibration device's (scale_to_measurement). A family with neither (CPU nodes
    from the table's placeholder) stays at 1.0.
    """
    base: StepEfficiency
    if device.measured:
        fixed = (
            f" plus the measured {device.layer_overhead_ms:.3f} ms per layer of kernel calls"
            if device.layer_overhead_ms
            else ""
        )
        base = StepEfficiency.constant(
            MEASURED_EFFICIENCY,
            MEASURED_EFFICIENCY,
            f"measured device rates taken as achieved (efficiency {MEASURED_EFFICIENCY:g}){fixed}",
            layer_ms=device.layer_overhead_ms,
        )
    elif device.family in CURVES:
        curve = CURVES[device.family]
        own = (
            ""
            if device.name == curve.device or device.key in curve.device.lower()
            else (f"; {device.key} has no calibration of its own")
        )
        base = StepEfficiency.of_curve(
            curve,
            f"{curve.family} curve fitted on {curve.device} ({curve.source}, "
            f"{curve.measured_on}){own}",
        )
        base = scale_to_measurement(base, device, curve, CALIBRATION_RATES.get(curve.family))
    elif device.family in FALLBACK_FAMILY:
        curve = CURVES[FALLBACK_FAMILY[device.family]]
        base = StepEfficiency.of_curve(
            curve,
            f"no calibration for the {device.family} family: using the {curve.family} curve "
            f"fitted on {curve.device} ({curve.source}, {curve.measured_on})",
        )
        base = scale_to_measurement(base, device, curve, CALIBRATION_RATES.get(curve.family))
    else:
        base = StepEfficiency.constant(
            1.0,
            1.0,
            f"no efficiency curve for the {device.family} family: expected equals ideal; "
            "measure the node (--mem-bandwidth-gbs/--tflops with measured figures)",
        )
    if bandwidth_efficiency is None and flops_efficiency is None:
        return base
    parts = []
    weights, kv, compute = base.weights, base.kv, base.compute
    if bandwidth_efficiency is not None:
        weights, kv = (lambda _: bandwidth_efficiency), bandwidth_efficiency
        parts.append(f"bandwidth efficiency {bandwidth_efficiency:g} (--bandwidth-efficiency)")
    if flops_efficiency is not None:
        compute = lambda _: flops_efficiency  # noqa: E731
        parts.append(f"flops efficiency {flops_efficiency:g} (--flops-efficiency)")
    if bandwidth_efficiency is None or flops_efficiency is None:
        parts.append(f"otherwise {base.label}")
    return StepEfficiency(weights, kv, compute, "; ".join(parts), base.layer_ms)
