"""`llamacluster demo-model`: build the random-weight demo model that local runs serve by default."""

from __future__ import annotations

from pathlib import Path

import typer

from cluster.cli.app import app


@app.command("demo-model")
def demo_model(
    path: Path | None = typer.Argument(
        None, help="Directory to write (default: the built-in demo model location)."
    ),
    size_mb: float | None = typer.Option(
        None, "--size-mb", help="Approximate weight size in MB (default: the ~7 MB tiny model)."
    ),
    shards: int = typer.Option(4, "--shards", help="Number of safetensors shards (at least 1)."),
    seed: int = typer.Option(0, "--seed", help="Random seed; the same seed gives the same bytes."),
) -> None:
    """Build a random-weight demo Llama (hub layout); its output is gibberish."""
    from cluster.demo_model import GIBBERISH_NOTICE, ensure_demo_model, plan_demo_model

    spec = plan_demo_model(size_mb, num_shards=shards)
    where = ensure_demo_model(path, seed=seed, target_size_mb=size_mb, num_shards=shards)
    typer.echo(f"{where}")
    typer.echo(
        f"  {GIBBERISH_NOTICE}\n"
        f"  {spec.num_hidden_layers} layers, hidden {spec.hidden_size}, "
        f"{spec.weight_bytes / 1e6:.1f} MB of weights in {shards} shards, seed {seed}"
    )
