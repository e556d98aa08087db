"""The built-in demo: a local one-node cluster serving the demo model, one streamed chat, a short bench."""

from __future__ import annotations

import time
from dataclasses import dataclass

from rich.console import Console

from cluster.errors import NotReadyError
from cluster.recorded import RecordedCluster

DEMO_PROMPT = "Say hello to the cluster and describe what you are."


@dataclass(frozen=True)
class ChatOutcome:
    """What one streamed chat answer looked like from the client's side."""

    text: str
    chunks: int
    completion_tokens: int | None
    ttft_s: float
    total_s: float


def stream_chat(
    base_url: str,
    api_key: str,
    model: str,
    prompt: str,
    *,
    max_tokens: int = 48,
    console: Console,
) -> ChatOutcome:
    """Send one chat request through the official openai client and print tokens as they arrive."""
    from openai import OpenAI

    client = OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=120)
    start = time.perf_counter()
    first: float | None = None
    parts: list[str] = []
    chunks = 0
    usage_tokens: int | None = None
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=max_tokens,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.usage is not None:
            usage_tokens = chunk.usage.completion_tokens
        for choice in chunk.choices:
            piece = choice.delta.content or ""
            if piece:
                if first is None:
                    first = time.perf_counter()
                chunks += 1
                parts.append(piece)
                console.print(piece, end="", markup=False, highlight=False, soft_wrap=True)
    console.print()
    end = time.perf_counter()
    return ChatOutcome(
        text="".join(parts),
        chunks=chunks,
        completion_tokens=usage_tokens,
        ttft_s=(first or end) - start,
        total_s=end - start,
    )


def run_demo(
    *,
    prompt: str = DEMO_PROMPT,
    requests: int = 16,
    concurrency: tuple[int, ...] = (1, 4),
    api_port: int = 8000,
    ray_port: int = 6379,
    dashboard_port: int = 8265,
    monitor_port: int = 9090,
    keep: bool = True,
    console: Console | None = None,
) -> dict[str, object]:
    """Bring up the local demo cluster (or reuse it), chat once, run a short bench; return figures.

    The cluster stays up afterwards unless ``keep`` is False, so the endpoint it prints can be
    used right away; `llamacluster down --name local` stops it.
    """
    from cluster import lifecycle
    from cluster.bench.config import BenchConfig, Endpoint, LoadConfig, WorkloadConfig
    from cluster.bench.runner import run_benchmark
    from cluster.demo_model import GIBBERISH_NOTICE

    console = console or Console(emoji=False)
    console.rule(
        "[bold]1/3 up --local[/]: a one-node cluster on this machine, demo model on the CPU"
    )
    state = lifecycle.up(
        lifecycle.UpConfig(
            local=True,
            api_port=api_port,
            ray_port=ray_port,
            dashboard_port=dashboard_port,
            monitor_port=monitor_port,
        ),
        console=console,
    )
    if not state.server.endpoint or not state.secrets.api_key_file:
        raise NotReadyError(
            "the local cluster came up without an endpoint",
            hint="see `llamacluster status --name local` and `llamacluster logs --name local`",
        )
    base_url = f"{state.server.endpoint}/v1"
    api_key = RecordedCluster(state).api_key() or ""
    model = state.server.served_name or ""
    try:
        console.rule("[bold]2/3 chat[/]: one streamed answer through the openai client")
        console.print(f"[dim]{GIBBERISH_NOTICE}[/]")
        console.print(f"[bold]user:[/] {prompt}")
        console.print("[bold]assistant:[/] ", end="")
        chat = stream_chat(base_url, api_key, model, prompt, console=console)
        tokens = chat.completion_tokens if chat.completion_tokens is not None else chat.chunks
        rate = (tokens - 1) / (chat.total_s - chat.ttft_s) if chat.total_s > chat.ttft_s else 0.0
        console.print(
            f"[dim]{tokens} tokens, first after {chat.ttft_s * 1000:.0f} ms, "
            f"{rate:.1f} tokens/s after that[/]"
        )

        console.rule("[bold]3/3 bench[/]: a short throughput run against the same endpoint")
        config = BenchConfig(
            endpoints=[Endpoint(name="local", base_url=base_url, api_key=api_key, model=model)],
            workload=WorkloadConfig(input_len=32, output_len=32, seed=0),
            load=LoadConfig(concurrency=list(concurrency), num_requests=requests),
        )
        result = run_benchmark(config)
        console.print(result.summary(), markup=False, highlight=False)
    finally:
        if not keep:
            lifecycle.down(state.name, console=console)
    if keep:
        console.print(
            f"\nThe cluster is still up: {base_url} (API key in {state.secrets.api_key_file}).\n"
            f"Next: `llamacluster bench --name {state.name}`, `llamacluster status --name "
            f"{state.name}`, and `llamacluster down --name {state.name}` to stop it."
        )
    return {"endpoint": base_url, "model": model, "chat": chat, "bench": result}
