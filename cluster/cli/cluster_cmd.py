"""`llamacluster up/down/status/exec/logs/tunnel`: thin commands over cluster.lifecycle."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from pydantic import ValidationError

from cluster.cli.app import app
from cluster.cli.options import cluster_name, ips_option, local_option, name_option
from cluster.errors import ConfigError, RemoteError, flag_of, validation_error
from cluster.stages.config import UpConfig


def _opt(field: str, *aliases: str, hidden: bool = False, default: object = ...) -> Any:
    """A `up` option from UpConfig's field: its flag, default and help come from the model."""
    info = UpConfig.model_fields[field]
    if default is ...:
        default = [] if info.default_factory is not None else info.default
    return typer.Option(
        default, flag_of(UpConfig, field), *aliases, help=info.description, hidden=hidden
    )


@app.command()
def up(
    ips: Path | None = _opt("inventory", "--inventory"),
    local: bool = _opt("local"),
    name: str | None = _opt("name"),
    model: list[str] = typer.Option(
        [],
        "--model",
        help=UpConfig.model_fields["model"].description
        + " Repeat it to serve several models behind the one endpoint: "
        + (UpConfig.model_fields["more_models"].description or ""),
    ),
    revision: str | None = _opt("revision"),
    served_model_name: list[str] = _opt("served_model_name"),
    lora: list[str] = _opt("lora"),
    tp: int | None = _opt("tp", "--tensor-parallel-size", "-tp"),
    pp: int | None = _opt("pp", "--pipeline-parallel-size", "-pp"),
    replicas: str = _opt("num_replicas"),
    routing: str = _opt("routing"),
    max_model_len: int | None = _opt("max_model_len"),
    gpu_memory_utilization: float | None = _opt("gpu_memory_utilization"),
    engine_arg: list[str] = _opt("engine_args"),
    quantization: str | None = _opt("quantization"),
    speculative_config: str | None = _opt("speculative_config"),
    kv_offload_gb: float | None = _opt("kv_offload_gb"),
    shared_dir: Path | None = _opt("shared_dir"),
    env: Path | None = _opt("env"),
    nfs_server: str = _opt("nfs_server"),
    device: str = _opt("device"),
    cpu_slots: int | None = _opt("cpu_slots"),
    cpu_kvcache_gb: int | None = _opt("cpu_kvcache_gb"),
    cpu_threads: int | None = _opt("cpu_threads"),
    cache_dir: str = _opt("cache_dir"),
    ssh_user: str | None = _opt("ssh_user"),
    ssh_port: int | None = _opt("ssh_port"),
    ssh_key: Path | None = _opt("identity_file"),
    known_hosts: Path | None = _opt("known_hosts"),
    strict_host_keys: bool = _opt("strict_host_keys"),
    ray_port: int = _opt("ray_port"),
    dashboard_port: int = _opt("dashboard_port"),
    api_port: int = _opt("api_port"),
    api_key_file: Path | None = _opt("api_key_file"),
    api_host: str | None = _opt("api_host"),
    tls: str | None = _opt("tls"),
    tls_cert: Path | None = _opt("tls_cert"),
    tls_key: Path | None = _opt("tls_key"),
    monitor_port: int = _opt("monitor_port"),
    monitor_retention_time: str = _opt("monitor_retention_time"),
    monitor_retention_size: str = _opt("monitor_retention_size"),
    ready_timeout: float = _opt("ready_timeout_s"),
    stall_timeout: float = _opt("stall_timeout_s"),
    restart_attempts: int = _opt("restart_max_attempts"),
    request_timeout: float | None = _opt("request_timeout_s"),
    stream_idle_timeout: float | None = _opt("stream_idle_timeout_s"),
    header_timeout: float = _opt("header_timeout_s"),
    max_connections: int = _opt("max_connections"),
    max_n: int = _opt("max_n"),
    max_tokens_limit: int = _opt("max_tokens_limit"),
    allowed_media_domains: list[str] = _opt("allowed_media_domains"),
    admin_key_file: Path | None = _opt("admin_key_file"),
    on_node_loss: str = _opt("on_node_loss"),
    supervise: bool = _opt("supervise"),
    system_root: Path = _opt("system_root", hidden=True),
    skip: list[str] = _opt("skip"),
    dry_run: bool = _opt("dry_run"),
    verbose: bool = _opt("verbose", "-v"),
    wait: bool = _opt("wait"),
) -> None:
    """Bring a cluster up: preflight, storage, cache, env, download, ray, serve, ready, monitor.

    vLLM's own spellings work too (--tensor-parallel-size/-tp, --pipeline-parallel-size/-pp, --max-model-len, --served-model-name, --gpu-memory-utilization); any other vLLM engine argument passes through with --engine-arg KEY=VALUE.
    """
    from cluster.cli.serve_cmd import parse_engine_args
    from cluster.lifecycle import up as do_up
    from cluster.planner.engine_options import parse_speculative_config

    first = _first_model(model, served_model_name, lora, tp, pp, replicas, max_model_len)
    model, served_model_name, lora, tp, pp, replicas, max_model_len = first
    try:
        config = UpConfig(
            name=name, inventory=None if local else (ips or Path("deploy/ips.txt")), local=local,
            ssh_user=ssh_user, ssh_port=ssh_port, identity_file=ssh_key, known_hosts=known_hosts,
            strict_host_keys=strict_host_keys, model=model[0] if model else None,
            more_models=model[1:], revision=revision,
            served_model_name=served_model_name, lora=lora, tp=tp, pp=pp, num_replicas=replicas, routing=routing,
            shared_dir=shared_dir, env=env,
            nfs_server=nfs_server, system_root=system_root, cache_dir=cache_dir, device=device, cpu_slots=cpu_slots,
            ray_port=ray_port, dashboard_port=dashboard_port, api_port=api_port,
            api_key_file=api_key_file, monitor_port=monitor_port,
            api_host=api_host, tls=tls, tls_cert=tls_cert, tls_key=tls_key,
            monitor_retention_time=monitor_retention_time,
            monitor_retention_size=monitor_retention_size, max_model_len=max_model_len,
            gpu_memory_utilization=gpu_memory_utilization, cpu_kvcache_gb=cpu_kvcache_gb,
            cpu_threads=cpu_threads,
            engine_args=parse_engine_args(engine_arg), quantization=quantization,
            speculative_config=parse_speculative_config(speculative_config) if speculative_config else None,
            kv_offload_gb=kv_offload_gb,
            ready_timeout_s=ready_timeout, stall_timeout_s=stall_timeout,
            restart_max_attempts=restart_attempts, request_timeout_s=request_timeout,
            stream_idle_timeout_s=stream_idle_timeout, header_timeout_s=header_timeout,
            max_connections=max_connections, max_n=max_n, max_tokens_limit=max_tokens_limit,
            allowed_media_domains=allowed_media_domains, admin_key_file=admin_key_file,
            on_node_loss=on_node_loss,
            supervise=supervise, skip=skip, dry_run=dry_run, verbose=verbose, wait=wait,
        )  # fmt: skip
    except ValidationError as exc:
        raise validation_error(exc, UpConfig) from None
    do_up(config)


def _first_model(
    models: list[str],
    served_model_name: list[str],
    lora: list[str],
    tp: int | None,
    pp: int | None,
    replicas: str,
    max_model_len: int | None,
) -> tuple:
    """The first ``--model`` value's own options (name=, tp=, ...: as for the further ones)
    applied to its flags; an option given both ways is refused."""
    if not models or "," not in models[0]:
        return models, served_model_name, lora, tp, pp, replicas, max_model_len
    from serve.models import parse_model_spec

    spec = parse_model_spec(models[0])
    given = {
        "served_model_name": ("--served-model-name", served_model_name),
        "tp": ("--tp", tp),
        "pp": ("--pp", pp),
        "max_model_len": ("--max-model-len", max_model_len),
    }
    for key, (flag, value) in given.items():
        if key in spec and value:
            raise ConfigError(
                f"the first --model sets {key.replace('_', '-')} and {flag} is given too",
                hint="give it once",
            )
    if "num_replicas" in spec and str(replicas) != str(
        UpConfig.model_fields["num_replicas"].default
    ):
        raise ConfigError(
            "the first --model sets replicas and --replicas is given too", hint="give it once"
        )
    return (
        [spec["model"], *models[1:]],
        spec.get("served_model_name", served_model_name),
        [*lora, *spec.get("lora_modules", [])],
        spec.get("tp", tp),
        spec.get("pp", pp),
        str(spec.get("num_replicas", replicas)),
        spec.get("max_model_len", max_model_len),
    )


@app.command()
def down(
    name: str | None = name_option(),
    ips: Path | None = ips_option(),
    local: bool = local_option(),
    keep_ray: bool = typer.Option(
        False, "--keep-ray", help="Stop the server only; keep Ray running."
    ),
    purge: bool = typer.Option(
        False, "--purge", help="Also revert fstab/exports/cachefilesd and forget the cluster."
    ),
    drain_timeout: float = typer.Option(
        30.0, "--drain-timeout", help="Seconds running requests get."
    ),
    wait: bool = typer.Option(
        False, "--wait", help="When an `up` or `down` holds this cluster, wait for it."
    ),
    force: bool = typer.Option(
        False,
        "--force",
        help="With --purge: forget the cluster even when a node did not confirm its teardown.",
    ),
) -> None:
    """Drain the server, stop exactly this cluster's Ray processes on every node."""
    from cluster.lifecycle import down as do_down

    do_down(
        cluster_name(name, ips, local),
        keep_ray=keep_ray,
        purge=purge,
        drain_timeout=drain_timeout,
        wait=wait,
        force=force,
    )


@app.command()
def status(
    name: str | None = name_option(),
    ips: Path | None = ips_option(),
    local: bool = local_option(),
) -> None:
    """Nodes, devices, Ray and server state, model, endpoint, disk."""
    from cluster.lifecycle import status as do_status

    info = do_status(cluster_name(name, ips, local))
    if not info["ready"]:
        raise typer.Exit(5)


@app.command("exec")
def exec_(
    command: list[str] = typer.Argument(..., help="Command to run (after --)."),
    nodes: list[str] = typer.Option(
        [], "--nodes", help="Only these nodes (head, worker1, host...)."
    ),
    name: str | None = name_option(),
    ips: Path | None = ips_option(),
    local: bool = local_option(),
    timeout: float | None = typer.Option(
        None, "--timeout", help="Seconds before the command is killed."
    ),
) -> None:
    """Run a command on every node (or --nodes), output prefixed by node."""
    from cluster.lifecycle import exec_command
    from cluster.runner import shell_join

    text = command[0] if len(command) == 1 else shell_join(command)
    results = exec_command(
        cluster_name(name, ips, local),
        text,
        nodes=[n for x in nodes for n in x.split(",")] or None,
        timeout=timeout,
    )
    failed = [f"{label} (exit {r.returncode})" for label, r in results.items() if not r.ok]
    if failed:
        raise RemoteError(f"command failed on {', '.join(failed)}")


@app.command()
def logs(
    name: str | None = name_option(),
    ips: Path | None = ips_option(),
    local: bool = local_option(),
    follow: bool = typer.Option(False, "-f", "--follow", help="Keep printing new lines."),
    lines: int = typer.Option(200, "-n", "--lines", help="Lines from the end."),
    replica: int | None = typer.Option(
        None,
        "--replica",
        min=1,
        help="Only replica N (numbered as `status` lists them): its Serve log and process "
        "output, from the node it runs on.",
    ),
) -> None:
    """Server and engine logs from the head (or one replica's with --replica)."""
    from cluster.lifecycle import logs as do_logs

    if replica is not None:
        from cluster.stages.serve import replica_logs

        rc = replica_logs(cluster_name(name, ips, local), replica, follow=follow, lines=lines)
    else:
        rc = do_logs(cluster_name(name, ips, local), follow=follow, lines=lines)
    if rc:
        raise typer.Exit(rc)


@app.command()
def tunnel(
    name: str | None = name_option(),
    ips: Path | None = ips_option(),
    local: bool = local_option(),
    show_secrets: bool = typer.Option(
        False, "--show-secrets", help="Also print the token and the API key."
    ),
) -> None:
    """The ssh -L command for the API, the dashboard (8265) and the monitor (9090), and where the secrets are."""
    from cluster.lifecycle import tunnel as do_tunnel

    for line in do_tunnel(cluster_name(name, ips, local), show_secrets=show_secrets):
        typer.echo(line)
