"""`llamacluster keys list|add|revoke|rotate`: named API keys, applied to the running server live."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from cluster.cli.app import app, err_console, table_console
from cluster.cli.options import cluster_name, ips_option, local_option, name_option

if TYPE_CHECKING:
    from cluster.recorded import RecordedCluster

keys_app = typer.Typer(
    help="List, add, revoke and rotate the API keys of a cluster (or of a --key-file). The running "
    "server applies a change within seconds, without a redeploy.",
    no_args_is_help=True,
)
app.add_typer(keys_app, name="keys")


def _key_file_option() -> Any:
    return typer.Option(
        None,
        "--key-file",
        help="Edit this key file (0600, one key a line) instead of a recorded cluster's.",
    )


def _target(
    name: str | None, ips: Path | None, local: bool, key_file: Path | None
) -> tuple[Path, RecordedCluster | None]:
    """(the key file to edit, the recorded cluster whose server must hear of it, or None)."""
    from cluster.errors import ConfigError
    from cluster.recorded import RecordedCluster

    if key_file is not None:
        return key_file.expanduser().absolute(), None
    cluster = RecordedCluster.load(cluster_name(name, ips, local))
    path = cluster.state.secrets.api_key_file
    if not path:
        raise ConfigError(
            f"cluster {cluster.name!r} has no API key file recorded",
            hint=f"run `llamacluster up --name {cluster.name}` first, or pass --key-file",
        )
    return Path(path), cluster


def _apply(path: Path, cluster: RecordedCluster | None) -> None:
    """Tell the cluster's running server (if any) about the edited key file."""
    from cluster.errors import LlamaclusterError, RemoteError
    from cluster.stages.serve import publish_api_keys

    if cluster is None:
        err_console.print(
            f"{path} updated; no cluster was named, so no running server was told "
            "(`--name CLUSTER` edits a cluster's key file and applies it at once)",
            highlight=False,
            soft_wrap=True,
        )
        return
    if not cluster.state.server.config_digest:
        err_console.print(
            f"{path} updated; cluster {cluster.name!r} serves nothing now, its next `up` uses it",
            highlight=False,
            soft_wrap=True,
        )
        return
    try:
        reply = publish_api_keys(cluster.state, cluster.head_runner())
    except LlamaclusterError as exc:
        raise RemoteError(
            f"{path} was updated, but the running server was not told: {exc.message}",
            hint=f"run `llamacluster up --name {cluster.name}` to apply it",
        ) from exc
    err_console.print(
        f"applied: the server of {cluster.name!r} accepts {reply.get('keys')} key(s) "
        "within about 2 s (no redeploy)",
        highlight=False,
        soft_wrap=True,
    )


@keys_app.command("list")
def list_(
    name: str | None = name_option(),
    ips: Path | None = ips_option(),
    local: bool = local_option(),
    key_file: Path | None = _key_file_option(),
) -> None:
    """Show each key's name, creation time and a short SHA-256 prefix (never the key)."""
    from rich.table import Table

    from cluster.keys import list_keys

    path, _ = _target(name, ips, local, key_file)
    table = Table(title=str(path), title_justify="left")
    for column in ("name", "created", "sha256", "clients send"):
        table.add_column(column)
    for i, key in enumerate(list_keys(path)):
        table.add_row(key.name, key.created or "-", key.fingerprint, "yes" if i == 0 else "")
    table_console().print(table)


@keys_app.command()
def add(
    key_name: str = typer.Argument(..., metavar="NAME", help="Name of the new key."),
    name: str | None = name_option(),
    ips: Path | None = ips_option(),
    local: bool = local_option(),
    key_file: Path | None = _key_file_option(),
) -> None:
    """Create a random key called NAME; its secret is printed once, on stdout, and never again."""
    from cluster.keys import add_key, check_name

    check_name(key_name)
    path, cluster = _target(name, ips, local, key_file)
    key = add_key(path, key_name)
    typer.echo(key.secret)
    err_console.print(f"added key {key.name!r} (sha256 {key.fingerprint})", highlight=False)
    _apply(path, cluster)


@keys_app.command()
def revoke(
    key_name: str = typer.Argument(..., metavar="NAME", help="Name of the key to revoke."),
    name: str | None = name_option(),
    ips: Path | None = ips_option(),
    local: bool = local_option(),
    key_file: Path | None = _key_file_option(),
) -> None:
    """Remove the key NAME (never the last one); the server refuses it within seconds."""
    from cluster.keys import revoke_key

    path, cluster = _target(name, ips, local, key_file)
    gone = revoke_key(path, key_name)
    err_console.print(f"revoked key {gone.name!r} (sha256 {gone.fingerprint})", highlight=False)
    _apply(path, cluster)


@keys_app.command()
def rotate(
    key_name: str = typer.Argument(..., metavar="NAME", help="Name of the key to rotate."),
    name: str | None = name_option(),
    ips: Path | None = ips_option(),
    local: bool = local_option(),
    key_file: Path | None = _key_file_option(),
) -> None:
    """Give NAME a new random secret (printed once, on stdout); the old one stops working."""
    from cluster.keys import rotate_key

    path, cluster = _target(name, ips, local, key_file)
    key = rotate_key(path, key_name)
    typer.echo(key.secret)
    err_console.print(
        f"rotated key {key.name!r}: new sha256 {key.fingerprint}, the old secret is revoked",
        highlight=False,
        soft_wrap=True,
    )
    _apply(path, cluster)
