"""`llamacluster demo`: the README's first command, on built-in defaults."""

from __future__ import annotations

import typer

from cluster.cli.app import app


@app.command()
def demo(
    prompt: str | None = typer.Option(None, "--prompt", help="What to ask the demo model."),
    requests: int = typer.Option(16, "--requests", min=1, help="Requests per bench point."),
    concurrency: str = typer.Option("1,4", "--concurrency", help="Bench concurrency sweep."),
    api_port: int = typer.Option(8000, "--api-port", help="API port on this machine (0: free)."),
    ray_port: int = typer.Option(6379, "--ray-port", help="Ray GCS port (0: free)."),
    dashboard_port: int = typer.Option(
        8265, "--dashboard-port", help="Ray dashboard port on 127.0.0.1 (0: free)."
    ),
    monitor_port: int = typer.Option(
        9090, "--monitor-port", help="The monitor's Prometheus port on 127.0.0.1 (0: free)."
    ),
    down: bool = typer.Option(False, "--down", help="Stop the local cluster at the end."),
) -> None:
    """Serve the built-in random-weight demo model on this machine: up --local, a streamed chat, a short bench."""
    from cluster.bench.config import parse_int_list
    from cluster.demo import DEMO_PROMPT, run_demo

    run_demo(
        prompt=prompt or DEMO_PROMPT,
        requests=requests,
        concurrency=tuple(parse_int_list(concurrency, what="--concurrency")),
        api_port=api_port,
        ray_port=ray_port,
        dashboard_port=dashboard_port,
        monitor_port=monitor_port,
        keep=not down,
    )
