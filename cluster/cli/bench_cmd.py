"""`llamacluster bench`: drive one or more OpenAI endpoints and report throughput and latency."""

from __future__ import annotations

import contextlib
from datetime import datetime, timezone
from pathlib import Path

import typer

from cluster.cli.app import app, table_console
from cluster.cli.options import (
    api_key_file_option,
    api_key_option,
    base_url_option,
    ca_cert_option,
    model_option,
    name_option,
)


@app.command("bench")
def bench(
    base_url: str | None = base_url_option(),
    model: str | None = model_option(
        "Model name to request (default: the cluster's, or the endpoint's first model)."
    ),
    api_key: str | None = api_key_option(),
    api_key_file: Path | None = api_key_file_option(),
    endpoint: list[str] = typer.Option(
        [],
        "--endpoint",
        help="Compare mode, repeatable: NAME=URL[,key=K][,key-file=F][,model=M][,ca-cert=F]. "
        "The first is the baseline of the ratios.",
    ),
    ca_cert: Path | None = ca_cert_option(),
    api: str = typer.Option("chat", "--api", help="chat or completions."),
    dataset: str = typer.Option(
        "random", "--dataset", help="random, prompts (bundled set), jsonl or sharegpt."
    ),
    dataset_path: Path | None = typer.Option(
        None, "--dataset-path", help="File for --dataset jsonl/sharegpt."
    ),
    workload: str = typer.Option(
        "requests",
        "--workload",
        help="requests (independent), or chat-sessions: conversations sharing a long system "
        "prompt, turn by turn (-c turns in flight; reports the prefix-cache hit rate).",
    ),
    turns: int = typer.Option(4, "--turns", help="Turns per conversation (chat-sessions)."),
    open_sessions: int | None = typer.Option(
        None,
        "--open-sessions",
        help="Conversations open at once (chat-sessions): their turns interleave, as many "
        "users' chats do; default: -c (each conversation runs turn after turn).",
    ),
    system_prompt_len: int = typer.Option(
        1000, "--system-prompt-len", help="Tokens of the shared system prompt (chat-sessions)."
    ),
    input_len: int = typer.Option(
        128, "--input-len", help="Prompt tokens (random dataset; each user turn of a session)."
    ),
    output_len: int = typer.Option(
        128, "--output-len", help="max_tokens (random/bundled; a default for files)."
    ),
    force_output_len: bool = typer.Option(
        False, "--force-output-len", help="Use --output-len even for rows that set max_tokens."
    ),
    tokenizer: str | None = typer.Option(
        None, "--tokenizer", help="Local tokenizer dir/file or cached repo id (exact lengths)."
    ),
    ignore_eos: bool = typer.Option(
        True, "--ignore-eos/--no-ignore-eos", help="Ask for exactly max_tokens when accepted."
    ),
    temperature: float | None = typer.Option(None, "--temperature", help="Sampling temperature."),
    concurrency: str = typer.Option(
        "1",
        "--concurrency",
        "-c",
        help="Closed-loop sweep, e.g. 1,2,4,8,16 (cap for --request-rate).",
    ),
    request_rate: str | None = typer.Option(
        None, "--request-rate", help="Open-loop sweep in requests/s, e.g. 1,2,4 or inf."
    ),
    burstiness: float = typer.Option(
        1.0, "--burstiness", help="Gamma shape of arrivals: 1 Poisson, <1 burstier."
    ),
    num_requests: int | None = typer.Option(
        None, "--num-requests", "-n", help="Measured requests per point (default 100)."
    ),
    duration: str | None = typer.Option(
        None, "--duration", help="Measure for this long per point instead, e.g. 60s, 2m."
    ),
    warmup: int | None = typer.Option(
        None, "--warmup", help="Unmeasured requests before each point (default: concurrency)."
    ),
    rounds: int | None = typer.Option(
        None, "--rounds", help="Interleaved rounds per point (default 1; compare mode 2)."
    ),
    timeout: str = typer.Option("300s", "--timeout", help="Limit for one request."),
    slo: str | None = typer.Option(
        None, "--slo", help="Goodput bounds, e.g. ttft=200ms,tpot=50ms[,e2e=5s]."
    ),
    cost_per_hour: float | None = typer.Option(
        None, "--cost-per-hour", help="Hardware price per hour: adds tokens per $/¢ columns."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of prompts and arrivals."),
    output_dir: Path | None = typer.Option(
        None, "--output-dir", "-o", help="Where results go (default bench-results/<time>)."
    ),
    save_requests: bool = typer.Option(
        False, "--save-requests", help="Also write every request as JSONL."
    ),
    plots: bool = typer.Option(True, "--plots/--no-plots", help="Write PNG plots."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
    raise_priority: bool = typer.Option(
        True,
        "--raise-priority/--no-raise-priority",
        help="Raise this client's CPU priority while it measures (needs CAP_SYS_NICE): on the "
        "server's own machine a client waiting for a core is measured instead of the server.",
    ),
    name: str | None = name_option(
        "A cluster from `up`: its endpoint, key and model (and --net-counters)."
    ),
    net_counters: bool | None = typer.Option(
        None,
        "--net-counters/--no-net-counters",
        help="Per node kB sent/received per token from the interface counters (on with --name).",
    ),
) -> None:
    """Measure tokens/s, TTFT, TPOT, ITL and E2E latency of OpenAI-compatible endpoints."""
    from rich.console import Console

    from cluster.bench.cli_glue import build_config, progress_bar
    from cluster.bench.netcount import cluster_bench_inputs
    from cluster.bench.priority import NOT_RAISED, raised_priority
    from cluster.bench.report import ratios_table, results_table, write_reports
    from cluster.bench.runner import run_benchmark
    from cluster.errors import NotReadyError

    base_url, model, api_key, observers = cluster_bench_inputs(
        name, net_counters=net_counters, base_url=base_url, model=model, api_key=api_key,
        api_key_file=api_key_file, endpoints=endpoint,
    )  # fmt: skip
    if name and ca_cert is None and not endpoint and base_url:
        from cluster.endpoint import target_of_cluster

        target = target_of_cluster(name)
        if target.base_url == base_url:  # the cluster's own endpoint: its own certificate
            ca_cert = target.ca_cert
    if name and tokenizer is None and not endpoint:
        from cluster.endpoint import target_of_cluster

        # The cluster's model directory holds its tokenizer: exact prompt lengths.
        model_dir = target_of_cluster(name).model_dir
        if model_dir is not None and (model_dir / "tokenizer.json").is_file():
            tokenizer = str(model_dir)
    from cluster.series import cluster_series

    # The cluster's own series over the run (its monitor's Prometheus), beside the client's.
    series = cluster_series(name) if name and plots else None
    observers = [*observers, series] if series else observers
    config = build_config(
        base_url=base_url,
        model=model,
        api_key=api_key,
        api_key_file=api_key_file,
        endpoints=endpoint,
        api=api,
        dataset=dataset,
        dataset_path=dataset_path,
        input_len=input_len,
        output_len=output_len,
        force_output_len=force_output_len,
        tokenizer=tokenizer,
        ignore_eos=ignore_eos,
        temperature=temperature,
        concurrency=concurrency,
        request_rate=request_rate,
        burstiness=burstiness,
        num_requests=num_requests,
        duration=duration,
        warmup=warmup,
        rounds=rounds,
        timeout=timeout,
        slo=slo,
        cost_per_hour=cost_per_hour,
        seed=seed,
        ca_cert=ca_cert,
        workload=workload,
        turns=turns,
        system_prompt_len=system_prompt_len,
        open_sessions=open_sessions,
    )
    notes: list[str] = []
    if config.workload.workload == "chat-sessions":
        from cluster.bench.prefix_cache import prefix_cache_observer

        observers = [
            *observers,
            prefix_cache_observer(config.endpoints, cluster=name, notes=notes),
        ]
    console = table_console()
    err = Console(stderr=True, emoji=False)
    with (
        progress_bar(err, enabled=progress) as hook,
        raised_priority() if raise_priority else contextlib.nullcontext("off") as raised,
    ):
        result = run_benchmark(config, progress=hook, observers=observers)
    if raised is None:
        result.notes.append(
            f"client CPU priority {NOT_RAISED}: on the server's own machine the client "
            "competes with it for the cores"
        )
    elif raised != "off":
        result.notes.append(f"client CPU priority raised while measuring ({raised})")
    result.notes.extend(notes)
    console.print(results_table(result))
    table = ratios_table(result)
    if table is not None:
        console.print(table)
    if name:
        from cluster.bench.expected import cluster_expectations, expected_table
        from cluster.errors import LlamaclusterError

        try:
            expected, planned = cluster_expectations(
                name, input_len=input_len, output_len=output_len,
                concurrencies=[int(p.x) for p in result.points if p.mode == "closed"],
            )  # fmt: skip
            table = expected_table(result, expected)
            if table is not None:
                console.print(table)
                result.notes.append(planned)
        except LlamaclusterError as exc:
            result.warnings.append(f"no expected figures: {exc}")
    for note in result.notes:
        err.print(f"[dim]note:[/] {note}", highlight=False)
    for warning in result.warnings:
        err.print(f"[yellow]warning:[/] {warning}", highlight=False)
    out = output_dir or Path("bench-results") / datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    written = write_reports(result, out, plots=plots, per_request=save_requests)
    if series is not None:
        try:
            written.update(series.write(out))
        except LlamaclusterError as exc:  # the measurement stands without the cluster's side
            err.print(f"[yellow]warning:[/] no cluster series: {exc.one_line()}", highlight=False)
    console.print("results: " + ", ".join(str(p) for p in written.values()), highlight=False)
    if result.all_failed:
        kinds: dict[str, int] = {}
        for p in result.points:
            for k, v in p.errors.items():
                kinds[k] = kinds.get(k, 0) + v
        listing = ", ".join(f"{k}×{v}" for k, v in sorted(kinds.items())) or "no requests ran"
        raise NotReadyError(
            f"every request failed ({listing})",
            hint="check the URL, the API key and that the server answers /v1/models",
        )
