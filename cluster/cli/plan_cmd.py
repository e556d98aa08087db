"""`llamacluster plan`: size a deployment (tp x pp, memory, speed, cost) from a model's config."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from cluster.cli.app import app, table_console
from cluster.errors import ConfigError

if TYPE_CHECKING:
    from rich.console import Group

    from cluster.device_specs import DeviceSpec
    from cluster.planner import ClusterShape, Plan, PlanOptions, ReplicaChoice, SharedDevices


@app.command("plan")
def plan(
    model: list[str] = typer.Option(
        ...,
        "--model",
        "-m",
        help="Hub repo id or local model directory. Repeat it for several models on one "
        "cluster, each as PATH_OR_REPO[,tp=N][,pp=N][,replicas=N][,max-model-len=N] (as `up` "
        "takes them; name= and lora= are accepted, name= titles the model).",
    ),
    revision: str | None = typer.Option(
        None, "--revision", help="Hub revision (branch, tag, commit)."
    ),
    ips: Path | None = typer.Option(
        None, "--ips", help="Inventory file (deploy/ips.txt): the node count comes from it."
    ),
    nodes: int | None = typer.Option(None, "--nodes", min=1, help="Number of nodes (default 1)."),
    gpus_per_node: int = typer.Option(1, "--gpus-per-node", min=1, help="Devices per node."),
    gpu: str | None = typer.Option(
        None,
        "--gpu",
        help="Device name from the spec table (see docs/PLANNER.md); default h100-sxm, or the "
        "measured CPU with --measure.",
    ),
    gpu_mem_gb: float | None = typer.Option(
        None, "--gpu-mem-gb", help="Override device memory (GiB)."
    ),
    mem_bandwidth_gbs: float | None = typer.Option(
        None, "--mem-bandwidth-gbs", help="Override memory bandwidth (GB/s)."
    ),
    tflops: float | None = typer.Option(
        None, "--tflops", help="Override dense bf16 peak (TFLOP/s)."
    ),
    interconnect_gbs: float | None = typer.Option(
        None, "--interconnect-gbs", help="Override in-node device link, GB/s per direction."
    ),
    dtype: str = typer.Option(
        "auto", "--dtype", help="Weights: auto, bf16, fp16, fp8, int8, int4, fp32."
    ),
    kv_dtype: str = typer.Option(
        "auto", "--kv-dtype", help="KV cache: auto, bf16, fp16, fp8, fp32."
    ),
    max_model_len: int | None = typer.Option(
        None, "--max-model-len", min=1, help="Context to hold (default: the config's maximum)."
    ),
    prompt_len: int = typer.Option(
        512, "--prompt-len", min=1, help="Prompt tokens (prefill, decode context)."
    ),
    concurrency: int = typer.Option(32, "--concurrency", min=1, help="Sequences decoding at once."),
    mem_fraction: float = typer.Option(
        0.9, "--mem-fraction", min=0.01, max=1.0, help="Share of device memory vLLM may use."
    ),
    link_gbps: float | None = typer.Option(
        None,
        "--link-gbps",
        min=0.001,
        help="Network between nodes, Gbit/s (default: the slowest link `up` measured between "
        "the --ips nodes, else 100).",
    ),
    measure: bool = typer.Option(
        False,
        "--measure",
        help="Plan CPU nodes with measured numbers: this machine's CPU, or with --ips the "
        "nodes' CPUs and links (measured now with the env `up` installed there).",
    ),
    name: str | None = typer.Option(
        None, "--name", help="With --ips: the cluster's name, when `up` was given --name."
    ),
    cost_per_hour: float | None = typer.Option(
        None, "--cost-per-hour", min=0.0001, help="Whole cluster's price, dollars per hour."
    ),
    flops_efficiency: float | None = typer.Option(
        None,
        "--flops-efficiency",
        min=0.01,
        max=1.0,
        help="Achieved/peak FLOP/s for the expected figures (default: the device's fitted curve).",
    ),
    bandwidth_efficiency: float | None = typer.Option(
        None,
        "--bandwidth-efficiency",
        min=0.01,
        max=1.0,
        help="Achieved/peak bandwidth for the expected figures (default: the fitted curve).",
    ),
    quantization: str | None = typer.Option(
        None, "--quantization", "-q", help="vLLM quantization method (fp8, awq, gptq, ...)."
    ),
    speculative_config: str | None = typer.Option(
        None,
        "--speculative-config",
        help='vLLM speculative decoding JSON, e.g. \'{"method": "eagle", "model": "DIR", '
        "\"num_speculative_tokens\": 3}': the draft's memory is counted.",
    ),
    kv_offload_gb: float | None = typer.Option(
        None, "--kv-offload-gb", min=0.001, help="Host-memory KV cache (vLLM CPU offload), GiB."
    ),
    tp: int | None = typer.Option(None, "--tp", min=1, help="Force the tensor-parallel size."),
    pp: int | None = typer.Option(None, "--pp", min=1, help="Force the pipeline-parallel size."),
    as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON."),
) -> None:
    """Size a deployment before renting it: parameters, memory per device, tp x pp, speed, cost.

    With several --model values: each model's plan, then how they share the cluster (as `up`
    would serve them behind one endpoint) and whether they fit together."""
    from cluster.device_specs import get_device
    from cluster.planner import ClusterShape, PlanOptions, load_model_shape, plan_deployment
    from cluster.planner.engine_options import draft_cost, parse_speculative_config

    specs = _model_specs(model, tp=tp, pp=pp, max_model_len=max_model_len)
    node_count = _node_count(ips, nodes)
    # A bad --model fails before measuring.
    shapes = [load_model_shape(s["model"], revision=revision) for s in specs]
    overrides = {
        "memory_gib": gpu_mem_gb,
        "bandwidth_gbs": mem_bandwidth_gbs,
        "bf16_tflops": tflops,
        "interconnect_gbs": interconnect_gbs,
    }
    device, measured_link = _measured(ips, name, gpu=gpu, measure=measure, slots=gpus_per_node)
    if device is None:
        device = get_device(gpu or ("cpu" if measure else "h100-sxm"), **overrides)
    elif any(v is not None for v in overrides.values()):
        device = device.model_copy(update={k: v for k, v in overrides.items() if v is not None})
    link = link_gbps or measured_link or 100.0
    cluster = ClusterShape(
        nodes=node_count, devices_per_node=gpus_per_node, device=device, link_gbps=link
    )
    spec = parse_speculative_config(speculative_config) if speculative_config else None
    draft = None
    if spec is not None:
        draft_model = spec.get("model")
        draft_shape = load_model_shape(str(draft_model)) if draft_model else None
        draft = draft_cost(spec, shapes[0], draft_shape=draft_shape)
    options = PlanOptions(
        quantization=quantization,
        speculative_config=spec,
        draft=draft,
        kv_offload_gib=kv_offload_gb,
        dtype=dtype,
        kv_dtype=kv_dtype,
        max_model_len=specs[0].get("max_model_len"),
        prompt_len=prompt_len,
        concurrency=concurrency,
        mem_fraction=mem_fraction,
        flops_efficiency=flops_efficiency,
        bandwidth_efficiency=bandwidth_efficiency,
        cost_per_hour=cost_per_hour,
        tp=specs[0].get("tp"),
        pp=specs[0].get("pp"),
    )
    plans = []
    for i, (one, shape) in enumerate(zip(specs, shapes, strict=True)):
        # --quantization and --speculative-config are the first model's, as in `up`.
        mine = options if i == 0 else _further_options(options, one)
        try:
            plans.append(plan_deployment(shape, cluster, mine))
        except ConfigError as exc:
            if len(specs) == 1:
                raise
            raise ConfigError(f"{_model_name(one)}: {exc.message}", hint=exc.hint) from None
    shared = _shared(specs, plans)
    plans = [
        p.model_copy(update={"replicas": _replica_choice(shared, i)}) for i, p in enumerate(plans)
    ]
    if as_json:
        data = (
            plans[0].model_dump(mode="json")
            if len(plans) == 1
            else {
                "plans": [p.model_dump(mode="json") for p in plans],
                "together": shared.model_dump(mode="json"),
            }
        )
        typer.echo(json.dumps(data, indent=2))
    elif len(plans) == 1:
        table_console().print(_render(plans[0]))
    else:
        from rich.text import Text

        console = table_console()
        for one, result in zip(specs, plans, strict=True):
            console.rule(Text(_model_name(one)), align="left")
            console.print(_render(result))
        console.print(_render_together(shared, cluster))
    shared.check(hint=PLAN_FIT_HINT)


PLAN_FIT_HINT = (
    "lower a model's replicas=, tp= or pp=, leave the first model's replicas= out so it takes "
    "what is left, plan fewer models, or add nodes with --nodes or --gpus-per-node"
)
"""What `plan` suggests when the models do not fit together."""


def _replica_choice(shared: SharedDevices, index: int) -> ReplicaChoice:
    """Model ``index``'s replicas as the models share the cluster (the first model's choice;
    a further model's as asked, else one)."""
    from cluster.planner import ReplicaChoice

    if index == 0:
        return shared.first
    m = shared.models[index]
    why = f"replicas={m.replicas} of its --model" if m.replicas > 1 else "one unless asked"
    return ReplicaChoice(
        replicas=m.replicas, tp=m.tp, pp=m.pp, devices=shared.devices, auto=False, why=why
    )


def _model_specs(
    models: list[str], *, tp: int | None, pp: int | None, max_model_len: int | None
) -> list[dict]:
    """Each --model value as serve.models.parse_model_spec reads it; --tp, --pp and
    --max-model-len are the first model's (refused when its own options set them too)."""
    from serve.models import parse_model_spec

    specs = [parse_model_spec(m) if "," in m or len(models) > 1 else {"model": m} for m in models]
    first = specs[0]
    for key, flag, value in (
        ("tp", "--tp", tp),
        ("pp", "--pp", pp),
        ("max_model_len", "--max-model-len", max_model_len),
    ):
        if value is None:
            continue
        if key in first:
            raise ConfigError(
                f"the first --model sets {key.replace('_', '-')} and {flag} is given too",
                hint="give it once",
            )
        first[key] = value
    return specs


def _model_name(spec: dict) -> str:
    """A model's name in the output: its name=, else a local directory's name or the repo id."""
    names = spec.get("served_model_name")
    if names:
        return names[0]
    path = Path(spec["model"]).expanduser()
    return path.absolute().name if path.exists() else spec["model"]


def _further_options(first: PlanOptions, spec: dict) -> PlanOptions:
    """A further model's knobs: the shared ones, its own tp, pp and max-model-len."""
    from cluster.planner import PlanOptions

    return PlanOptions.model_validate(
        {
            **dict(first),
            "quantization": None,
            "speculative_config": None,
            "draft": None,
            "tp": spec.get("tp"),
            "pp": spec.get("pp"),
            "max_model_len": spec.get("max_model_len"),
        }
    )


def _shared(specs: list[dict], plans: list[Plan]) -> SharedDevices:
    """How the models share the cluster: the first model's replicas as given (replicas=N),
    else its plan's auto count; the further models' as given, else 1."""
    from cluster.planner import ModelLayout, explicit_replicas, share_devices

    first = plans[0]
    choice = first.replicas
    if "num_replicas" in specs[0]:
        choice = explicit_replicas(
            specs[0]["num_replicas"],
            tp=first.tp,
            pp=first.pp,
            devices=first.cluster.total_devices,
        )
        choice = choice.model_copy(update={"why": f"replicas={choice.replicas} of its --model"})
    further = [
        ModelLayout(name=_model_name(s), tp=p.tp, pp=p.pp, replicas=s.get("num_replicas"))
        for s, p in zip(specs[1:], plans[1:], strict=True)
    ]
    return share_devices(choice, further, first_name=_model_name(specs[0]))


def _measured(
    ips: Path | None, name: str | None, *, gpu: str | None, measure: bool, slots: int
) -> tuple[DeviceSpec | None, float | None]:
    """The measured CPU or GPU device and slowest link, when there are any to use.

    ``--measure`` measures now: this machine, or the --ips nodes with the env `up` installed
    there. Without it, --ips takes what `up`'s measure stage recorded: the link always, the CPU
    numbers when planning CPU nodes (--gpu cpu), the GPU numbers when the nodes are GPU nodes
    and --gpu is not given or names their card."""
    from cluster.device_specs import get_device, measured_cpu_device
    from cluster.stages import measure as m

    named_cpu = gpu is not None and get_device(gpu).is_cpu
    wants_cpu = measure or named_cpu
    if measure and gpu is not None and not named_cpu:
        raise ConfigError(
            f"--measure measures CPU nodes, not {gpu}", hint="drop --gpu (or pass --gpu cpu)"
        )
    if ips is None:
        if not measure:
            return None, None
        cpu = m.measure_here(slots=slots)
        typer.echo(f"measured this machine: {cpu.describe()}", err=True)
        return measured_cpu_device(cpu, slots=slots), None
    from cluster.state import default_cluster_name, find_state

    cluster_name = name or default_cluster_name(ips)
    state = find_state(cluster_name)
    if measure:
        if state is None:
            raise ConfigError(
                f"no cluster recorded for {ips} (name {cluster_name!r}): nothing to measure with",
                hint=f"run `llamacluster up --ips {ips}` first (its measure stage records the "
                "numbers), or pass --name; `plan --measure` without --ips measures this machine",
            )
        section = m.measure_recorded(cluster_name)
    elif state is not None:
        section = state.measure
    else:
        return None, None
    nodes = state.nodes
    for line in (
        [section.cpu[n.name].describe() for n in nodes if n.name in section.cpu][:1]
        + [f"GPU {section.gpu[n.name].describe()}" for n in nodes if n.name in section.gpu][:1]
        + [link.describe() for link in section.links.values()]
    ):
        typer.echo(f"measured: {line}", err=True)
    device = m.measured_cpu_spec(nodes, section, slots=slots) if wants_cpu else None
    if device is None and not named_cpu:
        measured_gpu = m.measured_gpu_spec(nodes, section)
        if measured_gpu is not None and (gpu is None or get_device(gpu).key == measured_gpu.key):
            device = measured_gpu
    return device, m.measured_link_gbps(section)


def _node_count(ips: Path | None, nodes: int | None) -> int:
    """Nodes from the inventory (one per listed machine) or from --nodes."""
    if ips is None:
        return nodes or 1
    from cluster.inventory import load_inventory

    count = len(load_inventory(ips))
    if nodes is not None and nodes != count:
        raise ConfigError(
            f"--nodes {nodes} disagrees with the {count} nodes listed in {ips}",
            hint="drop --nodes when you pass --ips",
        )
    return count


def _render(plan: Plan) -> Group:
    """The plan as rich tables: model, layout and memory, speed, traffic, cost, notes."""
    from rich.console import Group
    from rich.table import Table

    m, perf, comm = plan.model, plan.performance, plan.communication
    model = Table(title=f"Model {m.name}", show_header=False, title_justify="left")
    model.add_row(
        "shape",
        f"{m.model_type}: {m.layers} layers, hidden {m.hidden_size}, "
        f"{m.heads} heads / {m.kv_heads} KV heads x {m.head_dim}, vocab {m.vocab_size}"
        + (", tied embeddings" if m.tied_embeddings else ""),
    )
    if m.num_experts:
        model.add_row("experts", f"{m.num_experts} routed, {m.experts_per_token} per token")
    model.add_row(
        "parameters", f"{m.params.total / 1e9:.2f} B total, {m.params.active / 1e9:.2f} B active"
    )
    model.add_row(
        "weights", ", ".join(f"{d} {g:.1f} GiB" for d, g in m.weight_gib_by_dtype.items())
    )
    model.add_row("KV cache", f"{m.kv_bytes_per_token / 1024:.1f} KiB per token ({plan.kv_dtype})")

    dev = plan.cluster.device
    layout = Table(
        title=f"Layout tp={plan.tp} x pp={plan.pp} = {plan.devices_used} of "
        f"{plan.cluster.total_devices} x {dev.name}, {plan.weight_dtype} weights, "
        f"max_model_len {plan.max_model_len}",
        title_justify="left",
    )
    for col in (
        "stage",
        "layers",
        "weights GiB",
        "KV cache GiB",
        "headroom GiB",
        "budget/device GiB",
        "KV tokens",
    ):
        layout.add_column(col, justify="right")
    for s in plan.memory:
        layout.add_row(
            str(s.stage),
            s.layers,
            f"{s.weights_gib:.2f}",
            f"{s.kv_cache_gib:.2f}",
            f"{s.headroom_gib:.2f}",
            f"{s.budget_gib:.1f} / {s.device_gib:g}",
            f"{s.kv_tokens:,}",
        )
    layout.caption = f"{plan.sequences_fit} sequences of {plan.max_model_len} tokens fit at once"

    ideal, expected = perf.ideal, perf.expected
    speed = Table(
        title="Speed: ideal bound (datasheet rates) and expected (fitted efficiency)",
        title_justify="left",
    )
    speed.add_column("figure")
    for col in ("ideal", "expected", "bound", "memory ms", "compute ms", "comm ms"):
        speed.add_column(col, justify="right")
    step_rows = (
        (f"decode ms/token, batch 1, context {perf.context_tokens}", "decode_batch1"),
        (f"decode ms/token, {perf.effective_concurrency} concurrent", "decode_at_concurrency"),
        (f"prefill ms, {perf.context_tokens} tokens", "prefill"),
    )
    for label, field in step_rows:
        low, high = getattr(ideal, field), getattr(expected, field)
        speed.add_row(
            label,
            f"{low.total_ms:.2f}",
            f"{high.total_ms:.2f}",
            high.bound,
            f"{high.memory_ms:.2f}",
            f"{high.compute_ms:.2f}",
            f"{high.tp_comm_ms + high.pp_comm_ms:.3f}",
        )
    speed.add_row(
        f"output tokens/s at {perf.effective_concurrency} concurrent",
        f"{ideal.throughput_tokens_per_s:,.0f}",
        f"{expected.throughput_tokens_per_s:,.0f}",
    )
    speed.add_row(
        f"TTFT ms, {perf.context_tokens}-token prompt",
        f"{ideal.ttft_ms:.2f}",
        f"{expected.ttft_ms:.2f}",
    )
    speed.caption = "memory/compute/comm columns: the expected step"

    traffic = Table(title="Communication per token", show_header=False, title_justify="left")
    traffic.add_row(
        "tp all-reduce",
        f"{comm.tp_allreduce_bytes_per_token_per_layer / 1024:.1f} KiB per layer "
        f"at {comm.tp_link_gbs:g} GB/s: {comm.tp_ms_per_token:.4f} ms",
    )
    traffic.add_row(
        "pp hops",
        f"{comm.pp_hops} x {comm.pp_hop_bytes_per_token / 1024:.1f} KiB "
        f"({comm.pp_hops_across_nodes} over the {comm.network_gbs:g} GB/s network): "
        f"{comm.pp_ms_per_token:.4f} ms",
    )
    from rich.text import Text

    parts = [model, layout, Text(plan.replicas.line()), speed, traffic]
    if plan.cost is not None:
        cost = Table(title="Cost", show_header=False, title_justify="left")
        cost.add_row("cluster", f"${plan.cost.cost_per_hour:g} per hour")
        cost.add_row("per million output tokens", f"${plan.cost.dollars_per_million_tokens:.3f}")
        cost.add_row("tokens per cent", f"{plan.cost.tokens_per_cent:,.0f}")
        parts.append(cost)
    parts.extend(f"note: {n}" for n in plan.notes)
    return Group(*parts)


def _render_together(shared: SharedDevices, cluster: ClusterShape) -> Group:
    """How the models share the cluster: each one's layout and devices, the total, the fit."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    heading = Text(
        f"Together: {len(shared.models)} models on {shared.devices} x {cluster.device.name} "
        f"({cluster.nodes} node(s) of {cluster.devices_per_node})",
        style="italic",
    )
    table = Table()
    for col, justify in (
        ("model", "left"),
        ("tp", "right"),
        ("pp", "right"),
        ("replicas", "right"),
        ("devices", "right"),
    ):
        table.add_column(col, justify=justify)
    for m in shared.models:
        replicas = f"{m.replicas} (auto)" if m.auto else str(m.replicas)
        table.add_row(Text(m.name), str(m.tp), str(m.pp), replicas, str(m.devices))
    table.add_row("total", "", "", "", f"{shared.devices_used} of {shared.devices}")
    lines = [Text(f"{shared.models[0].name} replicas: {shared.first.why}")]
    return Group(heading, table, *(lines if shared.first.auto else []), Text(shared.line))
