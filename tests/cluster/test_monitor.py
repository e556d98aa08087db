"""The monitor stage: Prometheus's config text and command line, the dry-run plan, and a real
`prometheus` started, checked, restarted and stopped by the stage on loopback, scraping a
bearer-token /metrics and a Ray-style discovery file."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from cluster import dashboards, monitor, promctl
from cluster.inventory import local_cluster
from cluster.lifecycle import UpConfig, up
from cluster.runner import LocalRunner
from cluster.stages.base import Reporter, Teardown, UpContext
from cluster.stages.monitor import Monitor
from cluster.state import (
    Access,
    ClusterState,
    NodeState,
    Ports,
    RayNode,
    RaySection,
    Secrets,
    ServerSection,
    cluster_key,
)
from tests.support.metrics_server import metrics_server
from tests.support.status_server import status_server

KEY = "sk-lc-" + "ab12" * 16


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMACLUSTER_HOME", str(tmp_path / "home"))


def _spec(**kw) -> monitor.MonitorSpec:
    values = {
        "cluster": "c1",
        "dir": "/home/u/.llamacluster/nodes/c1-abc/monitor",
        "port": 9191,
        "retention_time": "7d",
        "retention_size": "512MB",
        "ray_discovery_file": "/tmp/lc-abc/prom_metrics_service_discovery.json",
        "server_target": "127.0.0.1:8000",
        "binary": "/usr/bin/prometheus",
    }
    return monitor.MonitorSpec(**{**values, **kw})


def test_config_scrapes_itself_ray_and_the_server_with_a_token_file():
    spec = _spec()
    text = monitor.config_text(spec)
    config = yaml.safe_load(text)
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    assert list(jobs) == ["prometheus", "ray", "server"] == spec.jobs()
    assert jobs["prometheus"]["static_configs"] == [{"targets": ["127.0.0.1:9191"]}]
    assert jobs["ray"]["file_sd_configs"][0]["files"] == [spec.ray_discovery_file]
    server = jobs["server"]
    assert server["metrics_path"] == "/metrics"
    assert server["static_configs"] == [{"targets": ["127.0.0.1:8000"]}]
    assert server["authorization"] == {"type": "Bearer", "credentials_file": spec.token_path}
    assert "credentials:" not in text and "sk-lc-" not in text  # the key itself never
    assert config["global"]["external_labels"] == {"cluster": "c1"}
    # No server deployed, no Ray: those jobs are left out.
    bare = yaml.safe_load(monitor.config_text(_spec(server_target=None, ray_discovery_file=None)))
    assert [j["job_name"] for j in bare["scrape_configs"]] == ["prometheus"]


def test_command_line_binds_loopback_with_bounded_retention_and_digest_follows_it():
    spec = _spec()
    argv = monitor.argv(spec)
    assert argv[0] == "/usr/bin/prometheus"
    assert "--web.listen-address=127.0.0.1:9191" in argv
    assert "--storage.tsdb.retention.time=7d" in argv
    assert "--storage.tsdb.retention.size=512MB" in argv
    assert f"--config.file={spec.dir}/prometheus.yml" in argv
    assert f"--storage.tsdb.path={spec.dir}/data" in argv
    assert monitor.digest(spec) == monitor.digest(_spec())
    assert monitor.digest(spec) != monitor.digest(_spec(retention_size="2GB"))
    assert monitor.digest(spec) != monitor.digest(_spec(server_target="127.0.0.1:8001"))


def test_targets_are_summed_per_job_and_the_ones_not_up_say_why():
    targets = [
        {"job": "prometheus", "instance": "127.0.0.1:9090", "health": "up", "error": ""},
        {"job": "ray", "instance": "10.0.0.1:41000", "health": "up", "error": ""},
        {"job": "ray", "instance": "10.0.0.2:41000", "health": "down", "error": "refused"},
        {"job": "ray", "instance": "10.0.0.1:44217", "health": "unknown", "error": ""},
    ]
    per_job, down = monitor.summarize_targets(targets)
    assert monitor.describe_targets(per_job) == "prometheus 1/1, ray 1/3"
    assert down == ["ray 10.0.0.2:41000 (refused)", "ray 10.0.0.1:44217 (not scraped yet)"]


def test_a_job_awaiting_its_first_scrape_is_pending_not_failed():
    targets = [
        {"job": "prometheus", "instance": "127.0.0.1:9090", "health": "unknown"},
        {"job": "ray", "instance": "10.0.0.1:41000", "health": "unknown"},
        {"job": "ray", "instance": "10.0.0.2:41000", "health": "down"},
        {"job": "server", "instance": "10.0.0.1:8000", "health": "up"},
    ]
    empty, pending = monitor.jobs_without_targets(targets, ["prometheus", "ray", "server", "extra"])
    # ray has a scraped target that is down and none up; extra has no target at all.
    assert empty == ["extra", "ray"]
    assert pending == ["prometheus"]
    assert monitor.jobs_without_targets(targets[3:], ["server"]) == ([], [])


def test_promtool_accepts_the_config(tmp_path):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("no promtool (Debian's prometheus package has it)")
    spec = _spec(
        dir=str(tmp_path),
        ray_discovery_file=str(tmp_path / "sd.json"),
    )
    Path(spec.token_path).write_text(KEY + "\n")
    Path(spec.config_path).write_text(monitor.config_text(spec))
    done = subprocess.run(
        [promtool, "check", "config", spec.config_path], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_retention_flags_are_checked_and_name_the_flag():
    from cluster.errors import validation_error

    assert UpConfig(local=True, monitor_retention_time="12h30m").monitor_retention_time
    with pytest.raises(Exception) as caught:
        UpConfig(local=True, monitor_retention_time="15 days", monitor_retention_size="1G")
    line = validation_error(caught.value, UpConfig).one_line()
    assert "--monitor-retention-time" in line and "--monitor-retention-size" in line


def test_dry_run_plans_prometheus_on_the_head_and_points_the_dashboard_at_it(tmp_path, capsys):
    inv = tmp_path / "ips.txt"
    inv.write_text("root@203.0.113.10 10.0.0.10\nroot@203.0.113.11 10.0.0.11\n")
    up(
        UpConfig(
            inventory=inv,
            model="org/model",
            shared_dir="/srv/llama",
            monitor_port=9393,
            monitor_retention_time="3d",
            monitor_retention_size="2GB",
            dry_run=True,
        )
    )
    out = capsys.readouterr().out
    section = out[out.index("▸ monitor") :]
    lines = [ln.strip() for ln in section.splitlines()[1:]]
    assert lines and all(ln.startswith("203.0.113.10$") for ln in lines)  # the head only
    assert "apt-get install -y -q --no-install-recommends prometheus" in section
    assert "policy-rc.d" in section and "systemctl disable prometheus.service" in section
    assert "--web.listen-address=127.0.0.1:9393" in section
    assert "--storage.tsdb.retention.time=3d" in section
    assert "--storage.tsdb.retention.size=2GB" in section
    assert "credentials_file" in section and "/monitor/api_token" in section
    assert "python3 - probe --url http://127.0.0.1:9393" in section
    # The head's Ray dashboard learns where Prometheus is; the workers' Ray does not need it.
    ray = out[out.index("▸ ray") : out.index("▸ serve")]
    head_start = [ln for ln in ray.splitlines() if "cluster.ray_start start --head" in ln]
    worker_start = [ln for ln in ray.splitlines() if "cluster.ray_start start --address" in ln]
    assert any("RAY_PROMETHEUS_HOST=http://127.0.0.1:9393" in ln for ln in head_start)
    assert worker_start and not any("RAY_PROMETHEUS_HOST" in ln for ln in worker_start)


def test_dry_run_skip_monitor_and_test_root(tmp_path, bare_model_dir, capsys):
    up(UpConfig(local=True, dry_run=True, model=str(bare_model_dir), skip=["monitor"]))
    out = capsys.readouterr().out
    assert "skipped: --skip monitor" in out and "RAY_PROMETHEUS_HOST" not in out
    up(UpConfig(local=True, dry_run=True, model=str(bare_model_dir), system_root=tmp_path / "root"))
    out = capsys.readouterr().out
    assert "apt-get" not in out[out.index("▸ monitor") :]  # test root: no package installed
    up(UpConfig(local=True, dry_run=True, model=str(bare_model_dir), skip=["ray"]))
    assert "skipped: Ray is not running (--skip ray)" in capsys.readouterr().out


def test_without_prometheus_and_a_way_to_install_it_the_stage_is_skipped_saying_what_to_do(
    tmp_path, monkeypatch
):
    bin_dir = tmp_path / "bin"  # a PATH with a shell and coreutils, no prometheus, no apt-get
    bin_dir.mkdir()
    for tool in ("bash", "cat", "head", "timeout"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    monkeypatch.setenv("PATH", str(bin_dir))
    for test_root, why in ((False, "no apt-get to install it"), (True, "test root")):
        root = tmp_path / "root" if test_root else Path("/")
        ctx = _bare_context(UpConfig(local=True, system_root=root))
        ctx.state.nodes = [NodeState(name="head", label="127.0.0.1", host="127.0.0.1", home="/h")]
        ctx.state.ports = Ports(ray_gcs=6379, dashboard=8265, api=8000, monitor=9090)
        outcome = Monitor().run(ctx)
        assert outcome.status == "skipped" and "no prometheus on 127.0.0.1" in outcome.message
        said = ctx.reporter.console.file.getvalue()
        assert why in said and "prometheus.io" in said and "--skip monitor" in said
        assert ctx.state.monitoring.pid is None


def test_promctl_refuses_a_prometheus_that_is_not_ours():
    # Another Prometheus on the port (the system's, say): ready, but with another config file.
    flags = {"status": "success", "data": {"config.file": "/etc/prometheus/prometheus.yml"}}
    routes = {"/-/ready": (200, "ok"), "/api/v1/status/flags": (200, flags)}
    with status_server(routes) as (url, _):
        args = monitor.probe_args(url, "/home/u/monitor/prometheus.yml")
        ok, seen = promctl.probe(_parsed(args))
    assert not ok and seen["ready"] and not seen["ours"]
    assert "not this cluster's" in seen["error"]
    # Nothing listening at all: not ready, said so.
    ok, seen = promctl.probe(_parsed(monitor.probe_args("http://127.0.0.1:9", "/x.yml")))
    assert not ok and not seen["ready"] and "/-/ready answered nothing" in seen["error"]


def _parsed(args: list[str]):
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("command")
    parser.add_argument("--url")
    parser.add_argument("--config")
    parser.add_argument("--pid", type=int, default=0)
    parser.add_argument("--log")
    parser.add_argument("--need-job", action="append", default=[])
    parser.add_argument("--wait-s", type=float, default=0.0)
    return parser.parse_args(args)


def test_tunnel_forwards_the_monitor_once_it_runs(tmp_path):
    from cluster.lifecycle import tunnel
    from cluster.state import MonitoringSection, cluster_dir, ensure_secret

    token, _ = ensure_secret(cluster_dir("gpus") / "ray_token")
    key, _ = ensure_secret(cluster_dir("gpus") / "api_key", prefix="sk-lc-")
    state = ClusterState(
        name="gpus",
        access=Access(inventory_text="ubuntu@203.0.113.10 10.0.0.10\n"),
        ports=Ports(ray_gcs=6379, dashboard=8265, api=8000, monitor=9191),
        secrets=Secrets(ray_token=str(token), api_key_file=str(key)),
    )
    state.save()
    assert "9090" not in "\n".join(tunnel("gpus"))  # the stage never ran: nothing to forward
    state.monitoring = MonitoringSection(url="http://127.0.0.1:9191", pid=1234, dir="/x")
    state.save()
    lines = tunnel("gpus")
    assert "-L 9090:127.0.0.1:9191" in lines[0]
    assert "monitor http://127.0.0.1:9090" in lines[1]


def test_preflight_adds_the_monitor_port_to_recorded_ports():
    from cluster.stages.preflight import Preflight

    ctx = _bare_context(UpConfig(local=True, monitor_port=0))
    ctx.state.ports = Ports(ray_gcs=6379, dashboard=8265, api=8000)
    assert Preflight._choose_ports(ctx) is True
    assert ctx.state.ports.monitor and ctx.state.ports.api == 8000
    assert Preflight._choose_ports(ctx) is False  # recorded now: kept
    skipped = _bare_context(UpConfig(local=True, skip=["monitor"]))
    skipped.state.ports = Ports(ray_gcs=6379, dashboard=8265, api=8000)
    assert Preflight._choose_ports(skipped) is False and skipped.state.ports.monitor is None


def _bare_context(config: UpConfig) -> UpContext:
    cluster = local_cluster()
    return UpContext(
        config=config,
        cluster=cluster,
        state=ClusterState(name="t", access=Access(local=True)),
        runners=[LocalRunner(n) for n in cluster],
        reporter=Reporter(io_console()),
    )


def io_console():
    from rich.console import Console

    return Console(file=io.StringIO(), width=200)


# -- a real prometheus ---------------------------------------------------------------------------


def _require_prometheus() -> str:
    found = shutil.which("prometheus")
    if found:
        return found
    reason = (
        "no `prometheus` on PATH: install it with `apt-get install -y --no-install-recommends "
        "prometheus` (./bootstrap.sh --test does)"
    )
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(reason + " (CI must run the monitor tests)")
    pytest.skip(reason)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _query(port: int, expr: str) -> list[dict]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.loads(resp.read())["data"]["result"]


def _value_soon(port: int, expr: str, timeout: float = 15) -> float:
    deadline = time.monotonic() + timeout
    while True:
        found = _query(port, expr)
        if found:
            return float(found[0]["value"][1])
        if time.monotonic() > deadline:
            raise AssertionError(f"no sample of {expr} after {timeout} s")
        time.sleep(0.5)


def _flags(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/status/flags", timeout=5) as r:
        return json.loads(r.read())["data"]


def _page(port: int, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
        return r.read().decode()


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _session_members(sid: int) -> list[int]:
    out = subprocess.run(["ps", "-eo", "pid=,sid=,stat="], capture_output=True, text=True).stdout
    return [
        int(p)
        for p, s, st in (ln.split() for ln in out.splitlines())
        if int(s) == sid and st[0] != "Z"
    ]


@pytest.mark.timeout(180)
def test_the_stage_runs_checks_restarts_and_stops_a_real_prometheus(tmp_path, monkeypatch):
    _require_prometheus()
    # Scrape every second so the test waits seconds, not tens of seconds.
    for name in ("SCRAPE_INTERVAL", "SERVER_SCRAPE_INTERVAL", "SCRAPE_TIMEOUT"):
        monkeypatch.setattr(monitor, name, "1s")
    key_file = tmp_path / "api_key"
    key_file.write_text(f"# the cluster's keys\n{KEY}\nsk-lc-second-key-0000000000\n")
    key_file.chmod(0o600)
    ray_temp = tmp_path / "ray"
    ray_temp.mkdir()
    started: list[int] = []
    server_text = "# TYPE lc_test_tokens_total counter\nlc_test_tokens_total 42\n"
    ray_text = (
        '# TYPE ray_node_cpu_utilization gauge\nray_node_cpu_utilization{ip="127.0.0.9"} 12.5\n'
    )
    with metrics_server(server_text, token=KEY) as api, metrics_server(ray_text) as ray_node:
        # Ray's dashboard writes the nodes' metrics addresses like this.
        (ray_temp / monitor.RAY_DISCOVERY_FILE).write_text(
            json.dumps([{"labels": {"job": "ray"}, "targets": [ray_node.target]}])
        )
        port = _free_port()
        cluster = local_cluster()
        head = NodeState(
            name="head",
            label=cluster.head.label,
            host="127.0.0.1",
            home=str(tmp_path / "head-home"),
            python=shutil.which("python3"),
            sudo="",
            boot_id=Path("/proc/sys/kernel/random/boot_id").read_text().strip(),
        )
        state = ClusterState(
            name="mon",
            access=Access(local=True),
            nodes=[head],
            ports=Ports(ray_gcs=6379, dashboard=8265, api=api.port, monitor=port),
            secrets=Secrets(api_key_file=str(key_file)),
            server=ServerSection(config_digest="deployed"),
            ray=RaySection(nodes={"head": RayNode(temp_dir=str(ray_temp))}),
        )
        reporter = Reporter(io_console())
        log = reporter.open_log(tmp_path / "up.log")  # every command, nothing masked
        config = UpConfig(local=True, monitor_retention_time="1h", monitor_retention_size="64MB")
        ctx = UpContext(
            config=config,
            cluster=cluster,
            state=state,
            runners=[LocalRunner(n) for n in cluster],
            reporter=reporter,
        )
        stage = Monitor()
        try:
            t0 = time.monotonic()
            first = stage.run(ctx)
            started.append(int(state.monitoring.pid))
            assert first.status == "done" and first.message.startswith("started"), first
            pid = started[0]
            assert os.getsid(pid) == pid  # its own session, recorded
            assert state.monitoring.boot_id == head.boot_id
            mdir = Path(str(state.monitoring.dir))
            nodes = tmp_path / "head-home" / ".llamacluster" / "nodes"
            assert mdir == nodes / f"mon-{cluster_key('mon')}" / "monitor"
            assert oct(mdir.stat().st_mode & 0o777) == "0o700"
            token = mdir / monitor.TOKEN_FILE
            assert token.read_text() == KEY + "\n"  # the first key, alone
            assert oct(token.stat().st_mode & 0o777) == "0o600"
            assert KEY not in (mdir / monitor.CONFIG_FILE).read_text()
            flags = _flags(port)
            assert flags["web.listen-address"] == f"127.0.0.1:{port}"
            assert flags["storage.tsdb.retention.time"] == "1h"
            assert flags["storage.tsdb.retention.size"] == "64MiB"  # Prometheus: 1MB = 2**20 B
            # Scraped through the token file: the server's series and Ray's both arrive.
            assert _value_soon(port, 'up{job="server"}') == 1
            assert _value_soon(port, 'lc_test_tokens_total{job="server"}') == 42
            assert _value_soon(port, 'ray_node_cpu_utilization{job="ray"}') == 12.5
            assert (f"Bearer {KEY}", 200) in api.seen
            assert all(status == 200 for _, status in api.seen)
            print(f"started and scraping in {time.monotonic() - t0:.1f} s")

            # The dashboards are installed and rendered by this Prometheus (its console pages):
            # the node table is filled server-side from the scraped Ray series.
            assert (mdir / "consoles" / "index.html").read_text() == dashboards.text("index.html")
            nodes_page = _page(port, "/consoles/nodes.html")
            assert 'class="lc-node"' in nodes_page and "<td>127.0.0.9</td>" in nodes_page
            assert 'lcGraph("requests"' in _page(port, "/consoles/index.html")
            assert _page(port, "/classic/static/js/prom_console.js")  # the chart code it serves

            # A second run changes nothing: same process.
            again = stage.run(ctx)
            assert again.status == "unchanged", again
            # A changed page is rewritten without restarting Prometheus (read per request).
            (mdir / "consoles" / "index.html").write_text("old page")
            redone = stage.run(ctx)
            assert redone.status == "done" and "dashboards rewritten" in redone.message, redone
            assert state.monitoring.pid == pid
            assert state.monitoring.pid == pid

            check = stage.check(ctx)
            assert check.ok is True, check.message
            assert "prometheus 1/1" in check.message and "ray 1/1" in check.message
            assert "server 1/1" in check.message

            # A changed retention restarts it (the old process gone, the data kept).
            ctx.config = config.model_copy(update={"monitor_retention_time": "2h"})
            changed = stage.run(ctx)
            started.append(int(state.monitoring.pid))
            assert changed.status == "done" and changed.message.startswith("restarted"), changed
            assert state.monitoring.pid != pid and not _alive(pid)
            assert _flags(port)["storage.tsdb.retention.time"] == "2h"
            assert _value_soon(port, 'lc_test_tokens_total{job="server"}') == 42

            # The key never travelled on a command line.
            reporter.close_log()
            assert KEY not in log.read_text()

            done = stage.teardown(ctx, Teardown(purge=True))
            assert done and "prometheus stopped" in done and "removed" in done
            assert _session_members(started[-1]) == []
            assert not mdir.exists()
            assert state.monitoring.pid is None and state.monitoring.dir is None
            assert stage.check(ctx).ok is None  # nothing of it left to check
        finally:
            for p in started:  # whatever the stage left of what this test started
                if _alive(p):
                    os.kill(p, signal.SIGKILL)


def test_an_https_server_is_scraped_trusting_exactly_its_certificate(tmp_path):
    import shutil
    import subprocess

    from cluster.tls import self_signed

    cert, key = tmp_path / "api.crt", tmp_path / "api.key"
    self_signed(["127.0.0.1"], cert_path=cert, key_path=key)
    spec = _spec(
        dir=str(tmp_path / "mon"),
        server_ca_file=str(cert),
        ray_discovery_file=str(tmp_path / "ray" / "sd.json"),
    )
    server = {
        j["job_name"]: j for j in yaml.safe_load(monitor.config_text(spec))["scrape_configs"]
    }["server"]
    assert server["scheme"] == "https" and server["tls_config"] == {"ca_file": str(cert)}
    plain = yaml.safe_load(monitor.config_text(_spec()))["scrape_configs"][-1]
    assert "scheme" not in plain and "tls_config" not in plain
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool (the prometheus package) is not installed")
    Path(spec.dir).mkdir()
    Path(spec.token_path).write_text("sk-test\n")
    Path(spec.config_path).write_text(monitor.config_text(spec))
    Path(spec.ray_discovery_file).parent.mkdir(parents=True, exist_ok=True)
    Path(spec.ray_discovery_file).write_text("[]")
    done = subprocess.run(
        [promtool, "check", "config", spec.config_path], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr
