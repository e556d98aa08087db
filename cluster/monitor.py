"""The cluster's Prometheus on the head: its config text, its command line, and the shell text
that installs, starts, finds and stops exactly it (pure: tested without a node).

One Prometheus per cluster, run by the SSH user (never the distribution's `prometheus`
service), from its own directory on the head (``<cluster dir on the head>/monitor``: config,
bearer-token file, data, log), bound to 127.0.0.1, in a session of its own whose id is its pid.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Iterable
from dataclasses import dataclass

from cluster import dashboards, promctl
from cluster.ray_nodes import session_alive_command, stop_session_command
from cluster.state import config_hash

#: Debian/Ubuntu package with the binary (2.42 on Debian 12).
PACKAGE = "prometheus"
CONFIG_FILE = "prometheus.yml"
#: The API key the server job sends, one line, 0600 (Prometheus reads it on every scrape).
TOKEN_FILE = "api_token"
DATA_DIR = "data"
PID_FILE = "prometheus.pid"
LOG_FILE = "prometheus.log"
#: The dashboards (cluster/dashboards): Prometheus console pages and their library, rendered by
#: Prometheus at ``/consoles/<page>`` and read from disk on every request (no restart to update).
CONSOLES_DIR = "consoles"
LIBRARIES_DIR = "console_libraries"
DASHBOARD_PAGE = "consoles/index.html"
#: Ray's dashboard writes its nodes' metrics addresses here, under the Ray temp dir (a link to
#: the file in the current session's directory), every 5 s (ray/_private/metrics_agent.py).
RAY_DISCOVERY_FILE = "prom_metrics_service_discovery.json"
SCRAPE_INTERVAL = "10s"
SCRAPE_TIMEOUT = "5s"
#: The server's engine counters change fast (tokens/s, queue depth): scraped more often.
SERVER_SCRAPE_INTERVAL = "5s"
#: Nodes joining later appear within this (Prometheus also watches the file for changes).
DISCOVERY_REFRESH = "15s"
#: The port `llamacluster tunnel` forwards the monitor to on the person's machine.
TUNNEL_PORT = 9090
#: Grace between TERM and KILL when stopping: Prometheus flushes its head block on TERM.
STOP_GRACE_S = 30
#: Prometheus's own job, the Ray nodes' job and the server's job.
JOBS = ("prometheus", "ray", "server")


@dataclass(frozen=True)
class MonitorSpec:
    """One cluster's Prometheus on the head."""

    cluster: str
    dir: str
    port: int
    retention_time: str = "15d"
    retention_size: str = "1GB"
    #: Ray's service-discovery file (None: no Ray job).
    ray_discovery_file: str | None = None
    #: The server as the head reaches it, ``127.0.0.1:<api port>`` (None: no server job).
    server_target: str | None = None
    #: The API's certificate on the head when it serves HTTPS (None: plain HTTP). Prometheus
    #: trusts exactly it: a self-signed certificate is its own authority; a CA-signed one must
    #: then be given with its chain.
    server_ca_file: str | None = None
    binary: str = "prometheus"

    @property
    def config_path(self) -> str:
        return f"{self.dir}/{CONFIG_FILE}"

    @property
    def token_path(self) -> str:
        return f"{self.dir}/{TOKEN_FILE}"

    @property
    def data_path(self) -> str:
        return f"{self.dir}/{DATA_DIR}"

    @property
    def pid_path(self) -> str:
        return f"{self.dir}/{PID_FILE}"

    @property
    def log_path(self) -> str:
        return f"{self.dir}/{LOG_FILE}"

    @property
    def consoles_path(self) -> str:
        return f"{self.dir}/{CONSOLES_DIR}"

    @property
    def libraries_path(self) -> str:
        return f"{self.dir}/{LIBRARIES_DIR}"

    @property
    def listen(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.listen}"

    def jobs(self) -> list[str]:
        """The scrape jobs of this config, in order."""
        return [
            "prometheus",
            *(["ray"] if self.ray_discovery_file else []),
            *(["server"] if self.server_target else []),
        ]


def _s(text: str) -> str:
    """A YAML scalar: JSON's double-quoted string is valid YAML."""
    return json.dumps(text)


def config_text(spec: MonitorSpec) -> str:
    """prometheus.yml: Prometheus itself, Ray's nodes (from Ray's discovery file) and the
    server's /metrics with the API key read from a file (never the key in this text)."""
    lines = [
        f"# Written by llamacluster's monitor stage for cluster {spec.cluster}; `up` rewrites it.",
        "global:",
        f"  scrape_interval: {SCRAPE_INTERVAL}",
        f"  scrape_timeout: {SCRAPE_TIMEOUT}",
        f"  evaluation_interval: {SCRAPE_INTERVAL}",
        "  external_labels:",
        f"    cluster: {_s(spec.cluster)}",
        "scrape_configs:",
        "  - job_name: prometheus",
        "    static_configs:",
        f"      - targets: [{_s(spec.listen)}]",
    ]
    if spec.ray_discovery_file:
        lines += [
            "  - job_name: ray",
            "    file_sd_configs:",
            f"      - files: [{_s(spec.ray_discovery_file)}]",
            f"        refresh_interval: {DISCOVERY_REFRESH}",
        ]
    if spec.server_target:
        lines += [
            "  - job_name: server",
            f"    scrape_interval: {SERVER_SCRAPE_INTERVAL}",
            "    metrics_path: /metrics",
            *(
                [
                    "    scheme: https",
                    "    tls_config:",
                    f"      ca_file: {_s(spec.server_ca_file)}",
                ]
                if spec.server_ca_file
                else []
            ),
            "    authorization:",
            "      type: Bearer",
            f"      credentials_file: {_s(spec.token_path)}",
            "    static_configs:",
            f"      - targets: [{_s(spec.server_target)}]",
        ]
    return "\n".join(lines) + "\n"


def argv(spec: MonitorSpec) -> list[str]:
    """The Prometheus command line: our config and data dir, 127.0.0.1 only, bounded retention."""
    return [
        spec.binary,
        f"--config.file={spec.config_path}",
        f"--storage.tsdb.path={spec.data_path}",
        f"--storage.tsdb.retention.time={spec.retention_time}",
        f"--storage.tsdb.retention.size={spec.retention_size}",
        f"--web.listen-address={spec.listen}",
        f"--web.console.templates={spec.consoles_path}",
        f"--web.console.libraries={spec.libraries_path}",
    ]


def dashboard_files(spec: MonitorSpec) -> dict[str, str]:
    """The dashboards' files by their path on the head (under the monitor's directory)."""
    return {f"{spec.dir}/{rel}": text for rel, text in dashboards.files().items()}


def dashboard_url(base_url: str) -> str:
    """The dashboards' first page on a Prometheus at ``base_url``."""
    return f"{base_url.rstrip('/')}/{DASHBOARD_PAGE}"


def digest(spec: MonitorSpec) -> str:
    """What decides a restart: the config text and the command line."""
    return config_hash({"config": config_text(spec), "argv": argv(spec)})


def _q(path: str) -> str:
    return shlex.quote(path)


def probe_command(*, installer: bool = True) -> str:
    """What the head has: the binary, its version, the boot id, and (``installer``: when the
    stage may install the package) apt-get; key=value lines."""
    return (
        'echo "prometheus=$(command -v prometheus)"; '
        'echo "version=$(prometheus --version 2>&1 | head -n 1)"; '
        + ('echo "apt=$(command -v apt-get)"; ' if installer else "")
        + 'echo "boot_id=$(cat /proc/sys/kernel/random/boot_id)"'
    )


def parse_probe(text: str) -> dict[str, str]:
    """``key=value`` lines of probe_command into a dict."""
    out = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            out[key.strip()] = value.strip()
    return out


# Debian/Ubuntu: the package for its binary only. policy-rc.d (unless one is there already)
# keeps the package from starting the distribution's service; disabling it keeps it from
# starting at boot. An empty package list is refreshed once when the install fails.
_INSTALL_TEMPLATE = """\
set -e
s={sudo}
ours=0
if [ ! -e /usr/sbin/policy-rc.d ]; then
  printf '#!/bin/sh\\nexit 101\\n' | $s tee /usr/sbin/policy-rc.d >/dev/null
  $s chmod +x /usr/sbin/policy-rc.d
  ours=1
fi
trap '[ "$ours" = 1 ] && $s rm -f /usr/sbin/policy-rc.d' EXIT
apt_install() {{ $s env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends {package}; }}
apt_install || {{ $s env DEBIAN_FRONTEND=noninteractive apt-get update -q && apt_install; }}
$s systemctl disable prometheus.service >/dev/null 2>&1 || $s update-rc.d prometheus disable >/dev/null 2>&1 || true
command -v prometheus
"""


def install_command(sudo: str = "") -> str:
    """Install the distribution's package (Debian/Ubuntu) without its service running."""
    return _INSTALL_TEMPLATE.format(sudo=shlex.quote(sudo) if sudo else "''", package=PACKAGE)


def install_display(sudo: str = "") -> str:
    """install_command in one line for a person (``--dry-run``)."""
    s = f"{sudo} " if sudo else ""
    return (
        f"{s}env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "
        f"{PACKAGE}   # only when prometheus is missing (Debian/Ubuntu); with policy-rc.d so the "
        f"distribution's service does not start, then `{s}systemctl disable prometheus.service`"
    )


def write_file_command(path: str) -> str:
    """Write stdin to ``path`` (0600, its directory 0700) only when it differs; prints
    ``changed`` or ``unchanged``."""
    p = _q(path)
    tmp = _q(path + ".llamacluster-tmp")
    return (
        f'umask 077 && mkdir -p -- "$(dirname -- {p})" && cat > {tmp} && '
        f"if cmp -s {tmp} {p}; then rm -f -- {tmp}; echo unchanged; "
        f"else mv -f -- {tmp} {p}; echo changed; fi"
    )


# Starts Prometheus as the leader of a new session (its pid is the session id), detached from
# the SSH session: output to its log, stdin from /dev/null. Prints its pid.
_START_TEMPLATE = """\
umask 077
mkdir -p {data}
cd {dir}
rm -f {pid}
[ -f {log} ] && mv -f {log} {log}.1
setsid bash -c 'echo $$ > "$1"; shift; exec "$@"' _ {pid} {argv} > {log} 2>&1 < /dev/null &
for _ in $(seq 100); do [ -s {pid} ] && break; sleep 0.05; done
echo "LLAMACLUSTER_MONITOR_PID=$(cat {pid} 2>/dev/null)"
"""


def start_command(spec: MonitorSpec) -> str:
    """Shell text that starts ``spec``'s Prometheus in its own session and prints its pid."""
    return _START_TEMPLATE.format(
        data=_q(spec.data_path),
        dir=_q(spec.dir),
        pid=_q(spec.pid_path),
        log=_q(spec.log_path),
        argv=shlex.join(argv(spec)),
    )


def start_display(spec: MonitorSpec) -> str:
    """start_command in one line for a person (``--dry-run``)."""
    return (
        f"setsid {shlex.join(argv(spec))} > {_q(spec.log_path)} 2>&1 < /dev/null &"
        "   # in its own session (pid = session id, recorded); only when it does not run or "
        "its config or command line changed (the old one is stopped first)"
    )


def parse_pid(stdout: str) -> int | None:
    """The pid start_command printed (None: it did not start)."""
    for line in reversed(stdout.splitlines()):
        if line.startswith("LLAMACLUSTER_MONITOR_PID="):
            value = line.split("=", 1)[1].strip()
            return int(value) if value.isdigit() else None
    return None


def _same_boot(boot_id: str | None) -> str:
    if not boot_id:
        return "true"
    return f'[ "$(cat /proc/sys/kernel/random/boot_id 2>/dev/null)" = {_q(boot_id)} ]'


def alive_command(pid: int, monitor_dir: str, boot_id: str | None) -> str:
    """Exit 0 while our Prometheus runs: same boot, and a process of session ``pid`` names
    ``monitor_dir`` (a pid reused by anything else does not count)."""
    return f"{_same_boot(boot_id)} || exit 1\n{session_alive_command(pid, monitor_dir)}"


def stop_command(pid: int, monitor_dir: str, boot_id: str | None) -> str:
    """Stop exactly our Prometheus (TERM, then KILL after STOP_GRACE_S); after a reboot, or
    when the session is not ours, nothing is signalled."""
    return (
        f'{_same_boot(boot_id)} || {{ echo "the head rebooted: nothing of ours runs"; exit 0; }}\n'
        + stop_session_command(pid, monitor_dir, grace_s=STOP_GRACE_S)
    )


def remove_command(monitor_dir: str) -> str:
    """``down --purge``: remove the monitor's directory (data, config, token file, log)."""
    return f"rm -rf -- {_q(monitor_dir)}"


def probe_args(
    spec_or_url: MonitorSpec | str,
    config_path: str | None = None,
    *,
    pid: int | None = None,
    log: str | None = None,
    need_jobs: tuple[str, ...] | list[str] = (),
    wait_s: float = 0,
) -> list[str]:
    """Arguments of ``promctl probe`` (cluster/promctl.py) for a Prometheus."""
    if isinstance(spec_or_url, MonitorSpec):
        url, config_path = spec_or_url.url, spec_or_url.config_path
    else:
        url = spec_or_url
    args = ["probe", "--url", url, "--config", str(config_path), "--wait-s", f"{wait_s:g}"]
    if pid:
        args += ["--pid", str(pid)]
    if log:
        args += ["--log", log]
    for job in need_jobs:
        args += ["--need-job", job]
    return args


def promctl_command(args: list[str], python: str = "python3") -> str:
    """``python3 - probe ...``: promctl's source goes on stdin (promctl.script_source())."""
    return promctl.script_command(*args, python=python)


def summarize_targets(targets: Iterable[dict]) -> tuple[dict[str, tuple[int, int]], list[str]]:
    """Per job (up, total), and one line per target that is not up."""
    per_job: dict[str, tuple[int, int]] = {}
    down = []
    for t in targets:
        up, total = per_job.get(t["job"], (0, 0))
        healthy = t.get("health") == "up"
        per_job[t["job"]] = (up + healthy, total + 1)
        if not healthy:
            health = t.get("health") or "down"
            why = t.get("error") or ("not scraped yet" if health == "unknown" else health)
            down.append(f"{t['job']} {t.get('instance', '?')} ({why})")
    return per_job, down


def jobs_without_targets(
    targets: list[dict], expected: Iterable[str]
) -> tuple[list[str], list[str]]:
    """(jobs with no target up, jobs whose every target awaits its first scrape).

    A target's first scrape lands at an offset within its interval after Prometheus starts, so a
    job whose targets are all still ``unknown`` is pending, not failed; an expected job with no
    target at all, or one whose scraped targets are all down, has none up.
    """
    jobs: dict[str, list[str]] = {job: [] for job in expected}
    for t in targets:
        jobs.setdefault(t["job"], []).append(t.get("health") or "down")
    pending = sorted(
        job for job, seen in jobs.items() if seen and all(h == "unknown" for h in seen)
    )
    empty = sorted(job for job, seen in jobs.items() if job not in pending and "up" not in seen)
    return empty, pending


def describe_targets(per_job: dict[str, tuple[int, int]]) -> str:
    """``prometheus 1/1, ray 3/3, server 1/1`` (targets up of each job)."""
    return ", ".join(f"{job} {up}/{total}" for job, (up, total) in per_job.items()) or "none"
