"""`llamacluster serve` / `serve-stop`: deploy or stop the OpenAI server on an existing Ray cluster."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from cluster.cli.app import app, err_console
from cluster.errors import ConfigError

ADDRESS_HELP = "Ray cluster address (head-ip:gcs-port); default: RAY_ADDRESS or the local one."


def parse_engine_args(items: list[str]) -> dict[str, Any]:
    """`KEY=VALUE` pairs into a dict; VALUE is JSON when it parses (true, 4, "x"), else a string."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(
                f"bad --engine-arg {item!r}",
                hint="write KEY=VALUE, e.g. --engine-arg enforce_eager=true",
            )
        try:
            value: Any = json.loads(raw)
        except ValueError:
            value = raw
        out[key.strip().replace("-", "_")] = value
    return out


def _layout(text: str) -> tuple[int, int]:
    """``2x1`` -> (2, 1): tp and pp."""
    tp, sep, pp = text.lower().partition("x")
    if not sep or not tp.strip().isdigit() or not pp.strip().isdigit():
        raise ConfigError(
            f"--degraded-layout {text!r} is not TPxPP", hint="write it like 2x1 (tp=2, pp=1)"
        )
    return int(tp), int(pp)


@app.command("serve")
def serve(
    model: list[str] = typer.Option(
        ...,
        "--model",
        help="Model directory on every node, or repo id. Repeat it to serve several models "
        "behind the endpoint, each a Serve app of its own routed by the request's `model`: "
        "PATH[,name=NAME][,tp=N][,pp=N][,replicas=N][,max-model-len=N][,lora=NAME=PATH]; "
        "the flags of a model's own (--served-model-name, --lora, --tp, --pp, --replicas, "
        "--max-model-len, --revision, --quantization, --speculative-config) are the first "
        "model's, every other flag applies to all.",
    ),
    served_model_name: str | None = typer.Option(
        None, "--served-model-name", help="Name clients send (default: repo id / dir name)."
    ),
    lora: list[str] = typer.Option(
        [],
        "--lora",
        help="LoRA adapter NAME=PATH (repeatable): a PEFT adapter directory on every node, "
        "served as model NAME.",
    ),
    tp: int = typer.Option(1, "--tp", help="Tensor-parallel size."),
    pp: int = typer.Option(1, "--pp", help="Pipeline-parallel size."),
    device: str = typer.Option("gpu", "--device", help="gpu, or cpu for CPU-only nodes."),
    dtype: str = typer.Option("auto", "--dtype", help="auto, bfloat16, float16 or float32."),
    max_model_len: int | None = typer.Option(None, "--max-model-len", help="Context length."),
    gpu_memory_utilization: float = typer.Option(
        0.9, "--gpu-memory-utilization", help="Fraction of device memory vLLM may use."
    ),
    max_num_seqs: int | None = typer.Option(None, "--max-num-seqs", help="Batch size bound."),
    kv_cache_gb: int | None = typer.Option(
        None, "--kv-cache-gb", help="KV cache GiB per worker on CPU nodes."
    ),
    cpu_threads: int | None = typer.Option(
        None, "--cpu-threads", help="Compute threads of each CPU worker (OMP_NUM_THREADS)."
    ),
    api_key: list[str] = typer.Option(
        [],
        "--api-key",
        help="Accepted key (repeatable); prefer --api-key-file or $LLAMACLUSTER_API_KEY.",
    ),
    api_key_file: Path | None = typer.Option(
        None, "--api-key-file", help="File with one key per line, mode 0600."
    ),
    no_auth: bool = typer.Option(False, "--no-auth", help="Serve without keys (warns)."),
    host: str = typer.Option("0.0.0.0", "--host", help="Listen address of the endpoint."),
    port: int = typer.Option(8000, "--port", help="Port of the endpoint."),
    tls_cert: Path | None = typer.Option(
        None, "--tls-cert", help="PEM certificate: serve HTTPS (with --tls-key)."
    ),
    tls_key: Path | None = typer.Option(
        None, "--tls-key", help="Unencrypted PEM key of --tls-cert (mode 0600)."
    ),
    proxy_port: int = typer.Option(8001, "--proxy-port", help="Port of Ray Serve's own proxy."),
    replicas: str = typer.Option(
        "1",
        "--replicas",
        help="Engines behind the endpoint (above 1: HAProxy balances them); auto: as many "
        "tp × pp groups as the cluster's free device slots hold.",
    ),
    routing: str = typer.Option(
        "least-load",
        "--routing",
        help="How replicas are picked: least-load, prefix (same prompt prefix, same replica) "
        "or round-robin.",
    ),
    replica_port_min: int | None = typer.Option(
        None, "--replica-port-min", help="First of the replicas' own ports (default port + 10)."
    ),
    max_ongoing_requests: int = typer.Option(
        256, "--max-ongoing-requests", help="Running + queued bound; past it 429."
    ),
    retry_after: int = typer.Option(
        1, "--retry-after", help="Retry-After seconds sent with 429 and 503 answers."
    ),
    request_timeout: float = typer.Option(
        600.0, "--request-timeout", help="Per-request limit in seconds."
    ),
    stream_idle_timeout: float = typer.Option(
        120.0,
        "--stream-idle-timeout",
        help="Seconds a stream may go without output before it is ended and aborted.",
    ),
    max_n: int = typer.Option(16, "--max-n", help="Largest `n` accepted (400 past)."),
    max_tokens_limit: int = typer.Option(
        32768, "--max-tokens-limit", help="Largest max_tokens / max_completion_tokens accepted."
    ),
    allowed_media_domains: list[str] = typer.Option(
        [],
        "--allowed-media-domains",
        help="Host media URLs may be fetched from (repeatable); default: media URLs refused.",
    ),
    admin_key_file: Path | None = typer.Option(
        None,
        "--admin-key-file",
        help="Keys (file, 0600) for vLLM's operational routes; without it they answer 404.",
    ),
    header_timeout: float = typer.Option(
        30.0, "--header-timeout", help="Seconds a client may take to send a request's headers."
    ),
    max_connections: int = typer.Option(
        2048, "--max-connections", help="Open client connections accepted; past it 503."
    ),
    max_body_bytes: int = typer.Option(
        8 * 1024 * 1024, "--max-body-bytes", help="Largest request body accepted (413 past)."
    ),
    ready_probe_interval: float = typer.Option(
        10.0,
        "--ready-probe-interval",
        help="Seconds between the one-token readiness probes (skipped while requests produce "
        "output).",
    ),
    ready_probe_idle_interval: float = typer.Option(
        60.0,
        "--ready-probe-idle-interval",
        help="While no request produces output, the probe interval doubles up to this.",
    ),
    stall_timeout: float = typer.Option(
        60.0,
        "--stall-timeout",
        help="Seconds with requests in flight and no engine output before the engine is "
        "restarted (0: off).",
    ),
    restart_attempts: int = typer.Option(
        5, "--restart-attempts", help="Engine restarts in the replica before Serve replaces it."
    ),
    restart_backoff: float = typer.Option(
        5.0, "--restart-backoff", help="Seconds before the second restart; doubles after."
    ),
    restart_backoff_max: float = typer.Option(
        300.0, "--restart-backoff-max", help="Longest wait between two restart attempts."
    ),
    engine_cpus: float = typer.Option(
        1.0, "--engine-cpus", help="CPUs reserved on the head for the engine process."
    ),
    drain_timeout: float = typer.Option(
        5.0, "--drain-timeout", help="Seconds a stopping server lets running requests finish."
    ),
    engine_arg: list[str] = typer.Option(
        [], "--engine-arg", help="Extra vLLM engine argument KEY=VALUE (repeatable)."
    ),
    quantization: str | None = typer.Option(
        None, "--quantization", help="vLLM quantization method (fp8, awq, gptq, ...)."
    ),
    speculative_config: str | None = typer.Option(
        None, "--speculative-config", help="vLLM speculative decoding config (JSON)."
    ),
    kv_offload_gb: float | None = typer.Option(
        None, "--kv-offload-gb", help="Host-memory KV cache, GiB over the tp ranks."
    ),
    degraded_layout: str | None = typer.Option(
        None,
        "--degraded-layout",
        metavar="TPxPP",
        help="Layout to serve with on the nodes still alive while a node is lost, e.g. 1x1 "
        "(`up --on-node-loss replan` picks it with the planner); default: wait for the node.",
    ),
    revision: str | None = typer.Option(
        None,
        "--revision",
        help="Hub commit the model directory holds (checked against its download manifest).",
    ),
    app_name: str = typer.Option("llamacluster", "--app-name", help="Serve application name."),
    address: str | None = typer.Option(None, "--address", help=ADDRESS_HELP),
    ready_timeout: float = typer.Option(
        900.0, "--ready-timeout", help="Seconds to wait for /ready."
    ),
    wait: bool = typer.Option(True, "--wait/--no-wait", help="Wait until /ready answers 200."),
    as_json: bool = typer.Option(False, "--json", help="Print the endpoint as JSON."),
) -> None:
    """Deploy the OpenAI server (vLLM tp × pp on Ray Serve) on a running Ray cluster."""
    from cluster.planner.engine_options import parse_speculative_config
    from serve.config import load_config
    from serve.models import parse_model_spec, with_shared_fields

    specs = [parse_model_spec(m) for m in model]
    first_spec = specs[0]
    tp = first_spec.get("tp", tp)
    pp = first_spec.get("pp", pp)
    values: dict[str, Any] = {
        "model": first_spec["model"],
        "served_model_name": first_spec.get("served_model_name", served_model_name),
        "lora_modules": [*lora, *first_spec.get("lora_modules", [])],
        "tp": tp,
        "pp": pp,
        "device": device,
        "dtype": dtype,
        "max_model_len": max_model_len,
        "gpu_memory_utilization": gpu_memory_utilization,
        "max_num_seqs": max_num_seqs,
        "cpu_kvcache_space_gb": kv_cache_gb,
        "cpu_threads": cpu_threads,
        "api_keys": api_key,
        "api_key_file": api_key_file,
        "no_auth": no_auth,
        "host": host,
        "port": port,
        "tls_certfile": tls_cert,
        "tls_keyfile": tls_key,
        "proxy_port": proxy_port,
        "num_replicas": first_spec.get("num_replicas")
        or _replica_count(
            replicas,
            address,
            tp=tp,
            pp=pp,
            # The further models' groups come first; auto fills what they leave.
            reserve=sum(
                m.get("tp", 1) * m.get("pp", 1) * m.get("num_replicas", 1) for m in specs[1:]
            ),
        ),
        "routing": routing,
        "replica_port_min": replica_port_min,
        "max_ongoing_requests": max_ongoing_requests,
        "request_timeout_s": request_timeout,
        "stream_idle_timeout_s": stream_idle_timeout,
        "max_n": max_n,
        "max_tokens_limit": max_tokens_limit,
        "allowed_media_domains": allowed_media_domains,
        "admin_key_file": admin_key_file,
        "header_timeout_s": header_timeout,
        "max_connections": max_connections,
        "retry_after_s": retry_after,
        "max_body_bytes": max_body_bytes,
        "ready_probe_interval_s": ready_probe_interval,
        "ready_probe_idle_interval_s": ready_probe_idle_interval,
        "stall_timeout_s": stall_timeout,
        "restart_max_attempts": restart_attempts,
        "restart_backoff_s": restart_backoff,
        "restart_backoff_max_s": restart_backoff_max,
        "engine_cpus": engine_cpus,
        "drain_timeout_s": drain_timeout,
        "engine_args": parse_engine_args(engine_arg),
        "quantization": quantization,
        "speculative_config": parse_speculative_config(speculative_config)
        if speculative_config
        else None,
        "kv_offload_gb": kv_offload_gb,
        "revision": revision,
        "degraded_layout": _layout(degraded_layout) if degraded_layout else None,
        "app_name": app_name,
    }
    if "max_model_len" in first_spec:
        values["max_model_len"] = first_spec["max_model_len"]
    values = {k: v for k, v in values.items() if v is not None}
    config = load_config(**values)
    # A later model: its own options from its --model value, every other flag as given.
    more = [load_config(**with_shared_fields(values, spec)) for spec in specs[1:]]
    if config.no_auth:
        err_console.print("[yellow]warning:[/] serving WITHOUT authentication (--no-auth)")

    from serve.app import deploy
    from serve.readiness import wait_until_ready

    endpoint = deploy(config, ray_address=address, more=more)
    if not as_json:
        models = f" ({1 + len(endpoint.routes)} models)" if endpoint.routes else ""
        err_console.print(
            f"deployed {endpoint.app_name}{models}: {endpoint.url}  (waiting for /ready)"
        )
    if wait:
        keys = config.resolved_api_keys()
        # Every model's app: the first's /ready, then each other's under its route.
        for route in ("", *endpoint.routes):
            wait_until_ready(
                endpoint.url + route,
                timeout_s=ready_timeout,
                api_key=keys[0] if keys else None,
                ca_file=str(tls_cert) if tls_cert else None,
            )
    if as_json:
        said = {"url": endpoint.url, "model": endpoint.model, "app": endpoint.app_name}
        typer.echo(json.dumps({**said, "routes": list(endpoint.routes)}))
    else:
        typer.echo(f"ready: {endpoint.url}/v1  model={endpoint.model}")


def _replica_count(
    asked: str, address: str | None, *, tp: int, pp: int, reserve: int = 0
) -> int | str:
    """--replicas as given (ServeConfig checks a number), or for auto the count the Ray
    cluster's free device slots hold (less ``reserve`` slots, the further models')."""
    if asked.strip().lower() != "auto":
        return asked
    from serve.app import _connect
    from serve.config import cluster_slots, replicas_for_free_slots

    _connect(address)
    slots = cluster_slots()
    count = replicas_for_free_slots(slots, tp=tp, pp=pp)
    if reserve:
        free = sum(int(n.device_free) for n in slots)
        count = max(1, min(count, (free - reserve) // (tp * pp)))
    return count


@app.command("serve-stop")
def serve_stop(
    app_name: str = typer.Option("llamacluster", "--app-name", help="Serve application name."),
    address: str | None = typer.Option(None, "--address", help=ADDRESS_HELP),
) -> None:
    """Stop the server (running requests get the drain period); keeps Ray running."""
    from serve.app import shutdown

    found = shutdown(app_name, ray_address=address)
    typer.echo(f"stopped {app_name}" if found else f"no application {app_name} was running")
