"""`llamacluster top`: a live terminal view of the nodes and the engine."""

from __future__ import annotations

from pathlib import Path

import typer

from cluster.cli.app import app, table_console
from cluster.cli.options import api_key_file_option, api_key_option, base_url_option, name_option


@app.command()
def top(
    name: str | None = name_option("Cluster name (default: local); read from its monitor."),
    base_url: str | None = base_url_option(
        "Any vLLM-compatible server (its /metrics is read directly), e.g. http://HOST:8000/v1."
    ),
    api_key: str | None = api_key_option(),
    api_key_file: Path | None = api_key_file_option(),
    once: bool = typer.Option(False, "--once", help="Print one frame and exit."),
    interval: float = typer.Option(1.5, "--interval", min=0.5, help="Seconds between frames."),
    timeout: float = typer.Option(
        15.0, "--timeout", min=0.1, help="Seconds one read of /metrics or Prometheus may take."
    ),
) -> None:
    """Live view: per node CPU/GPU/memory/network; engine queue, KV cache, req/s, tokens/s, TTFT, ITL."""
    from cluster import top as topmod

    source, close = topmod.open_source(
        name=name, base_url=base_url, api_key=api_key, api_key_file=api_key_file, timeout_s=timeout
    )
    try:
        topmod.run(source, once=once, interval_s=interval, console=table_console())
    finally:
        close()
