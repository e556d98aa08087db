"""Turns the bench command's flags into a BenchConfig and a progress bar (no typer here)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

from pydantic import ValidationError

from cluster.bench.config import (
    BenchConfig,
    LoadConfig,
    WorkloadConfig,
    default_api_key,
    parse_duration_s,
    parse_endpoint,
    parse_float_list,
    parse_int_list,
    parse_slo,
    read_key_file,
)
from cluster.endpoint import client_ssl_context
from cluster.errors import ConfigError, validation_error

NO_BASE_URL_HINT = (
    "pass --base-url http://HOST:PORT/v1 (or --endpoint NAME=URL); reading the current "
    "cluster's endpoint from its state is not available yet"
)


def build_config(
    *,
    base_url: str | None,
    model: str | None,
    api_key: str | None,
    api_key_file: Path | None,
    endpoints: list[str],
    api: str,
    dataset: str,
    dataset_path: Path | None,
    input_len: int,
    output_len: int,
    force_output_len: bool,
    tokenizer: str | None,
    ignore_eos: bool,
    temperature: float | None,
    concurrency: str,
    request_rate: str | None,
    burstiness: float,
    num_requests: int | None,
    duration: str | None,
    warmup: int | None,
    rounds: int | None,
    timeout: str,
    slo: str | None,
    cost_per_hour: float | None,
    seed: int,
    ca_cert: Path | None = None,
    workload: str = "requests",
    turns: int = 4,
    system_prompt_len: int = 1000,
    open_sessions: int | None = None,
) -> BenchConfig:
    """A validated BenchConfig from command-line values; ConfigError says which flag is wrong.
    ``ca_cert`` (--ca-cert) is trusted for every endpoint that names no ``ca-cert=`` itself."""
    key = read_key_file(api_key_file) if api_key_file else (api_key or default_api_key())
    if ca_cert is not None:
        client_ssl_context(ca_cert)  # a bad file: one line naming the flag
    eps = [parse_endpoint(text, default_key=key, default_ca=ca_cert) for text in endpoints]
    if base_url:
        eps.insert(0, parse_endpoint(f"main={base_url}", default_key=key, default_ca=ca_cert))
    if not eps:
        raise ConfigError("no endpoint to benchmark", hint=NO_BASE_URL_HINT)
    if model:
        eps = [e if e.model else e.model_copy(update={"model": model}) for e in eps]
    if api not in ("chat", "completions"):
        raise ConfigError(f"bad --api {api!r}", hint="use chat or completions")
    if dataset not in ("random", "prompts", "jsonl", "sharegpt"):
        raise ConfigError(
            f"bad --dataset {dataset!r}", hint="use random, prompts, jsonl or sharegpt"
        )
    if workload not in ("requests", "chat-sessions"):
        raise ConfigError(f"bad --workload {workload!r}", hint="use requests or chat-sessions")
    try:
        workload_config = WorkloadConfig(
            workload=workload,
            turns=turns,
            system_prompt_len=system_prompt_len,
            open_sessions=open_sessions,
            api=api,
            dataset=dataset,
            dataset_path=dataset_path,
            input_len=input_len,
            output_len=output_len,
            output_len_override=force_output_len,
            ignore_eos=ignore_eos,
            tokenizer=tokenizer,
            temperature=temperature,
            seed=seed,
        )
        load = LoadConfig(
            concurrency=parse_int_list(concurrency, what="--concurrency"),
            request_rate=parse_float_list(request_rate, what="--request-rate")
            if request_rate
            else [],
            burstiness=burstiness,
            num_requests=num_requests,
            duration_s=parse_duration_s(duration) if duration else None,
            warmup_requests=warmup,
            rounds=rounds if rounds is not None else (2 if len(eps) > 1 else 1),
            timeout_s=parse_duration_s(timeout),
        )
        return BenchConfig(
            endpoints=eps,
            workload=workload_config,
            load=load,
            slo=parse_slo(slo) if slo else parse_slo(""),
            cost_per_hour=cost_per_hour,
        )
    except ValidationError as exc:
        raise validation_error(exc, BenchConfig, what="bad bench option: ") from None


@contextlib.contextmanager
def progress_bar(console, *, enabled: bool) -> Iterator[Callable | None]:
    """A rich progress bar with one task per measured phase; yields the runner's progress hook."""
    if not enabled:
        yield None
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )

    def hook(label: str, total: int | None, seconds: float | None) -> Callable[[], None]:
        task = bar.add_task(label, total=total)

        def tick() -> None:
            bar.advance(task)

        return tick

    with bar:
        yield hook
