"""Seeing the cluster work as a person does: `up` over SSH to two loopback nodes, a bench load,
then through the `ssh -N -L ...` that `llamacluster tunnel` prints: the dashboards and the Ray
dashboard (its token typed into its login dialog) in headless Chromium, `top --once` from the
forwarded API; `top --name` (its own forward to the head's Prometheus) live under tmux and once;
and the bench's cluster series."""

from __future__ import annotations

import base64
import contextlib
import csv
import fcntl
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from cluster import dashboards
from tests.cluster.test_up_e2e import VENV, _bring_down_and_check, _ok, _state, llamacluster

pytestmark = pytest.mark.e2e

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
TMUX = shutil.which("tmux")
CLI = [sys.executable, "-c", "from cluster.cli.app import run; run()"]
#: Set to a directory to keep the screenshots (docs/img is made this way).
SCREENSHOT_DIR = os.environ.get("LLAMACLUSTER_SCREENSHOTS")
#: The node charts that may be empty here: no GPU on a CPU-only machine.
MAY_BE_EMPTY = {"node_gpu"}
#: The Serve application `up` deploys (cluster/stages/serve.py).
APP_NAME = "llamacluster"


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


def _fd_above_9(fd: int) -> int:
    """A copy of ``fd`` numbered 10 or more (the original is closed)."""
    high = fcntl.fcntl(fd, fcntl.F_DUPFD, 10)
    os.close(fd)
    return high


class Browser:
    """Headless Chromium driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``:
    JSON messages ending in NUL on fds 3 and 4), one page: typing and pressing keys as a person
    does, reading the rendered text, running the page's own ``fetch``."""

    def __init__(self, profile: Path, *, size: str = "1400,1000") -> None:
        assert CHROMIUM
        to_chromium, self._to_w = os.pipe()
        self._from_r, from_chromium = os.pipe()
        # Chromium's ends above 9, so that moving them to 3 and 4 cannot overwrite each other.
        to_chromium, from_chromium = (_fd_above_9(fd) for fd in (to_chromium, from_chromium))
        # Chromium reads commands on fd 3 and writes replies and events on fd 4 (bash moves
        # them there: dash's redirections take one-digit descriptors only).
        script = f'exec "$0" "$@" 3<&{to_chromium} 4>&{from_chromium}'
        argv = [
            "bash", "-c", script, CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
            "--hide-scrollbars", f"--user-data-dir={profile}", f"--window-size={size}",
            "--remote-debugging-pipe", "about:blank",
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            argv,
            pass_fds=(to_chromium, from_chromium),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_chromium)
        os.close(from_chromium)
        self._buffer = b""
        self._last_id = 0
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)[
            "sessionId"
        ]

    def _message(self) -> dict:
        while b"\0" not in self._buffer:
            chunk = os.read(self._from_r, 1 << 16)
            assert chunk, f"chromium closed its pipe (exit {self.proc.poll()})"
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def call(self, method: str, *, on_page: bool = False, **params) -> dict:
        """One protocol command; its result (events read on the way are dropped)."""
        self._last_id += 1
        message: dict = {"id": self._last_id, "method": method, "params": params}
        if on_page:
            message["sessionId"] = self.session
        os.write(self._to_w, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._message()
            if reply.get("id") == self._last_id:
                assert "error" not in reply, f"{method}: {reply['error']}"
                return reply["result"]

    def open(self, url: str) -> None:
        self.call("Page.navigate", on_page=True, url=url)

    def evaluate(self, expression: str):
        """The value of a JavaScript expression in the page (promises awaited)."""
        result = self.call(
            "Runtime.evaluate",
            on_page=True,
            expression=expression,
            returnByValue=True,
            awaitPromise=True,
        )
        assert "exceptionDetails" not in result, str(result["exceptionDetails"])[:800]
        return result["result"].get("value")

    def text(self) -> str:
        """The page's rendered text ("" while it is between documents, e.g. reloading)."""
        try:
            return self.evaluate("document.body ? document.body.innerText : ''") or ""
        except AssertionError:
            return ""

    def wait_for_text(self, ok: Callable[[str], bool], *, what: str, timeout_s: float = 90) -> str:
        deadline = time.monotonic() + timeout_s
        while not ok(text := self.text()):
            assert time.monotonic() < deadline, f"page never showed {what}:\n{text[:3000]}"
            time.sleep(0.5)
        return text

    def type_and_enter(self, selector: str, text: str) -> None:
        """Focus a field, type into it and press Enter, through Chromium's input events."""
        self.evaluate(f"document.querySelector({json.dumps(selector)}).focus()")
        self.call("Input.insertText", on_page=True, text=text)
        for kind in ("keyDown", "keyUp"):
            self.call(
                "Input.dispatchKeyEvent",
                on_page=True,
                type=kind,
                key="Enter",
                code="Enter",
                windowsVirtualKeyCode=13,
            )

    def screenshot(self, path: Path) -> None:
        data = self.call("Page.captureScreenshot", on_page=True, format="png")["data"]
        path.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.call("Browser.close")
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._to_w)
        os.close(self._from_r)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Tunnel:
    """The ``ssh -N -L ...`` that `llamacluster tunnel` prints, run as printed but for each
    forward's local port: a free one instead (8265 and 9090 may be taken on a shared machine),
    plus BatchMode and ExitOnForwardFailure so a failure shows here instead of waiting."""

    def __init__(self, printed: str) -> None:
        argv = shlex.split(printed)
        assert argv[0] == "ssh" and "-N" in argv, printed
        self.ports: dict[int, int] = {}  # printed local port → the one used here
        run: list[str] = []
        args = iter(argv)
        for arg in args:
            run.append(arg)
            if arg == "-L":
                local, target = next(args).split(":", 1)
                self.ports[int(local)] = _free_port()
                run.append(f"127.0.0.1:{self.ports[int(local)]}:{target}")
        run[1:1] = ["-o", "BatchMode=yes", "-o", "ExitOnForwardFailure=yes"]
        self.proc = subprocess.Popen(
            run, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + 30
        for port in self.ports.values():
            while True:
                assert self.proc.poll() is None, self.proc.stderr.read().decode()[-1000:]
                with socket.socket() as s:
                    if s.connect_ex(("127.0.0.1", port)) == 0:
                        break
                assert time.monotonic() < deadline, f"the tunnel's port {port} never opened"
                time.sleep(0.2)

    def url(self, printed: str) -> str:
        """A URL as `tunnel` printed it, on the local port used here."""
        host, port = re.match(r"\w+://127\.0\.0\.1:(\d+)", printed).group(0).rsplit(":", 1)
        return printed.replace(f"{host}:{port}", f"{host}:{self.ports[int(port)]}", 1)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class TmuxTop:
    """`llamacluster top` live in a detached tmux session, on a tmux server of its own. When the
    command ends, the pane says so and stays (with what the command printed last)."""

    ENDED = "[top exited"

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        assert TMUX
        self.tmux = [TMUX, "-u", "-f", "/dev/null", "-L", f"llamacluster-top-{os.getpid()}"]
        # The pane's command gets the test's environment (tmux's server keeps its own), less
        # COLUMNS and LINES (set there when the server starts without a terminal): `top` must
        # size itself from the pane, as in a person's terminal.
        passed = {k: env[k] for k in ("LLAMACLUSTER_HOME", "PATH") if k in env}
        command = shlex.join(
            ["env", "-u", "COLUMNS", "-u", "LINES", *(f"{k}={v}" for k, v in passed.items()),
             *CLI, *args]
        )  # fmt: skip
        command += f'; echo "{self.ENDED} $?]"; sleep 600'
        subprocess.run(
            [*self.tmux, "new-session", "-d", "-s", "top", "-x", "200", "-y", "50",
             "-c", os.getcwd(), command],
            check=True, timeout=30,
        )  # fmt: skip
        self.socket = Path(self._tmux("display-message", "-p", "#{socket_path}").stdout.strip())

    def _tmux(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*self.tmux, *args], capture_output=True, text=True, timeout=30)

    def pane(self) -> str:
        return self._tmux("capture-pane", "-p", "-t", "top").stdout

    def ended(self) -> bool:
        gone = self._tmux("has-session", "-t", "top").returncode != 0
        return gone or self.ENDED in self.pane()

    def close(self) -> None:
        """Ctrl-C as a person would (top closes its SSH forward), then this tmux server goes."""
        self._tmux("send-keys", "-t", "top", "C-c")
        deadline = time.monotonic() + 15
        while not self.ended() and time.monotonic() < deadline:
            time.sleep(0.3)
        self._tmux("kill-server")
        if self.socket.name:
            self.socket.unlink(missing_ok=True)  # kill-server leaves the socket file


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


def _engine_cells(text: str) -> dict[str, str]:
    """The engine table of a `top` frame: heading → cell."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip().startswith(("┃", "│"))]
    heads = [c.strip() for c in lines[0].strip("┃").split("┃")]
    cells = [c.strip() for c in lines[1].strip("│").split("│")]
    return dict(zip(heads, cells, strict=True))


def _out_tokens_s(text: str) -> float:
    try:
        return float(_engine_cells(text)["out tok/s"])
    except (IndexError, KeyError, ValueError):
        return 0.0  # no frame yet, or "-"


@pytest.fixture
def cli_env(tmp_path) -> dict[str, str]:
    env = dict(os.environ)
    env["LLAMACLUSTER_HOME"] = str(tmp_path / "home")
    env["VLLM_CPU_KVCACHE_SPACE"] = "1"
    env["COLUMNS"] = "200"
    return env


@pytest.mark.timeout(1500)
def test_a_loaded_cluster_seen_through_its_tunnel(tmp_path, cli_env, sshd, demo_model_dir):
    missing = [n for n in ("chromium", "prometheus", "tmux") if shutil.which(n) is None]
    if missing:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{', '.join(missing)} needed: run ./bootstrap.sh --test")
        pytest.skip(f"needs {', '.join(missing)} (./bootstrap.sh --test installs them)")
    home = Path(cli_env["LLAMACLUSTER_HOME"])
    name = "e2e-watch"
    inventory = tmp_path / "ips.txt"
    inventory.write_text(
        f"{sshd.user}@127.0.0.2:{sshd.port}   # head\n{sshd.user}@127.0.0.3:{sshd.port}\n"
    )
    root = tmp_path / "sysroot"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "fstab").write_text(f"nfs.example:/export {tmp_path / 'shared'} nfs4 rw 0 0\n")
    up_args = [
        "--ips", str(inventory), "--name", name, "--ssh-key", str(sshd.client_key),
        "--known-hosts", str(tmp_path / "known_hosts"), "--model", str(demo_model_dir),
        "--shared-dir", str(tmp_path / "shared"), "--env", str(VENV), "--system-root", str(root),
        "--tp", "1", "--pp", "1", "--cpu-slots", "1", "--cpu-kvcache-gb", "1",
        "--ray-port", "0", "--dashboard-port", "0", "--api-port", "0", "--monitor-port", "0",
    ]  # fmt: skip
    tunnel: Tunnel | None = None
    live_top: TmuxTop | None = None
    try:
        _ok(llamacluster("up", *up_args, env=cli_env, timeout=1200))
        state = _state(home, name)
        key_file = state["secrets"]["api_key_file"]
        # The tunnel a person opens: the command and the URLs `tunnel` prints.
        printed = _ok(llamacluster("tunnel", "--name", name, env=cli_env)).splitlines()
        tunnel = Tunnel(printed[0])
        then = printed[1]
        api_url = tunnel.url(re.search(r"API (\S+/v1)", then).group(1))
        ray_url = tunnel.url(re.search(r"dashboard (http://\S+?),", then).group(1))
        prom_url = tunnel.url(re.search(r"monitor (http://\S+)", then).group(1))
        pages_url = tunnel.url(re.search(r"dashboards (http://\S+/consoles/index\.html)", then)[1])
        token_file = re.search(r"dashboard token: (\S+)", "\n".join(printed)).group(1)

        # A load of two points long enough for several scrapes each (the server's: every 5 s).
        out = tmp_path / "bench"
        bench = subprocess.Popen(
            [*CLI, "bench", "--name", name, "--concurrency", "2,8", "--duration", "12s",
             "--input-len", "64", "--output-len", "48", "--no-progress", "--output-dir", str(out)],
            env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        try:
            # `top --name` live in a terminal: the head is remote, so it forwards its own port.
            live_top = TmuxTop(["top", "--name", name], cli_env)
            # Straight from the server's /metrics at the tunnel's API port (any vLLM server),
            # read until the load shows (the bench takes a few seconds to start).
            deadline = time.monotonic() + 90
            while True:
                direct = _ok(llamacluster("top", "--once", "--base-url", api_url,
                                          "--api-key-file", key_file, "--timeout", "60",
                                          env=cli_env))  # fmt: skip
                if _out_tokens_s(direct) > 0 and _engine_cells(direct)["TTFT p50"].endswith("ms"):
                    break
                assert bench.poll() is None, f"the load ended unseen on /metrics:\n{direct}"
                assert time.monotonic() < deadline, f"no load on /metrics:\n{direct}"
                time.sleep(1)
            deadline = time.monotonic() + 30
            while _out_tokens_s(pane := live_top.pane()) <= 0:
                assert not live_top.ended(), f"top under tmux exited:\n{pane}"
                assert time.monotonic() < deadline, f"top under tmux showed no tokens/s:\n{pane}"
                time.sleep(1)
        finally:
            bench_out, _ = bench.communicate(timeout=300)
            if live_top is not None:
                live_top.close()
        assert bench.returncode == 0, bench_out[-3000:]
        assert "llamacluster top · prometheus on" in pane, pane  # read through its forward
        # From the monitor's Prometheus (rates over the last minute still hold the load).
        frame_text = _ok(llamacluster("top", "--once", "--name", name, env=cli_env))
        for text in (direct, frame_text):
            cells = _engine_cells(text)
            assert float(cells["out tok/s"]) > 0, text
            assert cells["TTFT p50"].endswith("ms"), text
        assert "127.0.0.2" in frame_text and "127.0.0.3" in frame_text, frame_text  # both nodes

        # The bench recorded the cluster's series over the run, beside its own files.
        series_csv = out / "bench-cluster-series.csv"
        for png in ("bench-cluster-timeline.png", "bench-cluster-vs-load.png"):
            assert (out / png).read_bytes()[:4] == b"\x89PNG"
        rows = list(csv.DictReader(series_csv.open()))
        in_phase = [r for r in rows if r["phase"]]
        assert {r["phase"] for r in in_phase} == {"c=2", "c=8"}
        assert any(r["series"] == "kv_cache_percent" and float(r["value"]) > 0 for r in in_phase)
        assert any(r["series"] == "requests_running" and float(r["value"]) > 0 for r in in_phase)
        assert any(r["series"] == "node_cpu_percent" for r in in_phase)

        # The dashboards, through the tunnel, in a real browser.
        for page, charts in (
            ("index", dashboards.SERVING_CHARTS),
            ("nodes", dashboards.NODE_CHARTS),
        ):
            page_url = pages_url.replace("index.html", f"{page}.html") + "?range=300"
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
        _screenshot_top(prom_url, tmp_path)
        _check_ray_dashboard(
            ray_url,
            Path(token_file).read_text().strip(),
            ips=[n["private_ip"] for n in state["nodes"]],
            tmp=tmp_path,
        )
    finally:
        if tunnel is not None:
            tunnel.close()
        if (home / "clusters" / name / "state.json").exists():
            _bring_down_and_check(home, name, cli_env)
            # The nodes' directories (the monitor's data among them) are under the real home.
            llamacluster("down", "--name", name, "--purge", env=cli_env, timeout=300)


def _check_ray_dashboard(url: str, token: str, *, ips: list[str], tmp: Path) -> None:
    """The Ray dashboard as a person meets it: the token dialog, the token typed in, then the
    Serve application and every node listed (in the page and in the JSON it fetches)."""
    browser = Browser(tmp / "ray-dashboard-profile")
    try:
        browser.open(f"{url}/#/serve")
        browser.wait_for_text(lambda t: "Authentication Token Required" in t, what="the dialog")
        denied = browser.evaluate("fetch('api/serve/applications/').then(r => r.status)")
        assert denied == 401, denied  # no cookie yet
        browser.type_and_enter('input[placeholder="Enter your authentication token"]', token)
        # The dialog sets the dashboard's cookie and reloads; the Serve page lists the app.
        browser.wait_for_text(
            lambda t: APP_NAME in t and "RUNNING" in t and "Authentication Token" not in t,
            what=f"the Serve application {APP_NAME!r} running",
        )
        shot = tmp / "ray-dashboard-serve.png"
        browser.screenshot(shot)
        _keep(shot, "ray-dashboard-serve.png")
        apps = browser.evaluate("fetch('api/serve/applications/').then(r => r.json())")
        assert apps["applications"][APP_NAME]["status"] == "RUNNING", apps["applications"]
        browser.open(f"{url}/#/cluster")
        browser.wait_for_text(lambda t: all(ip in t for ip in ips), what=f"the nodes {ips}")
        summary = browser.evaluate(
            "fetch('nodes?view=summary').then(r => r.json())"
            ".then(b => b.data.summary.map(n => [n.raylet.nodeManagerAddress, n.raylet.state]))"
        )
        assert sorted(summary) == sorted([ip, "ALIVE"] for ip in ips), summary
    finally:
        browser.close()


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
