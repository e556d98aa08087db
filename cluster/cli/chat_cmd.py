"""`llamacluster chat`: a terminal chat with the cluster (or any OpenAI-compatible endpoint)."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from cluster.cli.app import app
from cluster.cli.options import (
    api_key_file_option,
    api_key_option,
    base_url_option,
    ca_cert_option,
    model_option,
    name_option,
)


@app.command()
def chat(
    name: str | None = name_option("Cluster name (its endpoint, key and model from `up`)."),
    base_url: str | None = base_url_option(),
    api_key: str | None = api_key_option(),
    api_key_file: Path | None = api_key_file_option(),
    model: str | None = model_option(),
    model_dir: Path | None = typer.Option(
        None, "--model-dir", help="Local model directory (tokenizer files) for --eos-bias."
    ),
    ca_cert: Path | None = ca_cert_option(),
    system: str | None = typer.Option(None, "--system", help="System prompt."),
    prompt: str | None = typer.Option(
        None, "--prompt", "-p", help="Answer this one prompt and exit (answer on stdout)."
    ),
    temperature: float | None = typer.Option(None, "--temperature", help="Sampling temperature."),
    top_p: float | None = typer.Option(None, "--top-p", help="Nucleus sampling mass."),
    max_tokens: int | None = typer.Option(None, "--max-tokens", help="Longest answer in tokens."),
    seed: int | None = typer.Option(None, "--seed", help="Sampling seed."),
    eos_bias: float | None = typer.Option(
        None,
        "--eos-bias",
        help="Add to the EOS token's logit (-100..100): positive ends answers sooner, "
        "negative later.",
    ),
    stats: bool = typer.Option(True, "--stats/--no-stats", help="One line of stats per answer."),
) -> None:
    """Chat in the terminal: streamed answers, history, /reset /system /save /help /quit."""
    from cluster.chat import ChatSettings, SamplingOptions, Terminal, ask_once, run_chat
    from cluster.endpoint import resolve_target

    target = resolve_target(
        name=name,
        base_url=base_url,
        api_key=api_key,
        api_key_file=api_key_file,
        model=model,
        model_dir=model_dir,
        ca_cert=ca_cert,
    )
    settings = ChatSettings(
        target=target,
        options=SamplingOptions(
            temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed
        ),
        system=system,
        eos_bias=eos_bias,
        show_stats=stats,
    )
    terminal = Terminal(sys.stdout, sys.stderr)
    if prompt is not None:
        ask_once(settings, prompt, terminal=terminal)
        return
    import readline  # noqa: F401  (line editing and history for input())
    import signal

    # Ctrl-C stops an answer. A process started in the background by a non-interactive shell
    # inherits SIGINT ignored, and Python then leaves it so: every answer would run to its end.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    run_chat(settings, terminal=terminal)
