"""`llamacluster up/down/status/exec/logs/tunnel`: thin commands over cluster.lifecycle."""

from __future__ import annotations

from pathlib import Path

import typer
from pydantic import ValidationError

from cluster.cli.app import app
from cluster.errors import ConfigError, RemoteError

NAME_HELP = "Cluster name (default: from --ips, or 'local' with --local)."


def _name(name: str | None, ips: Path | None, local: bool) -> str:
    from cluster.state import default_cluster_name

    if name:
        return name
    if local:
        return "local"
    return default_cluster_name(Path(ips or "deploy/ips.txt").absolute())


@app.command()
def up(
    ips: Path | None = typer.Option(
        None, "--ips", "--inventory", help="Inventory file, head first (default deploy/ips.txt)."
    ),
    local: bool = typer.Option(
        False, "--local", help="This machine alone, no SSH (demo model by default)."
    ),
    name: str | None = typer.Option(None, "--name", help=NAME_HELP),
    model: str | None = typer.Option(None, "--model", help="Hub repo id or a model directory."),
    revision: str | None = typer.Option(None, "--revision", help="Hub revision."),
    served_model_name: str | None = typer.Option(
        None, "--served-model-name", help="Name clients send."
    ),
    tp: int | None = typer.Option(None, "--tp", help="Tensor parallel size (default: planner)."),
    pp: int | None = typer.Option(None, "--pp", help="Pipeline parallel size (default: planner)."),
    shared_dir: Path | None = typer.Option(
        None, "--shared-dir", help="Directory every node shares (NFS)."
    ),
    env: Path | None = typer.Option(
        None, "--env", help="Reuse this Python env (with vLLM, Ray) on every node."
    ),
    nfs_server: str = typer.Option(
        "provider", "--nfs-server", help="provider (already mounted) or head."
    ),
    device: str = typer.Option("auto", "--device", help="auto, gpu or cpu."),
    cpu_slots: int | None = typer.Option(
        None, "--cpu-slots", help="CPU worker slots per CPU node."
    ),
    ssh_user: str | None = typer.Option(
        None, "--ssh-user", help="SSH user for nodes that name none."
    ),
    ssh_port: int | None = typer.Option(
        None, "--ssh-port", help="SSH port for nodes that name none."
    ),
    ssh_key: Path | None = typer.Option(None, "--ssh-key", help="SSH private key."),
    known_hosts: Path | None = typer.Option(None, "--known-hosts", help="Known-hosts file."),
    strict_host_keys: bool = typer.Option(
        False, "--strict-host-keys", help="Refuse unknown host keys."
    ),
    ray_port: int = typer.Option(6379, "--ray-port", help="Ray GCS port (0: a free one)."),
    dashboard_port: int = typer.Option(8265, "--dashboard-port", help="Dashboard port (0: free)."),
    api_port: int = typer.Option(8000, "--api-port", help="API port (0: a free one)."),
    api_key_file: Path | None = typer.Option(
        None, "--api-key-file", help="API key file (0600); default: generated."
    ),
    max_model_len: int | None = typer.Option(None, "--max-model-len", help="Context length."),
    cpu_kvcache_gb: int | None = typer.Option(
        None, "--cpu-kvcache-gb", help="KV cache GiB per CPU worker."
    ),
    ready_timeout: float = typer.Option(
        900.0, "--ready-timeout", help="Seconds to wait for /ready."
    ),
    system_root: Path = typer.Option(
        Path("/"),
        "--system-root",
        hidden=True,
        help="Edit system files under this root only (tests).",
    ),
    skip: list[str] = typer.Option([], "--skip", help="Skip a stage (repeatable)."),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Print every stage's commands per node; run nothing."
    ),
    verbose: bool = typer.Option(False, "-v", "--verbose", help="Show commands and their output."),
) -> None:
    """Bring a cluster up: preflight, storage, cache, env, download, ray, serve, ready."""
    from cluster.lifecycle import UpConfig
    from cluster.lifecycle import up as do_up

    try:
        config = UpConfig(
            name=name, inventory=None if local else (ips or Path("deploy/ips.txt")), local=local,
            ssh_user=ssh_user, ssh_port=ssh_port, identity_file=ssh_key, known_hosts=known_hosts,
            strict_host_keys=strict_host_keys, model=model, revision=revision,
            served_model_name=served_model_name, tp=tp, pp=pp, shared_dir=shared_dir, env=env,
            nfs_server=nfs_server, system_root=system_root, device=device, cpu_slots=cpu_slots,
            ray_port=ray_port, dashboard_port=dashboard_port, api_port=api_port,
            api_key_file=api_key_file, max_model_len=max_model_len, cpu_kvcache_gb=cpu_kvcache_gb,
            ready_timeout_s=ready_timeout, skip=skip, dry_run=dry_run, verbose=verbose,
        )  # fmt: skip
    except ValidationError as exc:
        err = exc.errors()[0]
        raise ConfigError(f"--{'-'.join(str(p) for p in err['loc'])}: {err['msg']}") from None
    do_up(config)


@app.command()
def down(
    name: str | None = typer.Option(None, "--name", help=NAME_HELP),
    ips: Path | None = typer.Option(
        None, "--ips", "--inventory", help="Inventory the cluster was started from."
    ),
    local: bool = typer.Option(False, "--local", help="The --local cluster."),
    keep_ray: bool = typer.Option(
        False, "--keep-ray", help="Stop the server only; keep Ray running."
    ),
    purge: bool = typer.Option(
        False, "--purge", help="Also revert fstab/cachefilesd and forget the cluster."
    ),
    drain_timeout: float = typer.Option(
        30.0, "--drain-timeout", help="Seconds running requests get."
    ),
) -> None:
    """Drain the server, stop exactly this cluster's Ray processes on every node."""
    from cluster.lifecycle import down as do_down

    do_down(_name(name, ips, local), keep_ray=keep_ray, purge=purge, drain_timeout=drain_timeout)


@app.command()
def status(
    name: str | None = typer.Option(None, "--name", help=NAME_HELP),
    ips: Path | None = typer.Option(None, "--ips", "--inventory", help="Inventory of the cluster."),
    local: bool = typer.Option(False, "--local", help="The --local cluster."),
) -> None:
    """Nodes, devices, Ray and server state, model, endpoint, disk."""
    from cluster.lifecycle import status as do_status

    info = do_status(_name(name, ips, local))
    if not info["ready"]:
        raise typer.Exit(5)


@app.command("exec")
def exec_(
    command: list[str] = typer.Argument(..., help="Command to run (after --)."),
    nodes: list[str] = typer.Option(
        [], "--nodes", help="Only these nodes (head, worker1, host...)."
    ),
    name: str | None = typer.Option(None, "--name", help=NAME_HELP),
    ips: Path | None = typer.Option(None, "--ips", "--inventory", help="Inventory of the cluster."),
    local: bool = typer.Option(False, "--local", help="The --local cluster."),
    timeout: float | None = typer.Option(
        None, "--timeout", help="Seconds before the command is killed."
    ),
) -> None:
    """Run a command on every node (or --nodes), output prefixed by node."""
    from cluster.lifecycle import exec_command
    from cluster.runner import shell_join

    text = command[0] if len(command) == 1 else shell_join(command)
    results = exec_command(
        _name(name, ips, local),
        text,
        nodes=[n for x in nodes for n in x.split(",")] or None,
        timeout=timeout,
    )
    failed = [f"{label} (exit {r.returncode})" for label, r in results.items() if not r.ok]
    if failed:
        raise RemoteError(f"command failed on {', '.join(failed)}")


@app.command()
def logs(
    name: str | None = typer.Option(None, "--name", help=NAME_HELP),
    ips: Path | None = typer.Option(None, "--ips", "--inventory", help="Inventory of the cluster."),
    local: bool = typer.Option(False, "--local", help="The --local cluster."),
    follow: bool = typer.Option(False, "-f", "--follow", help="Keep printing new lines."),
    lines: int = typer.Option(200, "-n", "--lines", help="Lines from the end."),
) -> None:
    """Server and engine logs from the head."""
    from cluster.lifecycle import logs as do_logs

    rc = do_logs(_name(name, ips, local), follow=follow, lines=lines)
    if rc:
        raise typer.Exit(rc)


@app.command()
def tunnel(
    name: str | None = typer.Option(None, "--name", help=NAME_HELP),
    ips: Path | None = typer.Option(None, "--ips", "--inventory", help="Inventory of the cluster."),
    local: bool = typer.Option(False, "--local", help="The --local cluster."),
    show_secrets: bool = typer.Option(
        False, "--show-secrets", help="Also print the token and the API key."
    ),
) -> None:
    """The ssh -L command for the API and the dashboard (8265), and where the secrets are."""
    from cluster.lifecycle import tunnel as do_tunnel

    for line in do_tunnel(_name(name, ips, local), show_secrets=show_secrets):
        typer.echo(line)
