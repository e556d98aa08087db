"""Library entry points behind the CLI: up, down, status, exec, logs and tunnel for one cluster."""

from __future__ import annotations

import shlex
import time
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from cluster.errors import ConfigError, LlamaclusterError, RemoteError
from cluster.inventory import Cluster, load_inventory, local_cluster
from cluster.keys import read_api_keys
from cluster.lock import cluster_lock
from cluster.recorded import RecordedCluster, person_ssh, ssh_config_of
from cluster.runner import Result, prefixed_printer, run_on_nodes, runner_for
from cluster.stages import STAGES
from cluster.stages.base import (
    ClusterContext,
    Reporter,
    Teardown,
    UpContext,
    print_plan,
    run_log_path,
    run_stages,
)
from cluster.stages.config import UpConfig
from cluster.state import (
    API_KEY_FILE,
    TOKEN_FILE,
    Access,
    ClusterState,
    ModelSection,
    Secrets,
    cluster_dir,
    config_hash,
    default_cluster_name,
    ensure_private_dir,
    ensure_secret,
    find_state,
    load_state,
    remove_state,
)

__all__ = ["UpConfig", "down", "exec_command", "logs", "status", "tunnel", "up"]


def _resolve(config: UpConfig) -> tuple[Cluster, ClusterState]:
    """Inventory and state for an `up`: the recorded state when there is one, else a new one."""
    if config.local:
        cluster = local_cluster()
        inv_path, inv_text = None, ""
    else:
        path = config.inventory or Path("deploy/ips.txt")
        cluster = load_inventory(
            path,
            default_user=config.ssh_user,
            default_port=config.ssh_port,
            identity_file=config.identity_file,
        )
        inv_path, inv_text = str(Path(path).absolute()), Path(path).read_text(encoding="utf-8")
    name = up_cluster_name(config)
    state = find_state(name) or ClusterState(name=name, access=Access(local=config.local))
    if state.local != config.local:
        raise ConfigError(
            f"cluster {name!r} was brought up {'with' if state.local else 'without'} --local",
            hint="pass another --name, or `llamacluster down --purge` it first",
        )
    state.access = Access(
        local=config.local,
        inventory_path=inv_path,
        inventory_text=inv_text,
        ssh_user=config.ssh_user,
        ssh_port=config.ssh_port,
        identity_file=str(config.identity_file) if config.identity_file else None,
        known_hosts=str(config.known_hosts) if config.known_hosts else None,
        strict_host_keys=config.strict_host_keys,
        system_root=str(config.system_root),
    )
    return cluster, state


def _fill_defaults(config: UpConfig, state: ClusterState, *, dry_run: bool) -> None:
    """Shared dir, model, secrets: from the flags, else the recorded state, else defaults."""
    if config.shared_dir is not None:
        state.shared_dir = str(config.shared_dir)
    elif state.shared_dir is None:
        if not config.local:
            raise ConfigError(
                "no --shared-dir given",
                hint="pass the directory every node shares (an NFS mount), e.g. --shared-dir /mnt/shared/llamacluster",
            )
        state.shared_dir = str(cluster_dir(state.name) / "shared")
    source = config.model or state.model.source
    if source is None:
        if not config.local:
            raise ConfigError(
                "no --model given",
                hint="pass a hub repo id, e.g. --model meta-llama/Llama-3.1-70B-Instruct",
            )
        from cluster.demo_model import default_demo_model_dir, ensure_demo_model

        source = str(default_demo_model_dir() if dry_run else ensure_demo_model())
    state.model = resolve_model(source, state.shared_dir, config.revision, config.served_model_name)
    if config.model:
        # Further models as asked now (none: this `up` serves one); a bare `up` keeps them.
        state.more_models = [
            resolve_more_model(spec, state.shared_dir) for spec in config.more_models
        ]
    if dry_run:
        return
    ensure_private_dir(cluster_dir(state.name))
    token, _ = ensure_secret(cluster_dir(state.name) / TOKEN_FILE)
    if config.api_key_file is not None:
        key = Path(config.api_key_file).absolute()
        read_api_keys(key)  # refuses a missing, open or empty file before anything runs
    else:
        key, _ = ensure_secret(cluster_dir(state.name) / API_KEY_FILE, prefix="sk-lc-")
    state.secrets = Secrets(ray_token=str(token), api_key_file=str(key))


def resolve_model(
    source: str, shared_dir: str | None, revision: str | None, names: list[str]
) -> ModelSection:
    """The model section for ``source`` (a hub repo id or a directory): where its files are (a
    local directory as it is, else the download's target ``<shared>/models/<org>--<name>[@rev]``)
    and the names it is served under (the asked ones, else the repo id or the directory's name)."""
    from cluster.stages.download import is_local_model, model_target
    from cluster.stages.serve import served_names

    if is_local_model(source):
        path = str(Path(source).expanduser().absolute())
        return ModelSection(
            source=source, dir=path, revision=revision, served_names=served_names(names, path)
        )
    return ModelSection(
        source=source,
        repo_id=source,
        revision=revision,
        dir=model_target(str(shared_dir), source, revision),
        served_names=served_names(names, source),
    )


def resolve_more_model(spec: str, shared_dir: str | None) -> ModelSection:
    """The model section of a further ``--model`` value (serve.models.parse_model_spec)."""
    from serve.models import parse_model_spec

    values = parse_model_spec(spec)
    section = resolve_model(values["model"], shared_dir, None, values.get("served_model_name", []))
    return section.model_copy(
        update={
            "tp": values.get("tp"),
            "pp": values.get("pp"),
            "replicas": values.get("num_replicas", 1),
            "max_model_len": values.get("max_model_len"),
            "lora": values.get("lora_modules", []),
        }
    )


def up_cluster_name(config: UpConfig) -> str:
    """The cluster an `up` with ``config`` works on (``--name``, else from the inventory)."""
    if config.name:
        return config.name
    if config.local:
        return default_cluster_name(None)
    return default_cluster_name(str(Path(config.inventory or "deploy/ips.txt").absolute()))


def up(config: UpConfig, *, console: Console | None = None) -> ClusterState:
    """Bring the cluster to the state ``config`` asks for, stage by stage; return its state.

    Every stage checks what is already there first, so a second call with the same config
    changes nothing. ``config.dry_run`` prints each stage's commands per node and runs nothing.
    One operator at a time: a real run holds the cluster's lock (cluster/lock.py).
    """
    if config.dry_run:
        return _up(config, console)
    reporter = Reporter(console)
    with cluster_lock(up_cluster_name(config), "up", wait=config.wait, on_wait=reporter.print):
        return _up(config, console)


def _up(config: UpConfig, console: Console | None) -> ClusterState:
    reporter = Reporter(console, verbose=config.verbose)
    cluster, state = _resolve(config)
    _fill_defaults(config, state, dry_run=config.dry_run)
    ctx = UpContext(
        config=config,
        cluster=cluster,
        state=state,
        runners=[runner_for(n, ssh_config=ssh_config_of(state)) for n in cluster],
        reporter=reporter,
    )
    if config.dry_run:
        reporter.print(
            f"[bold]dry run[/] for cluster [cyan]{state.name}[/] ({len(cluster)} node(s)): nothing is run"
        )
        ctx.scratch["plan"] = print_plan(ctx, STAGES)
        return state
    reporter.print(
        f"[bold]up[/] cluster [cyan]{state.name}[/] ({len(cluster)} node(s), state in {cluster_dir(state.name)})"
    )
    state.save()
    log = reporter.open_log(
        run_log_path(cluster_dir(state.name), "up"), RecordedCluster(state).secrets()
    )
    reporter.print(f"log: {log}")
    try:
        run_stages(ctx, STAGES)
        state.config_hash = config_hash(config.hashed_fields())
        state.save()
    finally:
        reporter.close_log()
    changed = [n for n, r in state.stages.items() if r.status == "done"]
    reporter.print(
        "nothing changed: the cluster was already as asked"
        if not changed
        else f"changed: {', '.join(changed)}"
    )
    if state.server.endpoint:
        print_ready(state, reporter)
    return state


def print_ready(state: ClusterState, reporter: Reporter) -> None:
    """Endpoint, API key location, tunnel command, and curl / openai examples."""
    server = state.server
    model = server.served_name or "<model>"
    base = f"{server.endpoint}/v1"
    scheme = base.split("://", 1)[0]
    local_base = f"{scheme}://127.0.0.1:{state.ports.api}/v1" if state.ports else base
    key = state.secrets.api_key_file
    reporter.print()
    aliases = f" (also: {', '.join(server.aliases)})" if server.aliases else ""
    reporter.print(
        f"[bold green]ready[/]: {base}  (model [cyan]{model}[/]{aliases}, "
        f"tp={server.tp} × pp={server.pp})"
    )
    if server.models[1:]:
        reporter.print(
            "  further models (send their name as `model`): " + ", ".join(server.models[1:])
        )
    reporter.print(f"  API key:  {key}  (0600; never printed)")
    from cluster.stages.serve import controller_tls_files

    if scheme == "https":
        from cluster.tls import fingerprint_sha256

        cert = controller_tls_files(state.name)[0]
        if cert.exists():
            reporter.print(f"  TLS cert: {cert}  (clients trust it: SSL_CERT_FILE={cert})")
            reporter.print(f"  SHA-256:  {fingerprint_sha256(cert)}")
    if not state.local:
        reporter.print(
            f"  tunnel:   llamacluster tunnel --name {state.name}   (then use {local_base})"
        )
    reporter.print(f"  status:   llamacluster status --name {state.name}")
    if state.monitoring.pid is not None and state.monitoring.url:
        where = "" if state.local else " on the head (`llamacluster tunnel` forwards it)"
        reporter.print(f"  monitor:  Prometheus {state.monitoring.url}{where}")
        from cluster.monitor import dashboard_url

        reporter.print(
            f"  charts:   {dashboard_url(state.monitoring.url)}   (llamacluster top: live)"
        )
    reporter.print("  curl:")
    cacert = f"--cacert {controller_tls_files(state.name)[0]} " if scheme == "https" else ""
    reporter.console.print(
        f'    curl -s {cacert}{base}/chat/completions -H "Authorization: Bearer $(head -n1 {key})" '
        f"-H 'Content-Type: application/json' "
        f'-d \'{{"model": "{model}", "messages": [{{"role": "user", "content": "Hello"}}]}}\'',
        markup=False,
    )
    reporter.print("  python:")
    reporter.console.print(
        f"    from openai import OpenAI; from pathlib import Path\n"
        f'    client = OpenAI(base_url="{base}", api_key=Path("{key}").read_text().split()[0])\n'
        f'    print(client.chat.completions.create(model="{model}", messages=[{{"role": "user", "content": "Hello"}}]).choices[0].message.content)',
        markup=False,
    )


def _context(recorded: RecordedCluster, reporter: Reporter) -> ClusterContext:
    return ClusterContext(
        cluster=recorded.inventory,
        state=recorded.state,
        runners=recorded.runners(),
        reporter=reporter,
    )


def down(
    name: str,
    *,
    keep_ray: bool = False,
    purge: bool = False,
    drain_timeout: float = 30.0,
    wait: bool = False,
    force: bool = False,
    console: Console | None = None,
) -> ClusterState | None:
    """Every stage's teardown, last stage first: drain and stop the server, stop exactly this
    cluster's Ray processes (by their recorded sessions), and with ``purge`` revert the
    fstab/exports/cachefilesd edits, remove the cluster's files on the nodes and forget the
    cluster. A purge that a node did not confirm keeps the state (what is left to undo) and
    raises, unless ``force``. Returns the remaining state (None after a purge)."""
    reporter = Reporter(console)
    recorded = RecordedCluster.load(name)
    with cluster_lock(name, "down", wait=wait, on_wait=reporter.print):
        return _down(
            recorded,
            reporter,
            keep_ray=keep_ray,
            purge=purge,
            drain_timeout=drain_timeout,
            force=force,
        )


def _down(
    recorded: RecordedCluster,
    reporter: Reporter,
    *,
    keep_ray: bool,
    purge: bool,
    drain_timeout: float,
    force: bool = False,
) -> ClusterState | None:
    name = recorded.name
    ctx = _context(recorded, reporter)
    how = Teardown(purge=purge, drain_timeout=drain_timeout)
    for stage in reversed(STAGES):
        if keep_ray and stage.name in ("ray", "storage", "cache", "preflight"):
            continue
        started = time.monotonic()
        done = stage.teardown(ctx, how)
        if done:
            reporter.info(f"{stage.name}: {done} ({time.monotonic() - started:.1f} s)")
    state = ctx.state
    state.stages = {}
    state.save()
    if purge and how.failed and not force:
        raise RemoteError(
            f"cluster {name} kept: {', '.join(how.failed)} did not confirm the teardown "
            "(its system file edits are still recorded)",
            hint=f"make the node reachable and run `llamacluster down --name {name} --purge` "
            "again, or add --force to forget the cluster anyway",
        )
    if purge:
        remove_state(name)
        reporter.print(f"cluster [cyan]{name}[/] purged")
        return None
    reporter.print(f"cluster [cyan]{name}[/] is down{' (Ray kept)' if keep_ray else ''}")
    return state


def status(name: str, *, console: Console | None = None) -> dict[str, object]:
    """Every stage's check, live: nodes, devices, storage, env, model, Ray, server, endpoint."""
    from cluster.stages.preflight import cpu_kernels_of

    reporter = Reporter(console)
    ctx = _context(RecordedCluster.load(name), reporter)
    state = ctx.state
    checks = {stage.name: stage.check(ctx) for stage in STAGES}
    reporter.print(f"cluster [cyan]{state.name}[/]{' (local)' if state.local else ''}")
    ray = checks["ray"].per_node
    for rec, node in zip(state.nodes, ctx.cluster, strict=False):
        kernels = cpu_kernels_of(rec)
        cpu = (
            f"cpu {rec.device_info.get('cpu_flags') or '-'} ({kernels.describe()}), "
            if kernels
            else ""
        )
        measured = state.measure.cpu.get(rec.name)
        if measured is not None:
            cpu += (
                f"measured read {measured.read_gbs:.1f} GB/s, {measured.dtype} matmul "
                f"{measured.matmul_tflops:.3g} TFLOP/s, "
            )
        reporter.node(
            rec.label,
            f"{rec.name}: {rec.private_ip} ({rec.interface}), {rec.devices} {rec.device_kind} "
            f"slot(s), {cpu}{rec.device_info.get('disk_free_gb', '?')} GiB free, "
            + ray.get(node.label, "ray stopped"),
            ok=ray.get(node.label, "").startswith("ray running"),
        )
    for stage in STAGES:
        check = checks[stage.name]
        if check.ok is None:
            continue
        mark = "[green]ok[/]" if check.ok else "[red]FAILED[/]"
        reporter.print(f"{stage.name + ':':<10}{mark} {escape(check.message)}")
    if state.ports:
        monitor = (
            f", monitor 127.0.0.1:{state.ports.monitor}" if state.ports.monitor is not None else ""
        )
        reporter.print(
            f"ports:    ray {state.ports.ray_gcs}, dashboard 127.0.0.1:{state.ports.dashboard}, "
            f"api {state.server.endpoint or state.ports.api}{monitor}"
        )
    from cluster.exposure import probe_cluster

    # Real connects from here to every node's public address on the recorded ports.
    findings, exposure = probe_cluster(state)
    for line in exposure:
        reporter.console.print(line, markup=False)
    return {
        "name": state.name,
        "checks": {k: {"ok": c.ok, "message": c.message} for k, c in checks.items()},
        "ray": {n.name: ray.get(n.label, "").startswith("ray running") for n in ctx.cluster},
        "ready": bool(checks["serve"].ok),
        "endpoint": state.server.endpoint,
        "exposed": [
            f"{f.target.node} {f.target.host}:{f.target.port} ({f.target.name})"
            for f in findings
            if f.state == "open"
        ],
    }


def exec_command(
    name: str,
    command: str,
    *,
    nodes: list[str] | None = None,
    timeout: float | None = None,
    console: Console | None = None,
) -> dict[str, Result]:
    """Run ``command`` on every node (or ``nodes``) with output prefixed by node; every Result."""
    runners = RecordedCluster.load(name).runners(nodes)
    results = run_on_nodes(
        runners, command, timeout=timeout, on_line=prefixed_printer(console), check=False
    )
    return {n.label: r for n, r in results.items()}


def logs(
    name: str, *, follow: bool = False, lines: int = 200, console: Console | None = None
) -> int:
    """Print (or follow) the server and engine logs from the head; returns the exit code."""
    from cluster.stages.ray import serve_logs_command

    state = load_state(name)
    temp_dir = state.ray.node("head").temp_dir
    if not temp_dir:
        raise ConfigError(
            f"cluster {name!r} has no Ray on record", hint="run `llamacluster up` first"
        )
    runner = RecordedCluster(state).head_runner()
    res = runner.run(
        serve_logs_command(temp_dir, follow=follow, lines=lines),
        on_line=prefixed_printer(console),
    )
    return res.returncode


def tunnel(name: str, *, show_secrets: bool = False) -> list[str]:
    """Lines to print: the ``ssh -L`` command for the API, the dashboard and the monitor (when
    it has a port), and where the dashboard token and the API key are (their values with
    ``show_secrets``)."""
    from cluster.monitor import TUNNEL_PORT, dashboard_url

    state = load_state(name)
    if not state.ports:
        raise ConfigError(
            f"cluster {name!r} has no ports on record", hint="run `llamacluster up` first"
        )
    p = state.ports
    # The monitor's port once the monitor stage has run (a skipped stage has nothing to show).
    monitor_port = p.monitor if state.monitoring.url else None
    lines = []
    scheme = (state.server.endpoint or "http://").split("://", 1)[0]
    if state.local:
        monitor = f", monitor http://127.0.0.1:{monitor_port}" if monitor_port else ""
        if monitor_port:
            monitor += f" (dashboards {dashboard_url(f'http://127.0.0.1:{monitor_port}')})"
        lines.append(
            f"local cluster: no tunnel needed; API {state.server.endpoint or f'http://127.0.0.1:{p.api}'}/v1, dashboard "
            f"http://127.0.0.1:{p.dashboard}{monitor}"
        )
    else:
        head = RecordedCluster(state).inventory.head
        from cluster.runner import ssh_argv
        from cluster.stages.serve import api_target_on_head

        # The API is bound to the head's private address (or --api-host), not its 127.0.0.1.
        api_at = api_target_on_head(state) if state.server.endpoint else f"127.0.0.1:{p.api}"
        forwards = ["-L", f"{p.api}:{api_at}", "-L", f"8265:127.0.0.1:{p.dashboard}"]
        if monitor_port:
            forwards += ["-L", f"{TUNNEL_PORT}:127.0.0.1:{monitor_port}"]
        # No ControlMaster for a tunnel a person keeps open: a plain, self-contained ssh.
        argv = ssh_argv(head, person_ssh(state), batch=False, extra_args=["-N", *forwards])
        lines.append(shlex.join(argv))
        monitor = f", monitor http://127.0.0.1:{TUNNEL_PORT}" if monitor_port else ""
        if monitor_port:
            monitor += f" (dashboards {dashboard_url(f'http://127.0.0.1:{TUNNEL_PORT}')})"
        lines.append(
            f"then: API {scheme}://127.0.0.1:{p.api}/v1, dashboard http://127.0.0.1:8265{monitor}"
        )
    token, key = state.secrets.ray_token, state.secrets.api_key_file
    lines.append(f"dashboard token: {token} (paste it into the dashboard's login dialog)")
    lines.append(f"API key:         {key}")
    if show_secrets:
        for label, path in (("dashboard token", token), ("API key", key)):
            try:
                lines.append(
                    f"{label} value: {Path(str(path)).read_text(encoding='utf-8').strip()}"
                )
            except OSError as exc:
                raise LlamaclusterError(f"cannot read {path}: {exc.strerror}") from None
    return lines
