"""`llamacluster download` and `llamacluster verify`: fetch a model across the nodes, check it."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from cluster.cli.app import app


def _runners(ips: Path, *, local: bool, ssh_user: str | None, ssh_key: Path | None) -> list:
    from cluster.inventory import load_inventory, local_cluster, with_local
    from cluster.runner import runner_for

    if local and not ips.exists():
        cluster = local_cluster()
    else:
        cluster = load_inventory(ips, default_user=ssh_user, identity_file=ssh_key)
        if local:
            cluster = with_local(cluster)
    return [runner_for(node) for node in cluster]


def print_plan(plan, *, console) -> None:
    """The per-node plan: files and bytes per node, then each node's files."""
    from rich.table import Table

    from cluster.download.progress import format_bytes

    table = Table(title=f"{plan.repo} @ {plan.commit[:12]} ({plan.revision})", show_lines=False)
    table.add_column("node")
    table.add_column("files", justify="right")
    table.add_column("bytes", justify="right")
    table.add_column("share", justify="right")
    total = max(plan.total_bytes, 1)
    for a in plan.nodes:
        table.add_row(
            a.node,
            str(len(a.files)),
            format_bytes(a.total_bytes),
            f"{100 * a.total_bytes / total:.1f}%",
        )
    table.add_row("all", str(len(plan.files)), format_bytes(plan.total_bytes), "100%")
    console.print(table)
    for a in plan.nodes:
        console.print(f"[bold]{a.node}[/]")
        for f in a.files:
            console.print(f"  {format_bytes(f.size):>10}  {f.path}", highlight=False)
    if plan.excluded:
        console.print(f"excluded by patterns: {', '.join(plan.excluded)}", highlight=False)


@app.command("download")
def download(
    repo: str = typer.Argument(..., help="Hub repository id, e.g. meta-llama/Llama-3.1-8B."),
    target: Path = typer.Option(
        ..., "--target", "-t", help="Model directory on the filesystem all nodes share."
    ),
    ips: Path = typer.Option(
        Path("deploy/ips.txt"),
        "--ips",
        "--inventory",
        help="Inventory: one node a line, head first.",
    ),
    local: bool = typer.Option(
        False, "--local", help="Run on this machine (every inventory node as a local process)."
    ),
    revision: str | None = typer.Option(None, "--revision", help="Branch, tag or commit."),
    include: list[str] = typer.Option([], "--include", help="Only files matching (repeatable)."),
    exclude: list[str] = typer.Option([], "--exclude", help="Skip files matching (repeatable)."),
    downloader: str = typer.Option(
        "hf_transfer", "--downloader", help="hf_transfer (default) or hub (huggingface_hub's own)."
    ),
    jobs: int = typer.Option(2, "--jobs", help="Files fetched at once on each node."),
    connections: int = typer.Option(8, "--connections", help="hf_transfer connections per file."),
    stall_timeout: float = typer.Option(
        60.0,
        "--stall-timeout",
        help="Seconds without a byte before a transfer is killed and retried (0: never).",
    ),
    wait: bool = typer.Option(
        False, "--wait", help="Queue behind another download into the same --target."
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the per-node plan and stop."),
    warm: bool = typer.Option(
        False, "--warm", help="Afterwards, every node reads the weights into its page cache."
    ),
    python: str = typer.Option(
        sys.executable, "--python", help="Python with llamacluster installed, on every node."
    ),
    ssh_user: str | None = typer.Option(None, "--ssh-user", help="Default SSH user."),
    ssh_key: Path | None = typer.Option(None, "--ssh-key", help="SSH private key."),
    token: str | None = typer.Option(
        None,
        "--token",
        envvar="HF_TOKEN",
        show_default=False,
        help="Hub token; prefer the HF_TOKEN environment variable (a flag shows in ps).",
    ),
) -> None:
    """Fetch one commit of a model into a shared directory, bytes balanced over the nodes."""
    from rich.console import Console

    from cluster.download.controller import download_model
    from cluster.download.node import FetchSettings
    from cluster.download.plan import plan_download
    from cluster.download.progress import ClusterProgress, ProgressView, format_bytes
    from cluster.errors import ConfigError

    if downloader not in ("hf_transfer", "hub"):
        raise ConfigError(f"unknown downloader {downloader!r}", hint="use hf_transfer or hub")
    console = Console(highlight=False, emoji=False)
    runners = _runners(ips, local=local, ssh_user=ssh_user, ssh_key=ssh_key)
    if token is None:
        from huggingface_hub import get_token

        token = get_token()
    if dry_run:
        plan = plan_download(
            repo,
            nodes=[r.node.name for r in runners],
            revision=revision,
            include=include,
            exclude=exclude,
            token=token,
        )
        print_plan(plan, console=console)
        return
    settings = FetchSettings(
        downloader=downloader,  # type: ignore[arg-type]
        jobs=jobs,
        connections=connections,
        stall_timeout_s=stall_timeout,
    )
    view: ProgressView | None = None

    def on_plan(plan) -> None:
        nonlocal view
        view = ProgressView(ClusterProgress(plan), console=console)
        view.__enter__()

    def on_event(event: dict) -> None:
        if view is not None:
            view.state.apply(event)
            view.refresh()

    try:
        result = download_model(
            repo,
            target=str(target.absolute()),
            runners=runners,
            python=python,
            revision=revision,
            include=include,
            exclude=exclude,
            settings=settings,
            token=token,
            warm=warm,
            on_event=on_event,
            on_plan=on_plan,
            command=f"download {repo}",
            wait=wait,
            on_wait=lambda line: console.print(line, style="yellow"),
        )
    finally:
        if view is not None:
            view.__exit__(None, None, None)
    fetched = result.fetched_bytes
    rate = fetched / result.seconds if result.seconds > 0 else 0.0
    manifest = result.manifest
    assert manifest is not None
    console.print(
        f"[green]done:[/] {repo}@{manifest.commit[:12]} in {target}: {len(manifest.files)} files, "
        f"{format_bytes(manifest.total_bytes)} verified; fetched {format_bytes(fetched)} in "
        f"{result.seconds:.1f} s ({format_bytes(rate)}/s); manifest {target / 'manifest.json'}"
    )
    if result.warm:
        read = sum(int(s.get("bytes", 0)) for s in result.warm.values())
        console.print(f"warmed: {format_bytes(read)} read across {len(result.warm)} node(s)")


@app.command("verify")
def verify(
    model_dir: Path = typer.Argument(..., help="Model directory with a manifest.json."),
    jobs: int = typer.Option(4, "--jobs", help="Files hashed at once."),
) -> None:
    """Re-hash every file of a downloaded model against its manifest; name any bad file."""
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    from cluster.download.manifest import load_manifest, verify_model_dir
    from cluster.download.progress import format_bytes
    from cluster.errors import DownloadError

    console = Console(highlight=False, stderr=True, emoji=False)
    total = load_manifest(model_dir).total_bytes
    with Progress(
        TextColumn("verify"),
        BarColumn(),
        DownloadColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    ) as bar:
        task = bar.add_task("verify", total=max(total, 1))
        manifest, bad = verify_model_dir(
            model_dir, on_file=lambda _path, size: bar.advance(task, size), jobs=jobs
        )
    for b in bad:
        console.print(f"[red]bad:[/] {b.path}: {b.reason}")
    if bad:
        names = ", ".join(b.path for b in bad)
        raise DownloadError(
            f"{len(bad)} of {len(manifest.files)} file(s) in {model_dir} failed verification: {names}",
            hint=f"delete them, then run `llamacluster download {manifest.repo} --target "
            f"{model_dir}` again to fetch only those",
        )
    typer.echo(
        f"ok: {len(manifest.files)} files, {format_bytes(manifest.total_bytes)} of "
        f"{manifest.repo}@{manifest.commit[:12]} verified"
    )
