"""Seeing the cluster work: `up --local`, a bench load, the dashboards in headless Chromium,
`top --once` (from Prometheus and straight from /metrics) and the bench's cluster series."""

from __future__ import annotations

import csv
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster import dashboards
from tests.cluster.test_up_e2e import _bring_down_and_check, _ok, _state, llamacluster

pytestmark = pytest.mark.e2e

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
#: Set to a directory to keep the screenshots (docs/img is made this way).
SCREENSHOT_DIR = os.environ.get("LLAMACLUSTER_SCREENSHOTS")
#: The node charts that may be empty here: no GPU on a CPU-only machine.
MAY_BE_EMPTY = {"node_gpu"}


def _chromium(*args: str, tmp: Path, timeout: float = 120) -> str:
    """Headless Chromium (as root it needs --no-sandbox); JavaScript runs for a virtual 10 s."""
    assert CHROMIUM
    argv = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
        f"--user-data-dir={tmp / 'chromium-profile'}", "--virtual-time-budget=10000", *args,
    ]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def _charts(dom: str) -> dict[str, str]:
    """Each chart's rendered HTML, by its id."""
    parts = re.split(r'<div class="lc-chart" id="([a-z_]+)">', dom)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def _drawn_points(chart_html: str) -> int:
    """Points of the longest line Rickshaw drew in one chart (``M x,y L x,y ...``)."""
    paths = re.findall(r'<path class="path" d="([^"]+)"', chart_html)
    return max((p.count("L") + 1 for p in paths), default=0)


def _keep(path: Path, name: str) -> None:
    if SCREENSHOT_DIR:
        Path(SCREENSHOT_DIR).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, Path(SCREENSHOT_DIR) / name)


@pytest.fixture
def cli_env(tmp_path) -> dict[str, str]:
    env = dict(os.environ)
    env["LLAMACLUSTER_HOME"] = str(tmp_path / "home")
    env["VLLM_CPU_KVCACHE_SPACE"] = "1"
    env["COLUMNS"] = "200"
    return env


@pytest.mark.timeout(1200)
def test_dashboards_top_and_bench_series_show_a_loaded_cluster(tmp_path, cli_env, demo_model_dir):
    if CHROMIUM is None or shutil.which("prometheus") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium and prometheus are needed: run ./bootstrap.sh --test")
        pytest.skip("needs chromium and prometheus (./bootstrap.sh --test installs them)")
    home = Path(cli_env["LLAMACLUSTER_HOME"])
    up_args = ["--local", "--model", str(demo_model_dir), "--tp", "1", "--pp", "1",
               "--ray-port", "0", "--dashboard-port", "0", "--api-port", "0",
               "--monitor-port", "0", "--cpu-kvcache-gb", "1"]  # fmt: skip
    try:
        _ok(llamacluster("up", *up_args, env=cli_env))
        state = _state(home, "local")
        key_file = state["secrets"]["api_key_file"]
        # A load of two points long enough for several scrapes each (the server's: every 5 s).
        out = tmp_path / "bench"
        bench = subprocess.Popen(
            [sys.executable, "-c", "from cluster.cli.app import run; run()", "bench",
             "--name", "local", "--concurrency", "2,8", "--duration", "12s", "--input-len", "64",
             "--output-len", "48", "--no-progress", "--output-dir", str(out)],
            env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        try:
            time.sleep(16)  # inside the second point
            # Straight from the server's /metrics, as for any vLLM-compatible server.
            direct = _ok(llamacluster("top", "--once", "--base-url", state["server"]["endpoint"]
                                      + "/v1", "--api-key-file", key_file, env=cli_env))  # fmt: skip
        finally:
            bench_out, _ = bench.communicate(timeout=300)
        assert bench.returncode == 0, bench_out[-3000:]
        # From the monitor's Prometheus (rates over the last minute still hold the load).
        frame_text = _ok(llamacluster("top", "--once", "--name", "local", env=cli_env))
        for text in (direct, frame_text):
            cells = _engine_cells(text)
            assert float(cells["out tok/s"]) > 0, text
            assert cells["TTFT p50"].endswith("ms"), text
        assert "192.0.2" in frame_text or "127.0.0.1" in frame_text  # a node row (Ray's ip)

        # The bench recorded the cluster's series over the run, beside its own files.
        series_csv = out / "bench-cluster-series.csv"
        for name in ("bench-cluster-timeline.png", "bench-cluster-vs-load.png"):
            assert (out / name).read_bytes()[:4] == b"\x89PNG"
        rows = list(csv.DictReader(series_csv.open()))
        in_phase = [r for r in rows if r["phase"]]
        assert {r["phase"] for r in in_phase} == {"c=2", "c=8"}
        assert any(r["series"] == "kv_cache_percent" and float(r["value"]) > 0 for r in in_phase)
        assert any(r["series"] == "requests_running" and float(r["value"]) > 0 for r in in_phase)
        assert any(r["series"] == "node_cpu_percent" for r in in_phase)

        # The dashboards, at the address `tunnel` prints, in a real browser.
        tunnel = _ok(llamacluster("tunnel", "--local", env=cli_env))
        url = re.search(r"dashboards (http://\S+/consoles/index\.html)", tunnel).group(1)
        for page, charts in (
            ("index", dashboards.SERVING_CHARTS),
            ("nodes", dashboards.NODE_CHARTS),
        ):
            page_url = url.replace("index.html", f"{page}.html") + "?range=300"
            shot = tmp_path / f"{page}.png"
            _chromium("--window-size=1400,1500", f"--screenshot={shot}", page_url, tmp=tmp_path)
            assert shot.stat().st_size > 20_000
            _keep(shot, f"dashboards-{page}.png")
            drawn = _charts(_chromium("--dump-dom", page_url, tmp=tmp_path))
            assert set(drawn) == set(charts)
            for chart in charts:
                points = _drawn_points(drawn[chart])
                if chart in MAY_BE_EMPTY and points == 0:
                    assert "No timeseries returned" in drawn[chart]
                    continue
                assert points >= 2, f"{page}: chart {chart} drew no data: {drawn[chart][:600]}"
        _screenshot_top(state["monitoring"]["url"], tmp_path)
    finally:
        if (home / "clusters" / "local" / "state.json").exists():
            _bring_down_and_check(home, "local", cli_env)


def _engine_cells(text: str) -> dict[str, str]:
    """The engine table of a `top --once` frame: heading → cell."""
    lines = [ln for ln in text.splitlines() if ln.startswith(("┃", "│"))]
    heads = [c.strip() for c in lines[0].strip("┃").split("┃")]
    cells = [c.strip() for c in lines[1].strip("│").split("│")]
    return dict(zip(heads, cells, strict=True))


def _screenshot_top(prom_url: str, tmp: Path) -> None:
    """One `top` frame as the terminal shows it (rich's SVG export, drawn by Chromium)."""
    from rich.console import Console

    from cluster import top

    console = Console(record=True, width=118, file=open(os.devnull, "w"))  # noqa: SIM115
    source = top.PrometheusSource(prom_url)
    try:
        console.print(top.render(source.frame()))
    finally:
        source.close()
    svg = tmp / "top.svg"
    svg.write_text(console.export_svg(title="llamacluster top"))
    shot = tmp / "top.png"
    _chromium("--window-size=1000,420", f"--screenshot={shot}", svg.as_uri(), tmp=tmp)
    _keep(shot, "top.png")
