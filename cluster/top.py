"""`llamacluster top`: a live view of the nodes and the engine, from Prometheus or /metrics.

Two sources give the same frame:

- the cluster's Prometheus (the monitor stage's): instant queries over the last minute, per Ray
  node (``ray_node_*``) and for the server (``vllm:*``, ``llamacluster_*``);
- any vLLM-compatible server's ``/metrics`` read directly: rates and latency quantiles come from
  the difference between samples kept for up to a minute (no per-node rows there).

The arithmetic (histogram quantiles, rates, rows) is pure and tested without a server.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace

#: The window of "over the last minute" figures.
WINDOW_S = 60.0
#: Seconds between frames.
REFRESH_S = 1.5
#: How long one read (a /metrics page, one Prometheus query) may take: a server saturated by
#: its load answers its /metrics late, and a frame waits for it rather than fail.
TIMEOUT_S = 15.0

# A sample key: metric name and its sorted labels.
Key = tuple[str, tuple[tuple[str, str], ...]]
Samples = dict[Key, float]


@dataclass
class NodeRow:
    """One Ray node as its agent reports it."""

    ip: str
    cpu_percent: float | None = None
    gpu_percent: float | None = None  # mean over the node's GPUs; None: no GPU series
    gpus: int = 0
    mem_used: float | None = None
    mem_total: float | None = None
    rx_bytes_s: float | None = None
    tx_bytes_s: float | None = None


@dataclass
class EngineRow:
    """The engine over the last minute (rates, quantiles) and now (gauges)."""

    running: float | None = None
    waiting: float | None = None
    kv_cache_percent: float | None = None
    requests_s: float | None = None
    input_tokens_s: float | None = None
    output_tokens_s: float | None = None
    ttft_p50_s: float | None = None
    ttft_p99_s: float | None = None
    itl_p50_s: float | None = None
    itl_p99_s: float | None = None
    restarts: float | None = None


@dataclass
class Frame:
    """What one refresh shows."""

    source: str
    engine: EngineRow = field(default_factory=EngineRow)
    nodes: list[NodeRow] = field(default_factory=list)
    note: str = ""


# -- pure arithmetic ---------------------------------------------------------------------------


def histogram_quantile(q: float, buckets: Iterable[tuple[float, float]]) -> float | None:
    """The ``q`` quantile of a cumulative histogram ``[(le, count), ...]``, interpolated
    linearly inside the bucket as Prometheus's ``histogram_quantile`` does; None when empty."""
    points = sorted(buckets)
    if not points or points[-1][1] <= 0:
        return None
    total = points[-1][1]
    rank = q * total
    prev_le, prev_count = 0.0, 0.0
    for le, count in points:
        if count >= rank:
            if math.isinf(le):
                return prev_le  # the highest finite bound, as Prometheus answers
            if count == prev_count:
                return le
            return prev_le + (le - prev_le) * (rank - prev_count) / (count - prev_count)
        prev_le, prev_count = le, count
    return prev_le


def rate(before: float | None, after: float | None, seconds: float) -> float | None:
    """Per-second increase of a counter (a reset counts from zero); None without two samples."""
    if before is None or after is None or seconds <= 0:
        return None
    delta = after - before if after >= before else after
    return delta / seconds


def total(samples: Samples, name: str) -> float | None:
    """Sum of every series of ``name`` (None when there is none)."""
    values = [v for (n, _), v in samples.items() if n == name]
    return sum(values) if values else None


def maximum(samples: Samples, name: str) -> float | None:
    values = [v for (n, _), v in samples.items() if n == name]
    return max(values) if values else None


def buckets(samples: Samples, name: str) -> dict[float, float]:
    """A histogram's cumulative buckets summed over its series: ``{le: count}``."""
    out: dict[float, float] = {}
    for (n, labels), v in samples.items():
        if n == f"{name}_bucket":
            le = float(dict(labels)["le"])
            out[le] = out.get(le, 0.0) + v
    return out


def bucket_delta(
    before: dict[float, float], after: dict[float, float]
) -> list[tuple[float, float]]:
    """What a histogram gained between two samples (the whole of ``after`` after a reset)."""
    if any(after.get(le, 0.0) < c for le, c in before.items()):
        before = {}
    return [(le, c - before.get(le, 0.0)) for le, c in after.items()]


def engine_row(old: Samples | None, new: Samples, seconds: float) -> EngineRow:
    """The engine row from two /metrics samples ``seconds`` apart (``old`` None: gauges only,
    quantiles over everything the server counted)."""
    row = EngineRow(
        running=total(new, "vllm:num_requests_running"),
        waiting=total(new, "vllm:num_requests_waiting"),
        restarts=total(new, "llamacluster_engine_restarts_total"),
    )
    kv = maximum(new, "vllm:kv_cache_usage_perc")
    row.kv_cache_percent = None if kv is None else kv * 100
    old = old if old is not None else {}
    for attr, name in (
        ("requests_s", "vllm:request_success_total"),
        ("input_tokens_s", "vllm:prompt_tokens_total"),
        ("output_tokens_s", "vllm:generation_tokens_total"),
    ):
        setattr(row, attr, rate(total(old, name), total(new, name), seconds) if old else None)
    for prefix, name in (
        ("ttft", "vllm:time_to_first_token_seconds"),
        ("itl", "vllm:inter_token_latency_seconds"),
    ):
        gained = bucket_delta(buckets(old, name), buckets(new, name))
        setattr(row, f"{prefix}_p50_s", histogram_quantile(0.5, gained))
        setattr(row, f"{prefix}_p99_s", histogram_quantile(0.99, gained))
    return row


#: Prometheus instant queries behind each engine field (the last minute for rates and quantiles).
ENGINE_QUERIES: dict[str, str] = {
    "running": "sum(vllm:num_requests_running)",
    "waiting": "sum(vllm:num_requests_waiting)",
    "kv_cache_percent": "max(vllm:kv_cache_usage_perc) * 100",
    "requests_s": "sum(rate(vllm:request_success_total[1m]))",
    "input_tokens_s": "sum(rate(vllm:prompt_tokens_total[1m]))",
    "output_tokens_s": "sum(rate(vllm:generation_tokens_total[1m]))",
    "ttft_p50_s": "histogram_quantile(0.5, sum by (le) (rate(vllm:time_to_first_token_seconds_bucket[1m])))",
    "ttft_p99_s": "histogram_quantile(0.99, sum by (le) (rate(vllm:time_to_first_token_seconds_bucket[1m])))",
    "itl_p50_s": "histogram_quantile(0.5, sum by (le) (rate(vllm:inter_token_latency_seconds_bucket[1m])))",
    "itl_p99_s": "histogram_quantile(0.99, sum by (le) (rate(vllm:inter_token_latency_seconds_bucket[1m])))",
    "restarts": "sum(llamacluster_engine_restarts_total) or vector(0)",
}
#: Per node (by Ray's ``ip`` label).
NODE_QUERIES: dict[str, str] = {
    "cpu_percent": "max by (ip) (ray_node_cpu_utilization)",
    "gpu_percent": "avg by (ip) (ray_node_gpus_utilization)",
    "gpus": "count by (ip) (ray_node_gpus_utilization)",
    "mem_used": "max by (ip) (ray_node_mem_used)",
    "mem_total": "max by (ip) (ray_node_mem_total)",
    "rx_bytes_s": "max by (ip) (ray_node_network_receive_speed)",
    "tx_bytes_s": "max by (ip) (ray_node_network_send_speed)",
}


def _number(text: str) -> float | None:
    value = float(text)
    return None if math.isnan(value) else value


def engine_from_prometheus(results: Mapping[str, list[dict]]) -> EngineRow:
    """The engine row from Prometheus instant-query results (``data.result`` per field)."""
    row = EngineRow()
    for attr, result in results.items():
        if result:
            setattr(row, attr, _number(result[0]["value"][1]))
    return row


def nodes_from_prometheus(results: Mapping[str, list[dict]]) -> list[NodeRow]:
    """Node rows (sorted by address) from the per-node query results."""
    nodes: dict[str, NodeRow] = {}
    for attr, result in results.items():
        for series in result:
            ip = series.get("metric", {}).get("ip")
            if not ip:
                continue
            node = nodes.setdefault(ip, NodeRow(ip=ip))
            value = _number(series["value"][1])
            setattr(node, attr, int(value or 0) if attr == "gpus" else value)
    return [nodes[ip] for ip in sorted(nodes)]


# -- sources ------------------------------------------------------------------------------------


def parse_metrics(text: str) -> Samples:
    """Prometheus text exposition into samples (prometheus_client's parser)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = float(s.value)
    return out


class PrometheusSource:
    """Frames from a Prometheus's HTTP API (the monitor's, directly or through a forward)."""

    def __init__(self, url: str, *, timeout_s: float = TIMEOUT_S, label: str | None = None) -> None:
        import httpx

        self.url = url.rstrip("/")
        self.label = label or f"prometheus {self.url}"
        self.client = httpx.Client(timeout=timeout_s)

    def query(self, expr: str) -> list[dict]:
        resp = _get(self.client, f"{self.url}/api/v1/query", self.label, {"query": expr})
        return _answered(resp, self.label).json()["data"]["result"]

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict]:
        params = {"query": expr, "start": start, "end": end, "step": step}
        resp = _get(self.client, f"{self.url}/api/v1/query_range", self.label, params)
        return _answered(resp, self.label).json()["data"]["result"]

    def frame(self) -> Frame:
        engine = engine_from_prometheus({a: self.query(q) for a, q in ENGINE_QUERIES.items()})
        nodes = nodes_from_prometheus({a: self.query(q) for a, q in NODE_QUERIES.items()})
        return Frame(source=self.label, engine=engine, nodes=nodes)

    def close(self) -> None:
        self.client.close()


class MetricsSource:
    """Frames from a server's /metrics read directly, rates over the samples of the last minute."""

    def __init__(
        self,
        metrics_url: str,
        *,
        api_key: str | None = None,
        timeout_s: float = TIMEOUT_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        import httpx

        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.url = metrics_url
        self.client = httpx.Client(timeout=timeout_s, headers=headers)
        self.clock = clock
        self.history: deque[tuple[float, Samples]] = deque()

    def sample(self) -> None:
        from cluster.errors import LlamaclusterError

        resp = _get(self.client, self.url, self.url)
        if resp.status_code in (401, 403):
            raise LlamaclusterError(
                f"{self.url} refused the API key ({resp.status_code})",
                hint="pass the cluster's key with --api-key-file (or --name for a recorded cluster)",
            )
        _answered(resp, self.url)
        now = self.clock()
        self.history.append((now, parse_metrics(resp.text)))
        while len(self.history) > 2 and now - self.history[1][0] >= WINDOW_S:
            self.history.popleft()

    def frame(self) -> Frame:
        self.sample()
        (t0, old), (t1, new) = self.history[0], self.history[-1]
        row = engine_row(old if t1 > t0 else None, new, t1 - t0)
        note = "no per-node figures without the cluster's monitor"
        return Frame(source=f"metrics {self.url}", engine=row, note=note)

    def close(self) -> None:
        self.client.close()


def _get(client, url: str, what: str, params: dict | None = None):
    """One GET; a read that times out or a server that cannot be reached is one line to act on."""
    import httpx

    from cluster.errors import LlamaclusterError, NotReadyError

    try:
        return client.get(url, params=params)
    except httpx.TimeoutException:
        raise NotReadyError(
            f"{what} did not answer within {client.timeout.read:g} s",
            hint="a server saturated by its load answers late: raise --timeout",
        ) from None
    except httpx.TransportError as exc:
        raise LlamaclusterError(
            f"cannot read {what}: {exc or type(exc).__name__}",
            hint="check the cluster is up with `llamacluster status`",
        ) from None


def _answered(resp, what: str):
    """``resp`` when it succeeded; an error answer is one line with its status and first words."""
    from cluster.errors import LlamaclusterError

    if resp.status_code >= 400:
        words = " ".join(resp.text.split())[:200]
        raise LlamaclusterError(f"{what} answered {resp.status_code}: {words or '(no body)'}")
    return resp


def metrics_url(base_url: str) -> str:
    """The /metrics beside an OpenAI base URL (``http://h:8000/v1`` → ``http://h:8000/metrics``)."""
    root = base_url.rstrip("/")
    if root.endswith("/v1"):
        root = root[: -len("/v1")]
    return f"{root}/metrics"


# -- rendering ----------------------------------------------------------------------------------


def _fmt(value: float | None, spec: str = ".1f", suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.1f} ms"


def _bytes(value: float | None, suffix: str = "") -> str:
    if value is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.1f} {unit}{suffix}" if unit != "B" else f"{value:.0f} B{suffix}"
        value /= 1024
    return "-"


def engine_cells(row: EngineRow) -> list[tuple[str, str]]:
    """(heading, text) pairs of the engine table, in order."""
    return [
        ("running", _fmt(row.running, ".0f")),
        ("waiting", _fmt(row.waiting, ".0f")),
        ("KV cache", _fmt(row.kv_cache_percent, ".1f", " %")),
        ("req/s", _fmt(row.requests_s, ".2f")),
        ("in tok/s", _fmt(row.input_tokens_s, ".1f")),
        ("out tok/s", _fmt(row.output_tokens_s, ".1f")),
        ("TTFT p50", _ms(row.ttft_p50_s)),
        ("TTFT p99", _ms(row.ttft_p99_s)),
        ("ITL p50", _ms(row.itl_p50_s)),
        ("ITL p99", _ms(row.itl_p99_s)),
        ("restarts", _fmt(row.restarts, ".0f")),
    ]


def node_cells(node: NodeRow) -> list[tuple[str, str]]:
    """(heading, text) pairs of one node's row, in order."""
    gpu = "none" if not node.gpus else f"{_fmt(node.gpu_percent, '.0f', ' %')} of {node.gpus}"
    mem = _bytes(node.mem_used)
    if node.mem_total:
        mem += f" / {_bytes(node.mem_total)}"
    return [
        ("node", node.ip),
        ("CPU", _fmt(node.cpu_percent, ".0f", " %")),
        ("GPU", gpu),
        ("memory", mem),
        ("rx", _bytes(node.rx_bytes_s, "/s")),
        ("tx", _bytes(node.tx_bytes_s, "/s")),
    ]


def render(frame: Frame, *, clock: Callable[[], float] = time.time):
    """A rich renderable of one frame."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    cells = engine_cells(frame.engine)
    engine = Table(title="engine (rates and quantiles: last minute)", title_justify="left")
    for heading, _ in cells:
        engine.add_column(heading, justify="right")
    engine.add_row(*(text for _, text in cells))
    parts = [
        Text(
            f"llamacluster top · {frame.source} · {time.strftime('%H:%M:%S', time.localtime(clock()))}",
            style="bold",
        ),
        engine,
    ]
    if frame.nodes:
        nodes = Table(title="nodes", title_justify="left")
        for heading, _ in node_cells(frame.nodes[0]):
            nodes.add_column(heading, justify="right")
        for node in frame.nodes:
            nodes.add_row(*(text for _, text in node_cells(node)))
        parts.append(nodes)
    if frame.note:
        parts.append(Text(frame.note, style="dim"))
    return Group(*parts)


# -- choosing the source ------------------------------------------------------------------------


class SSHForward:
    """``ssh -N -L <free port>:127.0.0.1:<remote port>`` to the head, for as long as it is open."""

    def __init__(self, argv: list[str], local_port: int, *, wait_s: float = 20.0) -> None:
        import socket
        import subprocess

        from cluster.errors import RemoteError

        self.local_port = local_port
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = (self.proc.stderr.read() if self.proc.stderr else b"").decode(
                    errors="replace"
                )
                raise RemoteError(
                    f"the SSH forward to the monitor failed: {err.strip()[-300:] or 'ssh exited'}",
                    hint="check `llamacluster ssh` reaches the head",
                )
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", local_port)) == 0:
                    return
            time.sleep(0.2)
        self.close()
        raise RemoteError("the SSH forward to the monitor did not open in time")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except Exception:
                self.proc.kill()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def open_source(
    *,
    name: str | None,
    base_url: str | None = None,
    api_key: str | None = None,
    api_key_file=None,
    timeout_s: float = TIMEOUT_S,
) -> tuple[PrometheusSource | MetricsSource, Callable[[], None]]:
    """The source for ``top`` and how to close it: ``--base-url`` reads that server's /metrics;
    a recorded cluster with a running monitor is read from its Prometheus (directly for a
    ``--local`` cluster, else through an SSH forward to the head); without one, the cluster's
    server /metrics."""
    from cluster.endpoint import resolve_target

    if base_url:
        target = resolve_target(base_url=base_url, api_key=api_key, api_key_file=api_key_file)
        src = MetricsSource(
            metrics_url(target.base_url), api_key=target.api_key, timeout_s=timeout_s
        )
        return src, src.close
    from cluster.state import load_state

    state = load_state(name or "local")
    mon = state.monitoring
    if mon.pid is not None and mon.url and state.ports and state.ports.monitor:
        if state.local:
            src = PrometheusSource(mon.url, timeout_s=timeout_s)
            return src, src.close
        from cluster.recorded import RecordedCluster, ssh_config_of
        from cluster.runner import ssh_argv

        port = _free_port()
        head = RecordedCluster(state).inventory.head
        # Not through the cluster's multiplexed master: a mux client with -N hands the forward
        # to the master and exits at once, so the port would outlive `top` and `top` would see
        # its ssh gone. A connection of its own lives and dies with this forward.
        argv = ssh_argv(
            head,
            ssh_config_of(state, multiplex=False),
            extra_args=[
                "-N",
                "-o",
                "ControlPath=none",
                "-o",
                "ExitOnForwardFailure=yes",
                "-L",
                f"127.0.0.1:{port}:127.0.0.1:{state.ports.monitor}",
            ],
        )
        forward = SSHForward(argv, port)
        src = PrometheusSource(
            f"http://127.0.0.1:{port}", timeout_s=timeout_s, label=f"prometheus on {head.label}"
        )

        def close() -> None:
            src.close()
            forward.close()

        return src, close
    target = resolve_target(name=name or "local", api_key=api_key, api_key_file=api_key_file)
    src = MetricsSource(metrics_url(target.base_url), api_key=target.api_key, timeout_s=timeout_s)
    return src, src.close


def refreshed(source, last: Frame, *, clock: Callable[[], float] = time.time) -> Frame:
    """The next frame of a live view; a read that fails keeps the frame before on screen, with a
    note saying what failed and when (the next refresh tries again)."""
    from cluster.errors import LlamaclusterError

    try:
        return source.frame()
    except LlamaclusterError as exc:
        at = time.strftime("%H:%M:%S", time.localtime(clock()))
        return replace(last, note=f"{at} {exc.one_line()}; showing the last frame read")


def run(source, *, once: bool = False, interval_s: float = REFRESH_S, console=None) -> None:
    """Show frames until interrupted (``once``: one frame, printed; from /metrics two samples
    ``interval_s`` apart, so rates are not empty)."""
    from rich.console import Console
    from rich.live import Live

    console = console or Console(emoji=False)
    if once:
        if isinstance(source, MetricsSource):
            source.sample()
            time.sleep(interval_s)
        console.print(render(source.frame()))
        return
    frame = source.frame()
    with Live(render(frame), console=console, refresh_per_second=4) as live:
        while True:
            time.sleep(interval_s)
            frame = refreshed(source, frame)
            live.update(render(frame))
