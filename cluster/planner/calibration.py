"""Calibration of the efficiency curves: measured step times (cluster/planner/calibration/*.json,
made by llama_step.py there) against the planner's own bytes and FLOPs, and the least-squares
fit of an EfficiencyCurve to them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from pydantic import BaseModel, Field

from cluster.device_specs import DeviceSpec
from cluster.errors import ConfigError
from cluster.planner.efficiency import FLOPS_SCALE, WEIGHT_BYTES_SCALE, EfficiencyCurve
from cluster.planner.shape import ModelShape, parse_model_shape
from cluster.planner.speed import StageWork, stage_work
from cluster.planner.stages import _build_stages

CALIBRATION_DIR = Path(__file__).parent / "calibration"

# The shapes llama_step.py measures (its SHAPES table), as config.json values.
CALIBRATION_MODELS: dict[str, dict[str, object]] = {
    "llama-7b": {"num_key_value_heads": 32, "intermediate_size": 11008, "vocab_size": 32000},
    "llama-3.1-8b": {"num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 128256},
    "llama-3.1-70b": {
        "hidden_size": 8192,
        "num_hidden_layers": 80,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "intermediate_size": 28672,
        "vocab_size": 128256,
    },
    # Shapes of other sizes (devcheck/plan_holdout.py measures them the same way).
    "llama-3.2-3b-shape": {
        "hidden_size": 3072,
        "num_hidden_layers": 28,
        "num_attention_heads": 24,
        "num_key_value_heads": 8,
        "intermediate_size": 8192,
        "vocab_size": 128256,
    },
    "qwen2.5-14b-shape": {
        "hidden_size": 5120,
        "num_hidden_layers": 48,
        "num_attention_heads": 40,
        "num_key_value_heads": 8,
        "intermediate_size": 13824,
        "vocab_size": 152064,
    },
}
_LLAMA_BASE = {
    "model_type": "llama",
    "hidden_size": 4096,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}
# Exponents tried for the curves' 1/x^c term; the fit keeps the one with the least error.
EXPONENTS = (0.5, 1.0)


class CalibrationRow(BaseModel):
    """One measured step: a decode step of ``batch`` sequences at context ``ctx``, or a prefill
    of ``tokens`` tokens, of one calibration model on one device (tp = pp = 1)."""

    model: str = Field(description="Key of CALIBRATION_MODELS.")
    kind: str = Field(description="decode or prefill.")
    batch: int = Field(default=1, description="Sequences decoding (decode rows).")
    ctx: int = Field(default=0, description="Context each decoding sequence has.")
    tokens: int = Field(default=0, description="Prompt tokens (prefill rows).")
    ms: float = Field(description="Measured step time of the whole model, ms.")

    @property
    def label(self) -> str:
        if self.kind == "decode":
            return f"{self.model} decode b{self.batch} ctx{self.ctx}"
        return f"{self.model} prefill {self.tokens}"


def calibration_shape(model: str) -> ModelShape:
    """The ModelShape of a calibration model."""
    return parse_model_shape({**_LLAMA_BASE, **CALIBRATION_MODELS[model]}, name=model)


# How EfficiencyCurve.source joins several calibration files.
SOURCE_SEPARATOR = " + "


def calibration_files(source: str) -> list[Path]:
    """The calibration files an EfficiencyCurve's ``source`` names."""
    return [CALIBRATION_DIR / name for name in source.split(SOURCE_SEPARATOR)]


def load_calibrations(source: str) -> tuple[str, list[CalibrationRow]]:
    """The device name and the rows of every calibration file ``source`` names (one device)."""
    devices, rows = set(), []
    for path in calibration_files(source):
        device, found = load_calibration(path)
        devices.add(device)
        rows += found
    if len(devices) != 1:
        raise ConfigError(f"calibration files {source} were measured on {sorted(devices)}")
    return devices.pop(), rows


def calibration_copy_gbs(source: str) -> float:
    """The device-to-device copy rate the first calibration file of ``source`` measured, GB/s
    (bytes read + written)."""
    path = calibration_files(source)[0]
    try:
        return float(json.loads(path.read_text(encoding="utf-8"))["copy_tb_s"]) * 1e3
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"cannot read the copy rate of calibration file {path}: {exc}") from None


def load_calibration(path: Path) -> tuple[str, list[CalibrationRow]]:
    """The device name and the measured rows of a calibration file (rows that failed skipped)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read calibration file {path}: {exc}") from None
    rows = [
        CalibrationRow(
            model=r["model"],
            kind=r["kind"],
            batch=r.get("batch", 1),
            ctx=r.get("ctx", 0),
            tokens=r.get("tokens", 0),
            ms=r["ms_full_model"],
        )
        for r in data["rows"]
        if "error" not in r and r.get("model") in CALIBRATION_MODELS
    ]
    return str(data["device"]), rows


def row_work(row: CalibrationRow) -> StageWork:
    """The planner's bytes and FLOPs of a calibration row (one stage: tp = pp = 1, bf16)."""
    shape = calibration_shape(row.model)
    stages = _build_stages(shape, tp=1, pp=1, weight_dtype="bf16", kv_dtype="bf16")
    if row.kind == "decode":
        work = stage_work(shape, stages, seqs=row.batch, new_tokens=1, past_tokens=row.ctx)
    else:
        work = stage_work(shape, stages, seqs=1, new_tokens=row.tokens, past_tokens=0)
    return work[0]


def _least_squares(columns: list[list[float]], measured: list[float]) -> tuple[list[float], float]:
    """Non-negative coefficients of ``sum(coef * column) ~ measured`` minimising relative error
    (each row weighted by 1 / measured), and the largest relative error."""
    a = np.array(columns, dtype=float).T
    y = np.array(measured, dtype=float)
    weighted = a / y[:, None]
    coef, *_ = np.linalg.lstsq(weighted, np.ones_like(y), rcond=None)
    if (coef < 0).any():  # keep the curve monotone: drop the offending term and refit
        keep = coef >= 0
        sub, *_ = np.linalg.lstsq(weighted[:, keep], np.ones_like(y), rcond=None)
        coef = np.zeros_like(coef)
        coef[keep] = np.clip(sub, 0, None)
    error = float(np.max(np.abs(a @ coef / y - 1)))
    return [float(c) for c in coef], error


def fit_curve(
    device: DeviceSpec,
    rows: list[CalibrationRow],
    *,
    family: str,
    device_name: str,
    source: str,
    measured_on: str,
    held_out: set[str] = frozenset(),  # type: ignore[assignment]
    copy_gbs: float | None = None,
) -> EfficiencyCurve:
    """Fit the family's EfficiencyCurve to measured rows on ``device`` (its datasheet rates).

    Decode rows: ms x bandwidth = W (a + b (W/L / 1 GB)^-c) + K / e_kv, linear in a, b and 1/e_kv
    for a fixed c (W weight bytes, K KV bytes, L layers). Prefill rows: ms x peak =
    F (a + b (F/L / 1 TFLOP)^-c). Each is solved by least squares in relative error over a few
    exponents c; rows named in ``held_out`` are left out (for the tests to check the prediction).
    With ``copy_gbs`` (the device's measured copy rate) weight reads never get more than
    ``copy_gbs`` of the datasheet bandwidth, however large the layer.
    """
    bandwidth = device.bandwidth_gbs * 1e9
    peak = device.bf16_tflops * 1e12
    used = [r for r in rows if r.label not in held_out]
    decode = [(r, row_work(r)) for r in used if r.kind == "decode"]
    prefill = [(r, row_work(r)) for r in used if r.kind == "prefill"]
    if len(decode) < 3 or len(prefill) < 2:
        raise ConfigError(
            f"calibration {source} has {len(decode)} decode and {len(prefill)} prefill rows to fit",
            hint="measure at least 3 decode and 2 prefill shapes",
        )
    best_decode: tuple[float, float, list[float]] | None = None
    best_prefill: tuple[float, float, list[float]] | None = None
    for c in EXPONENTS:
        columns = [
            [w.weight_bytes for _, w in decode],
            [
                w.weight_bytes * (w.weight_bytes / w.layers / WEIGHT_BYTES_SCALE) ** -c
                for _, w in decode
            ],
            [w.kv_bytes for _, w in decode],
        ]
        coef, err = _least_squares(columns, [r.ms / 1e3 * bandwidth for r, _ in decode])
        if best_decode is None or err < best_decode[0]:
            best_decode = (err, c, coef)
        columns = [
            [w.flops for _, w in prefill],
            [w.flops * (w.flops / w.layers / FLOPS_SCALE) ** -c for _, w in prefill],
        ]
        coef, err = _least_squares(columns, [r.ms / 1e3 * peak for r, _ in prefill])
        if best_prefill is None or err < best_prefill[0]:
            best_prefill = (err, c, coef)
    assert best_decode is not None and best_prefill is not None
    _, weight_c, (weight_a, weight_b, kv_inverse) = best_decode
    _, flops_c, (flops_a, flops_b) = best_prefill
    return EfficiencyCurve(
        family=family,
        device=device_name,
        source=source,
        measured_on=measured_on,
        weight_floor=round(weight_a, 6),
        weight_overhead=round(weight_b, 6),
        weight_exponent=weight_c,
        kv_efficiency=round(min(1.0, 1 / kv_inverse), 6) if kv_inverse > 0 else 1.0,
        weight_cap=round(min(1.0, copy_gbs / device.bandwidth_gbs), 6) if copy_gbs else 1.0,
        flops_floor=round(flops_a, 6),
        flops_overhead=round(flops_b, 6),
        flops_exponent=flops_c,
        fitted_rows=[r.label for r in used],
        held_out_rows=[r.label for r in rows if r.label in held_out],
    )
