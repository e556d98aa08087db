"""Options several commands share, defined once: which recorded cluster, which API endpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

NAME_HELP = "Cluster name (default: from --ips, or 'local' with --local)."


def name_option(help: str = NAME_HELP) -> Any:
    """``--name``: a cluster recorded by `up`."""
    return typer.Option(None, "--name", help=help)


def ips_option(help: str = "Inventory the cluster was started from.") -> Any:
    """``--ips/--inventory``: the inventory file, whose path names the cluster by default."""
    return typer.Option(None, "--ips", "--inventory", help=help)


def local_option(help: str = "The --local cluster.") -> Any:
    """``--local``: the one-node cluster on this machine."""
    return typer.Option(False, "--local", help=help)


def cluster_name(name: str | None, ips: Path | None, local: bool) -> str:
    """The cluster a command means: ``--name``, else ``local`` with ``--local``, else the name
    derived from the inventory path (``deploy/ips.txt`` by default), as `up` derived it."""
    from cluster.state import default_cluster_name

    if name:
        return name
    if local:
        return "local"
    return default_cluster_name(Path(ips or "deploy/ips.txt").absolute())


def base_url_option(help: str = "Any OpenAI-compatible base URL, e.g. http://HOST:8000/v1.") -> Any:
    """``--base-url``: an endpoint given directly instead of a recorded cluster."""
    return typer.Option(None, "--base-url", help=help)


def ca_cert_option() -> Any:
    """``--ca-cert``: the certificate an HTTPS endpoint is trusted by (`up --tls self-signed`)."""
    return typer.Option(
        None,
        "--ca-cert",
        help="Trust this PEM certificate for an https:// endpoint (a cluster's own from "
        "`up --tls` is used by itself with --name).",
    )


def api_key_option() -> Any:
    """``--api-key``: a key on the command line (visible in `ps`; prefer the file)."""
    return typer.Option(
        None, "--api-key", help="API key (default: $OPENAI_API_KEY). Prefer --api-key-file."
    )


def api_key_file_option() -> Any:
    """``--api-key-file``: a 0600 file whose first key is sent (cluster/keys.py)."""
    return typer.Option(
        None, "--api-key-file", help="API key file (mode 0600, one key a line; the first is sent)."
    )


def model_option(help: str = "Model name to request (default: the served one).") -> Any:
    """``--model``: the model name a client sends."""
    return typer.Option(None, "--model", help=help)
