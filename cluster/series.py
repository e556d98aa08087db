"""What the cluster did during a bench run: its Prometheus series over the run, as CSV and charts.

`llamacluster bench --name CLUSTER` adds a ``MonitorSeries`` observer when the cluster's monitor
runs: it notes when each measured phase started and ended, and after the run asks Prometheus
for the range of every series below (one point a second), writes them to
``<stem>-cluster-series.csv`` and draws ``<stem>-cluster-timeline.png`` (the series over time,
phases shaded) and ``<stem>-cluster-vs-load.png`` (KV-cache use and queue depth against the
offered load, one point per phase).
"""

from __future__ import annotations

import csv
import io
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

#: The series recorded, by name: (PromQL, unit). Short rate windows: phases can be seconds long.
SERIES: dict[str, tuple[str, str]] = {
    "kv_cache_percent": ("max(vllm:kv_cache_usage_perc) * 100", "%"),
    "requests_running": ("sum(vllm:num_requests_running)", "requests"),
    "requests_waiting": ("sum(vllm:num_requests_waiting)", "requests"),
    "output_tokens_s": ("sum(rate(vllm:generation_tokens_total[15s]))", "tokens/s"),
    "input_tokens_s": ("sum(rate(vllm:prompt_tokens_total[15s]))", "tokens/s"),
    "node_cpu_percent": ("max by (ip) (ray_node_cpu_utilization)", "%"),
    "node_gpu_percent": ("avg by (ip) (ray_node_gpus_utilization)", "%"),
    "node_mem_used_bytes": ("max by (ip) (ray_node_mem_used)", "bytes"),
    "node_rx_bytes_s": ("max by (ip) (ray_node_network_receive_speed)", "bytes/s"),
    "node_tx_bytes_s": ("max by (ip) (ray_node_network_send_speed)", "bytes/s"),
}
#: Resolution of the range queries, seconds.
STEP_S = 1.0
#: Margin before the first phase and after the last; the server is scraped every 5 s.
MARGIN_S = 10.0


@dataclass
class Phase:
    """One measured phase of the run."""

    endpoint: str
    label: str
    offered: float  # concurrency or request rate (the bench's x value)
    start: float
    end: float | None = None


@dataclass
class Point:
    """One sample of one series."""

    series: str
    labels: str
    t: float
    value: float


def phase_of(t: float, phases: list[Phase]) -> Phase | None:
    """The phase running at time ``t`` (None between phases)."""
    for p in phases:
        if p.start <= t <= (p.end if p.end is not None else math.inf):
            return p
    return None


def points_from_matrix(series: str, result: list[dict]) -> list[Point]:
    """Points of one range query's ``data.result`` (labels as ``k=v,k=v``)."""
    out = []
    for s in result:
        labels = ",".join(f"{k}={v}" for k, v in sorted(s.get("metric", {}).items()))
        for t, v in s.get("values", []):
            value = float(v)
            if not math.isnan(value):
                out.append(Point(series, labels, float(t), value))
    return out


def series_csv(points: list[Point], phases: list[Phase]) -> str:
    """Long CSV: series, labels, unix time, value, and the phase running then."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["series", "labels", "time", "value", "endpoint", "phase", "offered_load"])
    for p in points:
        ph = phase_of(p.t, phases)
        w.writerow(
            [p.series, p.labels, f"{p.t:.3f}", f"{p.value:.6g}"]
            + ([ph.endpoint, ph.label, f"{ph.offered:g}"] if ph else ["", "", ""])
        )
    return buf.getvalue()


def per_phase(
    points: list[Point], phases: list[Phase], series: str, how: str = "mean"
) -> list[tuple[Phase, float]]:
    """One figure per phase of ``series`` (summed over its label sets at each time): the mean
    or the max of its samples inside the phase; phases without samples are left out."""
    out = []
    for ph in phases:
        by_t: dict[float, float] = {}
        for p in points:
            if p.series == series and ph.start <= p.t <= (ph.end or ph.start):
                by_t[p.t] = by_t.get(p.t, 0.0) + p.value
        if by_t:
            vals = list(by_t.values())
            out.append((ph, max(vals) if how == "max" else sum(vals) / len(vals)))
    return out


def _figure(rows: int, cols: int, size: tuple[float, float]):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(rows, cols, squeeze=False)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def timeline_plot(points: list[Point], phases: list[Phase]) -> bytes:
    """PNG: the engine's and the nodes' series over the run, each measured phase shaded."""
    panels = [
        ("KV-cache use (%)", ["kv_cache_percent"]),
        ("requests", ["requests_running", "requests_waiting"]),
        ("tokens/s", ["output_tokens_s", "input_tokens_s"]),
        ("node CPU (%)", ["node_cpu_percent"]),
    ]
    fig, axes = _figure(len(panels), 1, (10, 2.2 * len(panels)))
    t0 = min((p.start for p in phases), default=min((p.t for p in points), default=0.0))
    for ax, (title, names) in zip(axes[:, 0], panels, strict=True):
        for name in names:
            groups: dict[str, list[Point]] = {}
            for p in points:
                if p.series == name:
                    groups.setdefault(p.labels, []).append(p)
            for labels, pts in sorted(groups.items()):
                label = name + (f" {labels}" if labels else "")
                ax.plot([p.t - t0 for p in pts], [p.value for p in pts], label=label)
        for ph in phases:
            ax.axvspan(ph.start - t0, (ph.end or ph.start) - t0, color="0.9", zorder=0)
        ax.set_title(title, fontsize=10)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="upper right")
    axes[-1, 0].set_xlabel("seconds since the first phase (measured phases shaded)")
    return _png(fig)


def load_plot(points: list[Point], phases: list[Phase]) -> bytes:
    """PNG: KV-cache use and queue depth (running, waiting) against the offered load."""
    fig, axes = _figure(1, 2, (11, 4.2))
    kv_ax, q_ax = axes[0]
    endpoints = sorted({ph.endpoint for ph in phases})
    for ep in endpoints:
        mine = [ph for ph in phases if ph.endpoint == ep]
        for ax, series, how, name in (
            (kv_ax, "kv_cache_percent", "max", "KV cache max"),
            (kv_ax, "kv_cache_percent", "mean", "KV cache mean"),
            (q_ax, "requests_running", "mean", "running"),
            (q_ax, "requests_waiting", "mean", "waiting"),
        ):
            figures = sorted((ph.offered, v) for ph, v in per_phase(points, mine, series, how))
            if figures:
                ax.plot(*zip(*figures, strict=True), marker="o", label=f"{ep} {name}")
    kv_ax.set_title("KV-cache use (%) against offered load", fontsize=10)
    q_ax.set_title("requests in the engine (mean over the phase)", fontsize=10)
    for ax in (kv_ax, q_ax):
        ax.set_xlabel("offered load (concurrency or request rate)")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    return _png(fig)


@dataclass
class MonitorSeries:
    """A bench PointObserver that notes each measured phase's time span, then fetches the
    cluster's series over the run from Prometheus (``query_range`` from ``open_prometheus``)."""

    open_prometheus: Callable[[], tuple[Callable[[str, float, float, float], list[dict]], Callable]]
    clock: Callable[[], float] = time.time
    phases: list[Phase] = field(default_factory=list)

    def phase_started(self, endpoint, point, round_index: int) -> None:
        self.phases.append(Phase(endpoint.name, point.label, point.x_value, self.clock()))

    def phase_finished(self, endpoint, point, round_index: int) -> None:
        if self.phases:
            self.phases[-1].end = self.clock()

    def columns(self, endpoint, point, metrics) -> Mapping[str, float]:
        return {}

    def fetch(self) -> list[Point]:
        """Every series over the run (waits for the scrape after the last phase first)."""
        if not self.phases:
            return []
        start = self.phases[0].start - MARGIN_S
        end = max(p.end or p.start for p in self.phases) + MARGIN_S / 2
        time.sleep(max(0.0, end - self.clock()))
        query_range, close = self.open_prometheus()
        try:
            points: list[Point] = []
            for name, (expr, _) in SERIES.items():
                points += points_from_matrix(name, query_range(expr, start, end, STEP_S))
            return points
        finally:
            close()

    def write(self, out_dir: Path, stem: str = "bench") -> dict[str, Path]:
        """Write the CSV and the two charts; the paths written."""
        from cluster.files import atomic_write

        points = self.fetch()
        if not points:
            return {}
        out_dir = Path(out_dir)
        written = {
            "cluster_csv": out_dir / f"{stem}-cluster-series.csv",
            "cluster_timeline_png": out_dir / f"{stem}-cluster-timeline.png",
            "cluster_load_png": out_dir / f"{stem}-cluster-vs-load.png",
        }
        atomic_write(written["cluster_csv"], series_csv(points, self.phases).encode())
        atomic_write(written["cluster_timeline_png"], timeline_plot(points, self.phases))
        atomic_write(written["cluster_load_png"], load_plot(points, self.phases))
        return written


def cluster_series(name: str) -> MonitorSeries | None:
    """The observer for recorded cluster ``name``, or None when it has no running monitor."""
    from cluster.state import load_state

    state = load_state(name)
    mon = state.monitoring
    if mon.pid is None or not mon.url:
        return None

    def open_prometheus():
        from cluster import top

        source, close = top.open_source(name=name)
        if not isinstance(source, top.PrometheusSource):
            close()
            from cluster.errors import LlamaclusterError

            raise LlamaclusterError("the cluster's monitor is gone")
        return source.query_range, close

    return MonitorSeries(open_prometheus)
