"""Library entry points behind the CLI: up, down, status, exec, logs and tunnel for one cluster."""

from __future__ import annotations

import shlex
from pathlib import Path

from rich.console import Console

from cluster.errors import ConfigError, LlamaclusterError
from cluster.inventory import Cluster, load_inventory, local_cluster
from cluster.recorded import RecordedCluster, person_ssh, ssh_config_of
from cluster.runner import Result, Runner, prefixed_printer, run_on_nodes, runner_for
from cluster.stages import STAGES
from cluster.stages.base import Reporter, UpContext, print_plan, run_log_path, run_stages
from cluster.stages.config import UpConfig
from cluster.state import (
    API_KEY_FILE,
    TOKEN_FILE,
    ClusterState,
    cluster_dir,
    config_hash,
    default_cluster_name,
    ensure_private_dir,
    ensure_secret,
    find_state,
    load_state,
    remote_cluster_dir,
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
    name = config.name or default_cluster_name(None if config.local else inv_path)
    state = find_state(name) or ClusterState(name=name, local=config.local)
    if state.local != config.local:
        raise ConfigError(
            f"cluster {name!r} was brought up {'with' if state.local else 'without'} --local",
            hint="pass another --name, or `llamacluster down --purge` it first",
        )
    state.inventory_path, state.inventory_text = inv_path, inv_text
    state.ssh_user, state.ssh_port = config.ssh_user, config.ssh_port
    state.identity_file = str(config.identity_file) if config.identity_file else None
    state.known_hosts = str(config.known_hosts) if config.known_hosts else None
    state.strict_host_keys = config.strict_host_keys
    state.system_root = str(config.system_root)
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
    if config.model is not None:
        state.model = config.model
    elif state.model is None:
        if not config.local:
            raise ConfigError(
                "no --model given",
                hint="pass a hub repo id, e.g. --model meta-llama/Llama-3.1-70B-Instruct",
            )
        from cluster.demo_model import default_demo_model_dir, ensure_demo_model

        state.model = str(default_demo_model_dir() if dry_run else ensure_demo_model())
    state.revision = config.revision
    state.model_dir = model_dir_for(state.model, state.shared_dir, config.revision)
    if dry_run:
        return
    ensure_private_dir(cluster_dir(state.name))
    token, _ = ensure_secret(cluster_dir(state.name) / TOKEN_FILE)
    state.token_path = str(token)
    if config.api_key_file is not None:
        state.api_key_file = str(Path(config.api_key_file).absolute())
    else:
        key, _ = ensure_secret(cluster_dir(state.name) / API_KEY_FILE, prefix="sk-lc-")
        state.api_key_file = str(key)


def model_dir_for(model: str, shared_dir: str, revision: str | None) -> str:
    """Where the served model lives: a local directory as it is, else the download's target
    ``<shared>/models/<org>--<name>[@rev]`` (the same path the download stage fills)."""
    from cluster.stages.download import is_local_model, model_target

    if is_local_model(model):
        return str(Path(model).expanduser().absolute())
    return model_target(shared_dir, model, revision)


def up(config: UpConfig, *, console: Console | None = None) -> ClusterState:
    """Bring the cluster to the state ``config`` asks for, stage by stage; return its state.

    Every stage checks what is already there first, so a second call with the same config
    changes nothing. ``config.dry_run`` prints each stage's commands per node and runs nothing.
    """
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
    if state.endpoint:
        print_ready(state, reporter)
    return state


def print_ready(state: ClusterState, reporter: Reporter) -> None:
    """Endpoint, API key location, tunnel command, and curl / openai examples."""
    model = state.served_model_name or "<model>"
    base = f"{state.endpoint}/v1"
    local_base = f"http://127.0.0.1:{state.ports.api}/v1" if state.ports else base
    key = state.api_key_file
    reporter.print()
    reporter.print(
        f"[bold green]ready[/]: {base}  (model [cyan]{model}[/], tp={state.tp} × pp={state.pp})"
    )
    reporter.print(f"  API key:  {key}  (0600; never printed)")
    if not state.local:
        reporter.print(
            f"  tunnel:   llamacluster tunnel --name {state.name}   (then use {local_base})"
        )
    reporter.print(f"  status:   llamacluster status --name {state.name}")
    reporter.print("  curl:")
    reporter.console.print(
        f'    curl -s {base}/chat/completions -H "Authorization: Bearer $(cat {key})" '
        f"-H 'Content-Type: application/json' "
        f'-d \'{{"model": "{model}", "messages": [{{"role": "user", "content": "Hello"}}]}}\'',
        markup=False,
    )
    reporter.print("  python:")
    reporter.console.print(
        f"    from openai import OpenAI; from pathlib import Path\n"
        f'    client = OpenAI(base_url="{base}", api_key=Path("{key}").read_text().strip())\n'
        f'    print(client.chat.completions.create(model="{model}", messages=[{{"role": "user", "content": "Hello"}}]).choices[0].message.content)',
        markup=False,
    )


def _shutdown_serve(
    state: ClusterState, runners: list[Runner], *, drain_timeout: float, reporter: Reporter
) -> None:
    from cluster.stages.env import env_python
    from cluster.stages.serve import ray_driver_env, stop_call

    head = state.nodes[0] if state.nodes else None
    if (
        head is None
        or not state.env_dir
        or not state.ports
        or not state.remote_token_path
        or not state.serve_config_hash
    ):
        return
    reply = stop_call(env_python(state.env_dir), f"{head.private_ip}:{state.ports.ray_gcs}").run(
        runners[0].run,
        env=ray_driver_env(head.token_path or state.remote_token_path),
        timeout=drain_timeout + 60,
    )
    if reply.ok:
        reporter.info(f"server drained and stopped on {head.label}")
    else:
        reporter.warn(
            f"could not stop the server cleanly on {head.label}: {reply.error} (Ray is stopped next)"
        )
    state.serve_config_hash = None
    state.endpoint = None


def down(
    name: str,
    *,
    keep_ray: bool = False,
    purge: bool = False,
    drain_timeout: float = 30.0,
    console: Console | None = None,
) -> ClusterState | None:
    """Drain the server, stop exactly this cluster's Ray processes on every node (by their
    recorded process groups), and with ``purge`` revert the fstab/cachefilesd edits and forget
    the cluster. Returns the remaining state (None after a purge)."""
    from cluster.stages.ray import stop_ray

    reporter = Reporter(console)
    recorded = RecordedCluster.load(name)
    state, cluster, runners = recorded.state, recorded.inventory, recorded.runners()
    _shutdown_serve(state, runners, drain_timeout=drain_timeout, reporter=reporter)
    if not keep_ray:
        stop_ray(state, cluster, runners, reporter=reporter)
    state.stages = {}
    state.save()
    if purge:
        _purge(state, cluster, runners, reporter=reporter)
        remove_state(name)
        reporter.print(f"cluster [cyan]{name}[/] purged")
        return None
    reporter.print(f"cluster [cyan]{name}[/] is down{' (Ray kept)' if keep_ray else ''}")
    return state


def _purge(
    state: ClusterState, cluster: Cluster, runners: list[Runner], *, reporter: Reporter
) -> None:
    from cluster import fscache

    for runner in runners:
        rec = state.node(runner.node.name)
        if rec is None:
            continue
        if state.fs_edits.get(rec.name):
            sudo = rec.sudo or "" if state.system_root == "/" else ""
            res = runner.run(
                fscache.script_command(
                    "revert", "--root", state.system_root, python=rec.python or "python3", sudo=sudo
                ),
                stdin=fscache.script_source(),
                timeout=60,
            )
            if not res.ok:
                reporter.warn(f"{runner.label}: could not revert system files: {res.tail(1)}")
            else:
                reporter.node(runner.label, "fstab/cachefilesd restored from backups")
        runner.run(f"rm -rf {shlex.quote(remote_cluster_dir(state, rec.name))}", timeout=30)


def status(name: str, *, console: Console | None = None) -> dict[str, object]:
    """Nodes, devices, Ray and server state, model, endpoint and disk, checked live."""
    from cluster.stages.preflight import cpu_kernels_of
    from cluster.stages.ray import ray_alive_command

    reporter = Reporter(console)
    recorded = RecordedCluster.load(name)
    state, runners = recorded.state, recorded.runners()
    alive: dict[str, bool] = {}
    for runner in runners:
        rec = state.node(runner.node.name)
        if rec is None or rec.ray_session is None:
            alive[runner.node.name] = False
            continue
        alive[runner.node.name] = runner.run(ray_alive_command(rec.ray_session), timeout=30).ok
    ready = False
    if state.ports and state.env_dir:
        from cluster.stages.env import env_python
        from cluster.stages.serve import ready_probe

        probe = ready_probe(env_python(state.env_dir), f"http://127.0.0.1:{state.ports.api}")
        ready = probe.run(runners[0].run, timeout=30).ok
    reporter.print(f"cluster [cyan]{state.name}[/]{' (local)' if state.local else ''}")
    for rec in state.nodes:
        kernels = cpu_kernels_of(rec)
        cpu = (
            f"cpu {rec.device_info.get('cpu_flags') or '-'} ({kernels.describe()}), "
            if kernels
            else ""
        )
        reporter.node(
            rec.label,
            f"{rec.name}: {rec.private_ip} ({rec.interface}), {rec.devices} {rec.device_kind} slot(s), "
            + cpu
            + f"{rec.device_info.get('disk_free_gb', '?')} GiB free, "
            f"ray {'running' if alive.get(rec.name) else 'stopped'}"
            + (f" (session {rec.ray_session})" if rec.ray_session else ""),
            ok=alive.get(rec.name, False),
        )
    reporter.print(f"model:    {state.served_model_name or state.model} ({state.model_dir})")
    reporter.print(f"layout:   tp={state.tp} × pp={state.pp}")
    reporter.print(f"endpoint: {state.endpoint or '-'}/v1  ({'ready' if ready else 'not ready'})")
    if state.ports:
        reporter.print(
            f"ports:    ray {state.ports.ray_gcs}, dashboard 127.0.0.1:{state.ports.dashboard}, api {state.ports.api}"
        )
    return {"name": state.name, "ray": alive, "ready": ready, "endpoint": state.endpoint}


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
    head = state.node("head")
    if head is None or not head.ray_temp_dir:
        raise ConfigError(
            f"cluster {name!r} has no Ray on record", hint="run `llamacluster up` first"
        )
    runner = RecordedCluster(state).head_runner()
    res = runner.run(
        serve_logs_command(head.ray_temp_dir, follow=follow, lines=lines),
        on_line=prefixed_printer(console),
    )
    return res.returncode


def tunnel(name: str, *, show_secrets: bool = False) -> list[str]:
    """Lines to print: the ``ssh -L`` command for the API and the dashboard, and where the
    dashboard token and the API key are (their values with ``show_secrets``)."""
    state = load_state(name)
    if not state.ports:
        raise ConfigError(
            f"cluster {name!r} has no ports on record", hint="run `llamacluster up` first"
        )
    p = state.ports
    lines = []
    if state.local:
        lines.append(
            f"local cluster: no tunnel needed; API http://127.0.0.1:{p.api}/v1, dashboard http://127.0.0.1:{p.dashboard}"
        )
    else:
        head = RecordedCluster(state).inventory.head
        from cluster.runner import ssh_argv

        # No ControlMaster for a tunnel a person keeps open: a plain, self-contained ssh.
        argv = ssh_argv(
            head,
            person_ssh(state),
            batch=False,
            extra_args=[
                "-N",
                "-L",
                f"{p.api}:127.0.0.1:{p.api}",
                "-L",
                f"8265:127.0.0.1:{p.dashboard}",
            ],
        )
        lines.append(shlex.join(argv))
        lines.append(f"then: API http://127.0.0.1:{p.api}/v1, dashboard http://127.0.0.1:8265")
    lines.append(
        f"dashboard token: {state.token_path} (paste it into the dashboard's login dialog)"
    )
    lines.append(f"API key:         {state.api_key_file}")
    if show_secrets:
        for label, path in (("dashboard token", state.token_path), ("API key", state.api_key_file)):
            try:
                lines.append(
                    f"{label} value: {Path(str(path)).read_text(encoding='utf-8').strip()}"
                )
            except OSError as exc:
                raise LlamaclusterError(f"cannot read {path}: {exc.strerror}") from None
    return lines
