"""Result outputs: the console table, JSON, CSV, per-request JSONL and PNG plots (atomic writes)."""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.table import Table

from cluster.bench.metrics import PointMetrics
from cluster.bench.runner import BenchResult
from cluster.files import atomic_write


def _fmt(value: float | None, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return f"{value:,.{digits}f}"


def _big(value: float | None) -> str:
    """Large counts (tokens per dollar) with a k/M suffix."""
    if value is None or math.isnan(value):
        return "-"
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= div:
            return f"{value / div:.2f}{suffix}"
    return f"{value:.1f}"


Column = tuple[str, Callable[[PointMetrics], str]]


def _columns(result: BenchResult) -> list[Column]:
    multi = len(result.endpoints) > 1
    cols: list[Column] = []
    if multi:
        cols.append(("endpoint", lambda p: p.endpoint))
    cols += [
        ("load", lambda p: p.point),
        ("ok", lambda p: f"{p.completed}/{p.requests}"),
        ("out tok/s", lambda p: _fmt(p.output_throughput)),
        ("total tok/s", lambda p: _fmt(p.total_token_throughput)),
        ("req/s", lambda p: _fmt(p.request_throughput, 2)),
        ("TTFT p50 ms", lambda p: _fmt(p.ttft_ms.p50)),
        ("TTFT p99 ms", lambda p: _fmt(p.ttft_ms.p99)),
        ("TPOT p50 ms", lambda p: _fmt(p.tpot_ms.p50, 2)),
        ("TPOT p99 ms", lambda p: _fmt(p.tpot_ms.p99, 2)),
        ("ITL p50 ms", lambda p: _fmt(p.itl_ms.p50, 2)),
        ("E2E p99 ms", lambda p: _fmt(p.e2e_ms.p99)),
    ]
    if any(p.goodput is not None for p in result.points):
        cols.append(("goodput req/s", lambda p: _fmt(p.goodput, 2)))
    cols.append(("errors", lambda p: ", ".join(f"{k}×{v}" for k, v in p.errors.items()) or "0"))
    if any(p.cost is not None for p in result.points):
        cols += [
            ("tok/$", lambda p: _big(p.cost.tokens_per_dollar if p.cost else None)),
            ("tok/¢", lambda p: _big(p.cost.tokens_per_cent if p.cost else None)),
            ("$/Mtok", lambda p: _fmt(p.cost.dollars_per_million_tokens if p.cost else None, 3)),
        ]
    extra_names: list[str] = []
    for p in result.points:
        extra_names += [k for k in p.extra if k not in extra_names]
    for name in extra_names:
        cols.append((name, lambda p, n=name: _fmt(p.extra.get(n), 2)))
    return cols


def results_table(result: BenchResult, *, title: str | None = None) -> Table:
    """The published-style table: one row per sweep point (and endpoint)."""
    table = Table(title=title or "llamacluster bench", header_style="bold")
    cols = _columns(result)
    for name, _ in cols:
        table.add_column(
            name, justify="left" if name in ("endpoint", "load", "errors") else "right"
        )
    for p in result.points:
        table.add_row(*(fn(p) for _, fn in cols))
    return table


def ratios_table(result: BenchResult) -> Table | None:
    """Compare mode: each endpoint's figures divided by the first endpoint's, per point."""
    if not result.ratios:
        return None
    names = ["output_tok/s", "req/s", "ttft_p50", "ttft_p99", "tpot_p50", "tpot_p99", "e2e_p99"]
    baseline = result.ratios[0]["baseline"]
    table = Table(title=f"ratios vs {baseline} (>1: larger)", header_style="bold")
    table.add_column("load")
    table.add_column("endpoint")
    for n in names:
        table.add_column(n, justify="right")
    for row in result.ratios:
        table.add_row(
            row["point"], row["endpoint"], *(f"{_fmt(row['ratios'][n], 3)}×" for n in names)
        )
    return table


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def result_json(result: BenchResult) -> str:
    """The full result as JSON text (NaN as null, infinity as the string 'inf')."""
    return json.dumps(_json_safe(result.to_dict()), indent=2, sort_keys=False)


def result_csv(result: BenchResult) -> str:
    """One CSV row per endpoint and sweep point, every figure a column."""
    rows = [p.flat() for p in result.points]
    names: list[str] = []
    for row in rows:
        names += [k for k in row if k not in names]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=names, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _json_safe(v) for k, v in row.items()})
    return buf.getvalue()


def write_reports(
    result: BenchResult,
    out_dir: Path,
    *,
    plots: bool = True,
    per_request: bool = False,
    stem: str = "bench",
) -> dict[str, Path]:
    """Write JSON, CSV, optional per-request JSONL and PNG plots into ``out_dir``."""
    out_dir = Path(out_dir)
    written: dict[str, Path] = {}
    written["json"] = out_dir / f"{stem}.json"
    atomic_write(written["json"], result_json(result).encode())
    written["csv"] = out_dir / f"{stem}.csv"
    atomic_write(written["csv"], result_csv(result).encode())
    if per_request:
        written["requests"] = out_dir / f"{stem}-requests.jsonl"
        lines = (json.dumps(_json_safe(r.to_json())) for r in result.records)
        atomic_write(written["requests"], ("\n".join(lines) + "\n").encode())
    if plots and result.points:
        written["throughput_png"] = out_dir / f"{stem}-throughput.png"
        written["latency_png"] = out_dir / f"{stem}-latency.png"
        atomic_write(written["throughput_png"], throughput_plot(result))
        atomic_write(written["latency_png"], latency_plot(result))
    return written


def _series(result: BenchResult) -> dict[str, list[PointMetrics]]:
    series: dict[str, list[PointMetrics]] = {}
    for p in result.points:
        series.setdefault(p.endpoint, []).append(p)
    for points in series.values():
        points.sort(key=lambda p: p.x)
    return series


def _x_label(result: BenchResult) -> str:
    modes = {p.mode for p in result.points}
    return "request rate (req/s)" if modes == {"open"} else "concurrency"


def _figure(rows: int, cols: int, size: tuple[float, float]):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False)
    return fig, axes


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _use_log_x(xs: list[float]) -> bool:
    finite = [x for x in xs if x > 0 and math.isfinite(x)]
    return len(finite) >= 3 and max(finite) / min(finite) >= 8


def throughput_plot(result: BenchResult) -> bytes:
    """PNG bytes: output tokens/s and requests/s against concurrency (or rate), per endpoint."""
    fig, axes = _figure(1, 2, (11, 4.2))
    series = _series(result)
    for name, pts in series.items():
        xs = [p.x for p in pts]
        axes[0][0].plot(xs, [p.output_throughput for p in pts], marker="o", label=name)
        axes[0][1].plot(xs, [p.request_throughput for p in pts], marker="o", label=name)
    all_x = [p.x for p in result.points]
    for ax, ylabel in zip(axes[0], ("output tokens/s", "requests/s"), strict=True):
        ax.set_xlabel(_x_label(result))
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        if _use_log_x(all_x):
            ax.set_xscale("log", base=2)
        ax.legend()
    fig.suptitle("Throughput")
    return _png(fig)


def latency_plot(result: BenchResult) -> bytes:
    """PNG bytes: TTFT, TPOT, ITL and E2E p50/p90/p99 against concurrency (or rate)."""
    fig, axes = _figure(2, 2, (11, 8))
    series = _series(result)
    panels = (
        ("ttft_ms", "TTFT"),
        ("tpot_ms", "TPOT"),
        ("itl_ms", "ITL"),
        ("e2e_ms", "E2E latency"),
    )
    styles = (("p50", "-"), ("p90", ":"), ("p99", "--"))
    all_x = [p.x for p in result.points]
    for ax, (attr, title) in zip((a for row in axes for a in row), panels, strict=True):
        for idx, (name, pts) in enumerate(series.items()):
            xs = [p.x for p in pts]
            color = f"C{idx}"
            for q, style in styles:
                ys = [getattr(getattr(p, attr), q) for p in pts]
                ax.plot(xs, ys, linestyle=style, marker="o", color=color, label=f"{name} {q}")
        ax.set_title(title)
        ax.set_xlabel(_x_label(result))
        ax.set_ylabel("ms")
        ax.grid(True, alpha=0.3)
        if _use_log_x(all_x):
            ax.set_xscale("log", base=2)
        ax.legend(fontsize="small")
    fig.suptitle("Latency percentiles")
    return _png(fig)
