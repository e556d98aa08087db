"""Monitor: the cluster's own Prometheus on the head's 127.0.0.1 (Ray's nodes, the server, itself)."""

from __future__ import annotations

import json
from dataclasses import replace

from cluster import monitor, promctl
from cluster.errors import ConfigError, RemoteError
from cluster.keys import read_api_key
from cluster.runner import Result
from cluster.stages.base import ClusterContext, Stage, StageCheck, StageOutcome, Teardown, UpContext
from cluster.stages.serve import api_target_on_head, remote_tls_files
from cluster.state import ClusterState, MonitoringSection, remote_cluster_dir

#: How long `up` waits for a (re)started Prometheus to be ready and scraping itself.
READY_WAIT_S = 60
#: How long `up` waits for a running Prometheus to answer ready (a failure after).
TARGETS_WAIT_S = 30

NO_BINARY_HINT = (
    "install Prometheus 2.x so `prometheus` is on the head's PATH (your distribution's package, "
    "or the release from prometheus.io), then rerun `llamacluster up`; or pass --skip monitor"
)


def monitor_dir(state: ClusterState) -> str:
    """The monitor's directory on the head: ``<cluster dir on the head>/monitor``."""
    return f"{remote_cluster_dir(state)}/monitor"


def ray_discovery_file(state: ClusterState) -> str:
    """Ray's service-discovery file on the head (under this cluster's Ray temp dir)."""
    from cluster.stages.ray import ray_temp_dir  # ray.py imports the serve stage

    head = state.head.name if state.head else "head"
    temp = state.ray.node(head).temp_dir or ray_temp_dir(state.name)
    return f"{temp}/{monitor.RAY_DISCOVERY_FILE}"


def monitor_spec(ctx: UpContext, binary: str = "prometheus") -> monitor.MonitorSpec:
    """The Prometheus this `up` wants (placeholders for ports not chosen yet: dry run)."""
    ports = ctx.state.ports
    port = ports.monitor if ports and ports.monitor is not None else ctx.config.monitor_port
    api = ports.api if ports else ctx.config.api_port
    return monitor.MonitorSpec(
        cluster=ctx.state.name,
        dir=monitor_dir(ctx.state),
        port=port,
        retention_time=ctx.config.monitor_retention_time,
        retention_size=ctx.config.monitor_retention_size,
        ray_discovery_file=ray_discovery_file(ctx.state),
        # Where the API is bound on the head (its private address by default), once deployed.
        server_target=(
            api_target_on_head(ctx.state) if ctx.state.server.endpoint else f"127.0.0.1:{api}"
        ),
        server_ca_file=(
            remote_tls_files(ctx.state)[0]
            if (ctx.state.server.endpoint or "").startswith("https://")
            else None
        ),
        binary=binary,
    )


def _sudo(ctx: UpContext) -> str | None:
    rec = ctx.state.head
    return rec.sudo if rec is not None else None


def _python(state: ClusterState) -> str:
    rec = state.head
    return rec.python if rec is not None and rec.python else "python3"


def probe_reply(result: Result) -> dict:
    """promctl's JSON line from a Result (an empty dict when there is none)."""
    for line in reversed(result.stdout.strip().splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                break
    return {}


def _probe(
    ctx: ClusterContext, args: list[str], *, what: str, timeout: float = 60
) -> tuple[bool, dict]:
    res = ctx.run_head(
        monitor.promctl_command(args, python=_python(ctx.state)),
        what=what,
        stdin=promctl.script_source(),
        timeout=timeout,
        check=False,
    )
    seen = probe_reply(res)
    if not seen:
        seen = {"error": res.tail(2) or res.tail(2, stream="stdout") or f"exit {res.returncode}"}
    return res.ok, seen


def _stop(ctx: ClusterContext, rec: MonitoringSection) -> bool:
    """Stop the recorded Prometheus (if it still runs); True when nothing of it is left."""
    assert rec.pid is not None and rec.dir is not None
    res = ctx.run_head(
        monitor.stop_command(rec.pid, rec.dir, rec.boot_id),
        what="stopping prometheus",
        timeout=monitor.STOP_GRACE_S + 60,
        check=False,
    )
    if not res.ok:
        ctx.reporter.warn(f"{ctx.head.label}: could not stop prometheus: {res.tail(1)}")
    return res.ok


class Monitor(Stage):
    """Prometheus on the head: Ray's metrics on every node, the server's /metrics, itself."""

    name = "monitor"
    title = "metrics history: Prometheus on the head's 127.0.0.1 (Ray, server, itself)"
    sections = ("monitoring",)

    def skip_reason(self, ctx: UpContext) -> str | None:
        head = ctx.state.head.name if ctx.state.head else ctx.head.name
        if "ray" in ctx.config.skip and ctx.state.ray.node(head).session is None:
            return "Ray is not running (--skip ray): nothing to watch"
        return None

    def check(self, ctx: ClusterContext) -> StageCheck:
        """Our Prometheus answers /-/ready on the head, and every job has a target up."""
        rec = ctx.state.monitoring
        if rec.pid is None or not rec.url or not rec.dir:
            return StageCheck(None, "monitor not running")
        config = f"{rec.dir}/{monitor.CONFIG_FILE}"
        ok, seen = _probe(ctx, monitor.probe_args(rec.url, config), what="monitor ready?")
        if not ok:
            return StageCheck(False, f"prometheus at {rec.url} on the head: {seen.get('error')}")
        per_job, down = monitor.summarize_targets(seen.get("targets", []))
        expected = [
            "prometheus",
            *(["ray"] if any(n.session for n in ctx.state.ray.nodes.values()) else []),
            *(["server"] if ctx.state.server.config_digest else []),
        ]
        empty, pending = monitor.jobs_without_targets(seen.get("targets", []), expected)
        message = f"prometheus {rec.url} ready; targets up: {monitor.describe_targets(per_job)}"
        if pending:
            message += "; first scrape pending for " + ", ".join(sorted(pending))
        if empty:
            message += "; no target up for " + ", ".join(sorted(empty))
        if down:
            message += "; not up: " + "; ".join(down[:4]) + (" ..." if len(down) > 4 else "")
        return StageCheck(not empty, message)

    def teardown(self, ctx: ClusterContext, how: Teardown) -> str | None:
        """Stop exactly our Prometheus; with --purge remove its directory (data included)."""
        rec = ctx.state.monitoring
        said = []
        if rec.pid is not None and rec.dir and _stop(ctx, rec):
            said.append(f"prometheus stopped (pid {rec.pid})")
            rec.pid = None
            rec.boot_id = None
        if how.purge and rec.dir:
            res = ctx.run_head(
                monitor.remove_command(rec.dir),
                what="removing the monitor's data",
                timeout=120,
                check=False,
            )
            if res.ok:
                said.append(f"{rec.dir} removed")
                ctx.state.monitoring = MonitoringSection()
        ctx.state.save()
        return "; ".join(said) or None

    def plan(self, ctx: UpContext) -> dict[str, list[str]]:
        spec = monitor_spec(ctx)
        install = [] if ctx.config.test_root else [monitor.install_display(_sudo(ctx) or "")]
        probe = monitor.probe_args(spec, wait_s=TARGETS_WAIT_S)
        return {
            ctx.head.label: [
                monitor.probe_command(installer=not ctx.config.test_root),
                *install,
                f"write <first key of {ctx.state.secrets.api_key_file or 'the API key file'}> "
                f"-> {spec.token_path} (0600, only when it differs)",
                f"write {spec.config_path} (0600, only when it differs): jobs "
                + ", ".join(spec.jobs())
                + f"; the server's key as credentials_file {spec.token_path}",
                f"write the dashboards -> {spec.consoles_path}/, {spec.libraries_path}/ "
                "(console pages, only when they differ)",
                monitor.start_display(spec),
                monitor.promctl_command(probe, python=_python(ctx.state))
                + "   # ready, ours, and a target up in each job",
            ]
        }

    def run(self, ctx: UpContext) -> StageOutcome:
        ports = ctx.state.ports
        if ports is None or ports.monitor is None:
            raise ConfigError(
                "no monitor port on record",
                hint="run `llamacluster up` without --skip preflight once (it chooses the port)",
            )
        head = ctx.node_state(ctx.head)
        if not head.home:
            raise ConfigError(
                f"{ctx.head.label}: no home directory on record",
                hint="run `llamacluster up` without --skip preflight",
            )
        probe = monitor.probe_command(installer=not ctx.config.test_root)
        found = monitor.parse_probe(
            ctx.run_head(probe, what="looking for prometheus", timeout=60).stdout
        )
        rec = ctx.state.monitoring
        installed = False
        if not found.get("prometheus"):
            reason = self._cannot_install(ctx, found)
            if reason:
                ctx.reporter.warn(f"{ctx.head.label}: {reason}; {NO_BINARY_HINT}")
                return StageOutcome("skipped", f"no prometheus on {ctx.head.label}")
            ctx.run_head(
                monitor.install_command(_sudo(ctx) or ""),
                what=f"installing the {monitor.PACKAGE} package",
                timeout=900,
            )
            found = monitor.parse_probe(ctx.run_head(probe, what="looking for prometheus").stdout)
            if not found.get("prometheus"):
                raise RemoteError(
                    f"{ctx.head.label}: `prometheus` is still not on PATH after installing "
                    f"the {monitor.PACKAGE} package",
                    hint=NO_BINARY_HINT,
                )
            installed = True
            ctx.reporter.node(
                ctx.head.label,
                f"installed {found.get('version') or monitor.PACKAGE} "
                "(its system service left stopped and disabled)",
            )
        if rec.pid is not None and rec.boot_id and rec.boot_id != found.get("boot_id"):
            # The head rebooted: the recorded pid may now be anything. Forget it (never signal).
            ctx.reporter.info(f"{ctx.head.label}: prometheus record from an earlier boot dropped")
            rec.pid = None
        spec = monitor_spec(ctx, binary=found["prometheus"])
        if not ctx.state.server.config_digest:
            spec = replace(spec, server_target=None)  # no server deployed (--skip serve)
        changed_files = self._write_files(ctx, spec)
        wanted = monitor.digest(spec)
        alive = rec.pid is not None and (
            ctx.run_head(
                monitor.alive_command(rec.pid, str(rec.dir), rec.boot_id),
                what="prometheus running?",
                timeout=30,
                check=False,
            ).ok
        )
        restart = alive and (rec.config_digest != wanted or "config" in changed_files)
        if restart:
            ctx.reporter.info(f"{ctx.head.label}: prometheus config changed: restarting it")
            if not _stop(ctx, rec):
                raise RemoteError(
                    f"{ctx.head.label}: could not stop the old prometheus (pid {rec.pid})",
                    hint="stop it by hand, then rerun `llamacluster up`",
                )
            rec.pid = None
        started = not alive or restart
        if started:
            self._start(ctx, spec, found, installed=installed or rec.installed)
            rec = ctx.state.monitoring
        rec.config_digest = wanted
        rec.version = found.get("version")
        _, seen = _probe(
            ctx,
            # Ready and ours is enough: a target's first scrape lands at a random offset within
            # its interval (up to 10 s), which `up` does not wait for; `status` shows them.
            monitor.probe_args(spec, pid=rec.pid, log=spec.log_path, wait_s=TARGETS_WAIT_S),
            what="waiting for prometheus",
            timeout=TARGETS_WAIT_S + 60,
        )
        if not (seen.get("ready") and seen.get("ours")):
            raise RemoteError(
                f"prometheus on {ctx.head.label} is not ready: {seen.get('error')}",
                hint=f"see {spec.log_path} on the head (a port taken? pass another --monitor-port)",
            )
        targets = seen.get("targets", [])
        per_job, down = monitor.summarize_targets(
            t for t in targets if t.get("health") != "unknown"
        )
        for line in down:
            ctx.reporter.warn(f"target not up: {line}")
        pending = sum(t.get("health") == "unknown" for t in targets)
        ctx.reporter.node(
            ctx.head.label,
            f"prometheus {spec.url} (pid {rec.pid}), targets up: "
            f"{monitor.describe_targets(per_job)}"
            + (f"; {pending} awaiting their first scrape" if pending else ""),
        )
        what = f"prometheus {spec.url} on the head, retention {spec.retention_time} / {spec.retention_size}"
        if started:
            return StageOutcome("done", ("restarted: " if restart else "started: ") + what)
        if changed_files:
            return StageOutcome("done", f"{', '.join(changed_files)} rewritten: {what}")
        return StageOutcome("unchanged", f"already running: {what}")

    @staticmethod
    def _cannot_install(ctx: UpContext, found: dict[str, str]) -> str | None:
        """Why the stage cannot install prometheus on the head, or None when it can."""
        if ctx.config.test_root:
            return "no `prometheus` on PATH (test root: no package is installed)"
        if not found.get("apt"):
            return "no `prometheus` on PATH and no apt-get to install it"
        if _sudo(ctx) is None:
            return "no `prometheus` on PATH, and not root nor `sudo -n` to install it"
        return None

    @staticmethod
    def _write_files(ctx: UpContext, spec: monitor.MonitorSpec) -> list[str]:
        """The token file (the API key's first line) and the config, each only when it differs;
        the names of those written."""
        written = []
        files = [("config", spec.config_path, monitor.config_text(spec))]
        # Prometheus reads console pages on every request: a changed page needs no restart.
        files += [("dashboards", p, t) for p, t in monitor.dashboard_files(spec).items()]
        if spec.server_target:
            key = read_api_key(str(ctx.state.secrets.api_key_file))
            files.insert(0, ("token file", spec.token_path, key + "\n"))
        for what, path, text in files:
            res = ctx.run_head(
                monitor.write_file_command(path),
                what=f"writing the monitor's {what}",
                stdin=text,
                timeout=60,
            )
            if res.stdout.strip().splitlines()[-1:] == ["changed"] and what not in written:
                written.append(what)
        return written

    @staticmethod
    def _start(
        ctx: UpContext, spec: monitor.MonitorSpec, found: dict[str, str], *, installed: bool
    ) -> None:
        res = ctx.run_head(monitor.start_command(spec), what="starting prometheus", timeout=60)
        pid = monitor.parse_pid(res.stdout)
        if pid is None:
            raise RemoteError(
                f"prometheus did not start on {ctx.head.label}: {res.tail(3)}",
                hint=f"see {spec.log_path} on the head",
            )
        ctx.state.monitoring = MonitoringSection(
            dir=spec.dir,
            url=spec.url,
            pid=pid,
            boot_id=found.get("boot_id") or None,
            config_digest=None,  # set once it answers
            binary=spec.binary,
            version=found.get("version"),
            installed=installed,
        )
        ctx.state.save()  # recorded at once: `down` can stop it even if a later step fails
