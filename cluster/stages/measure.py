"""Measure stage: each machine's memory bandwidth and matmul speed (and, on GPU nodes, each
GPU's copy, matmul and weight-streaming rates), and TCP from the head to each worker, recorded
for the planner (tp × pp defaults, expected speed, `plan --ips`) and shown by `status`.

After the env stage, because the CPU benchmark needs the env's torch (the system python3 rarely
has torch or even numpy, and a pure-Python loop measures the interpreter, not the memory); the
link test needs only the standard library but runs from the same remote program
(cluster/measure.py) so one verb set serves `up` and `plan --measure`. Before the download, so
nothing else loads the CPUs or the network while it runs.
"""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from cluster.errors import ConfigError, RemoteError
from cluster.inventory import Node
from cluster.measure import (
    CpuMeasurement,
    CpuRequest,
    GpuMeasurement,
    GpuRequest,
    LinkMeasurement,
    ReceiveRequest,
    SendRequest,
    call,
    slowest_link,
)
from cluster.remote import Reply, parse_reply
from cluster.stages.base import ClusterContext, Reporter, Stage, StageCheck, StageOutcome, UpContext
from cluster.stages.env import env_dir_for, env_python
from cluster.stages.preflight import FREE_PORTS_TEMPLATE
from cluster.state import MeasureSection, NodeState

if TYPE_CHECKING:
    from rich.console import Console

    from cluster.device_specs import DeviceSpec

#: Seconds the link test streams per worker.
LINK_SECONDS = 2.0
#: Parallel TCP connections of the link test (one stream rarely fills a fast link).
LINK_STREAMS = 4


def machines(nodes: list[NodeState]) -> dict[str, list[NodeState]]:
    """Nodes grouped by the machine they run on (machine id, else host): nodes sharing a
    machine share its CPU and memory, so one measurement (run alone) stands for all of them."""
    groups: dict[str, list[NodeState]] = {}
    for n in nodes:
        groups.setdefault(n.machine_id or n.host, []).append(n)
    return groups


def link_pairs(nodes: list[NodeState]) -> list[tuple[NodeState, NodeState]]:
    """(head, worker) for each worker at another private address than the head."""
    if not nodes:
        return []
    head = nodes[0]
    return [(head, w) for w in nodes[1:] if w.private_ip != head.private_ip]


def machine_slots(nodes: list[NodeState]) -> dict[str, int]:
    """Per node name: the worker slots of all nodes on its machine (the engine's threads there
    are the machine's cores less these)."""
    return {
        n.name: sum(max(1, m.devices) for m in group)
        for group in machines(nodes).values()
        for n in group
    }


def gpu_is_current(node: NodeState, measured: GpuMeasurement | None) -> bool:
    """Whether a node has the GPU measurement it needs: none for a CPU node; for a GPU node one
    of its machine covering at least as many devices as preflight counted."""
    if node.device_kind != "gpu":
        return True
    if measured is None or len(measured.devices) < node.devices:
        return False
    return not (measured.machine_id and node.machine_id and measured.machine_id != node.machine_id)


def is_current(ctx: ClusterContext) -> bool:
    """Whether every node has a CPU measurement of its machine for its slots (with the engine
    kernel's rate), every GPU node a GPU one, and every worker a link one to its address."""
    recorded = ctx.state.measure
    slots = machine_slots(ctx.state.nodes)
    serving = ctx.state.server.config_digest is not None
    for n in ctx.state.nodes:
        # GPUs an engine holds are not measured (see measure_gpus): what was recorded stays.
        if not serving and not gpu_is_current(n, recorded.gpu.get(n.name)):
            return False
        cpu = recorded.cpu.get(n.name)
        if cpu is None or cpu.gemv_gbs is None or cpu.slots != slots[n.name]:
            return False
        if cpu.library == "torch" and cpu.layer_overhead_ms is None:
            return False  # measured before the per-layer cost was: measure again
        if cpu.machine_id and n.machine_id and cpu.machine_id != n.machine_id:
            return False
    for _, worker in link_pairs(ctx.state.nodes):
        link = recorded.links.get(worker.name)
        if link is None or link.dst_ip != worker.private_ip:
            return False
    return True


class Measure(Stage):
    """CPU micro-benchmark per machine, TCP bandwidth and round trip from the head to every
    worker; a rerun keeps what was measured for the same machines and addresses."""

    name = "measure"
    title = "measure CPU memory bandwidth and matmul speed, GPUs, and the head-to-worker links"
    sections = ("measure",)

    def check(self, ctx: ClusterContext) -> StageCheck:
        """What was measured (no new measurement: status stays cheap)."""
        recorded = ctx.state.measure
        if not recorded.cpu:
            return StageCheck(None, "nothing measured")
        per_node = {
            n.label: _describe(recorded, n.name) for n in ctx.state.nodes if n.name in recorded.cpu
        }
        links = [link.describe() for link in recorded.links.values()]
        head = ctx.state.head
        cpu = recorded.cpu.get(head.name) if head else None
        first = _describe(recorded, head.name) if cpu and head else next(iter(per_node.values()))
        message = f"head {first}" + ("; " + "; ".join(links) if links else "")
        return StageCheck(True, message, per_node)

    def plan(self, ctx: UpContext) -> dict[str, list[str]]:
        python = env_python(env_dir_for(ctx))
        plan = {
            n.label: [call(python, "cpu", CpuRequest()).display("one node per machine")]
            for n in ctx.cluster
        }
        kinds = {n.name: n.device_kind for n in ctx.state.nodes}
        for n in ctx.cluster:
            if kinds.get(n.name, "gpu") == "gpu":
                note = "GPU node" if n.name in kinds else "if preflight finds GPUs"
                plan[n.label].append(call(python, "gpu", GpuRequest()).display(note))
        for w in ctx.cluster.workers:
            ip = w.private_ip or w.host
            plan[w.label] += [
                FREE_PORTS_TEMPLATE.format(count=1),
                call(
                    python, "receive", ReceiveRequest(ip=ip, port=1, streams=LINK_STREAMS)
                ).display("on the port just chosen"),
            ]
            plan[ctx.head.label].append(
                call(
                    python,
                    "send",
                    SendRequest(host=ip, port=1, streams=LINK_STREAMS, seconds=LINK_SECONDS),
                ).display(f"to {w.label}'s receiver, at the same time")
            )
        return plan

    def run(self, ctx: UpContext) -> StageOutcome:
        if is_current(ctx):
            return StageOutcome("unchanged", self._summary(ctx))
        python = env_python(str(ctx.state.env.dir or env_dir_for(ctx)))
        recorded = ctx.state.measure
        fresh = measure_nodes(ctx, python)
        recorded.cpu, recorded.links, recorded.gpu = fresh.cpu, fresh.links, fresh.gpu
        for n in ctx.state.nodes:
            ctx.reporter.node(n.label, _describe(recorded, n.name))
        for link in recorded.links.values():
            ctx.reporter.info(link.describe())
        return StageOutcome("done", self._summary(ctx))

    @staticmethod
    def _summary(ctx: UpContext) -> str:
        recorded = ctx.state.measure
        head = ctx.state.nodes[0]
        cpu = recorded.cpu[head.name]
        text = f"head read {cpu.read_gbs:.1f} GB/s, {cpu.dtype} {cpu.matmul_tflops:.3g} TFLOP/s"
        if head.name in recorded.gpu:
            text += f"; GPU {recorded.gpu[head.name].describe()}"
        if recorded.links:
            slowest = min(recorded.links.values(), key=lambda link: link.gbps)
            text += f"; slowest link {slowest.describe()}"
        return text


def _describe(recorded: MeasureSection, name: str) -> str:
    """A node's measurements on one line: its CPU's, then its GPUs' when it has them."""
    gpu = recorded.gpu.get(name)
    return recorded.cpu[name].describe() + (f"; GPU {gpu.describe()}" if gpu else "")


def measure_nodes(ctx: ClusterContext, python: str) -> MeasureSection:
    """Measure every machine's CPU, every GPU node's GPUs and every head-to-worker link of
    ``ctx`` with ``python``."""
    cpu = measure_cpus(ctx, python)  # first: the link test must not share the CPUs with it
    gpu = measure_gpus(ctx, python)
    links = {w.name: measure_link(ctx, python, h, w) for h, w in link_pairs(ctx.state.nodes)}
    return MeasureSection(cpu=cpu, links=links, gpu=gpu)


def measure_here(python: str | None = None, *, slots: int = 1) -> CpuMeasurement:
    """This machine's CPU for ``slots`` worker slots, by the same remote program run as a child
    of ``python`` (default: the running interpreter), as `plan --measure` does without --ips."""
    from cluster.runner import LocalRunner

    request = call(python or sys.executable, "cpu", CpuRequest(slots=slots))
    reply = request.run(LocalRunner().run, timeout=300)
    return CpuMeasurement.model_validate(reply.value(what="the CPU micro-benchmark"))


def measure_recorded(name: str, *, console: Console | None = None) -> MeasureSection:
    """Measure the nodes of the cluster ``name`` now, with its env (`plan --measure --ips`);
    the state is left as it is (the measure stage of `up` records)."""
    from cluster.recorded import RecordedCluster

    recorded = RecordedCluster.load(name)
    state = recorded.state
    if not state.env.dir or not state.nodes:
        raise ConfigError(
            f"cluster {name!r} has no Python env on its nodes yet: nothing to measure with",
            hint=f"run `llamacluster up` for it (at least through its env stage: --name {name})",
        )
    ctx = ClusterContext(
        cluster=recorded.inventory,
        state=state,
        runners=recorded.runners(),
        reporter=Reporter(console),
    )
    return measure_nodes(ctx, env_python(state.env.dir))


def measure_cpus(ctx: ClusterContext, python: str) -> dict[str, CpuMeasurement]:
    """One run per machine, machines in parallel; a machine's nodes share its result.

    Each run uses the threads the engine will have there: the machine's cores less one per
    worker slot of its nodes (vLLM's CPU backend keeps those for its schedulers)."""
    groups = machines(ctx.state.nodes)
    per_node = machine_slots(ctx.state.nodes)
    slots = {g[0].name: per_node[g[0].name] for g in groups.values()}
    by_name: dict[str, CpuMeasurement] = {}
    for count in sorted(set(slots.values())):  # machines alike run as one fan-out
        request = call(python, "cpu", CpuRequest(slots=count))
        results = ctx.run(
            request.command,
            what="CPU micro-benchmark",
            nodes=[n for n in ctx.cluster if slots.get(n.name) == count],
            stdin=request.stdin,
            timeout=300,
            check=False,
        )
        for node, result in results.items():
            reply = Reply(result, parse_reply(result.stdout)).value(what="the CPU micro-benchmark")
            rec = ctx.node_state(node)
            by_name[node.name] = CpuMeasurement.model_validate(
                {**reply, "machine_id": rec.machine_id}
            )
    return {
        n.name: by_name[group[0].name]
        for group in groups.values()
        for n in group
        if group[0].name in by_name
    }


def measure_gpus(ctx: ClusterContext, python: str) -> dict[str, GpuMeasurement]:
    """The GPU micro-benchmark once per machine with GPU nodes, machines in parallel (a
    machine's GPU nodes share its result); empty on a CPU-only cluster. While a server runs
    its engines hold the GPUs: nothing is measured (the rates would be the leftovers beside
    an engine) and what was recorded before is kept. A node whose benchmark fails is warned
    about and planned from the device table."""
    groups = machines([n for n in ctx.state.nodes if n.device_kind == "gpu"])
    if not groups:
        return {}
    if ctx.state.server.config_digest is not None:
        ctx.reporter.info("GPUs not measured: the server's engines hold them (kept as recorded)")
        return dict(ctx.state.measure.gpu)
    first = {g[0].name for g in groups.values()}
    request = call(python, "gpu", GpuRequest())
    results = ctx.run(
        request.command,
        what="GPU micro-benchmark",
        nodes=[n for n in ctx.cluster if n.name in first],
        stdin=request.stdin,
        timeout=300,
        check=False,
    )
    by_name: dict[str, GpuMeasurement] = {}
    for node, result in results.items():
        reply = Reply(result, parse_reply(result.stdout))
        if not reply.ok:
            hint = (reply.data or {}).get("hint")
            ctx.reporter.warn(
                f"the GPU micro-benchmark failed on {result.node}: {reply.error}"
                + (f" ({hint})" if hint else "")
                + "; its GPUs are planned from the device table"
            )
            continue
        by_name[node.name] = GpuMeasurement.model_validate(
            {**(reply.data or {}), "machine_id": ctx.node_state(node).machine_id}
        )
    return {
        n.name: by_name[group[0].name]
        for group in groups.values()
        for n in group
        if group[0].name in by_name
    }


def measure_link(
    ctx: ClusterContext, python: str, head: NodeState, worker: NodeState
) -> LinkMeasurement:
    """A receiver on the worker's private IP (a free port chosen there, as preflight
    chooses ports) and the sender on the head, run side by side."""
    wnode = _node(ctx, worker.name)
    port = int(
        ctx.run(FREE_PORTS_TEMPLATE.format(count=1), what="choosing a port", nodes=[wnode])[
            wnode
        ].stdout.split()[0]
    )
    ip = str(worker.private_ip)
    rx = call(python, "receive", ReceiveRequest(ip=ip, port=port, streams=LINK_STREAMS))
    tx = call(
        python,
        "send",
        SendRequest(host=ip, port=port, streams=LINK_STREAMS, seconds=LINK_SECONDS),
    )
    with ThreadPoolExecutor(2) as pool:
        receiving = pool.submit(
            lambda: rx.run(
                lambda cmd, **kw: ctx.run(cmd, nodes=[wnode], **kw)[wnode],
                what=f"link test receiver on {worker.label}",
                timeout=120,
                check=False,
            )
        )
        sent = tx.run(ctx.run_head, what=f"link test to {worker.label}", timeout=120, check=False)
        received = receiving.result()
    if not sent.ok:
        why = received.error if not received.ok else sent.error
        raise RemoteError(
            f"link test {head.label} → {worker.label} ({ip}:{port}) failed: {why}",
            hint="preflight proved the port range open; rerun `up`, or --skip measure",
        )
    return LinkMeasurement.model_validate(
        {**sent.value(what="the link test"), "src": head.name, "dst": worker.name}
    )


def _node(ctx: ClusterContext, name: str) -> Node:
    return next(n for n in ctx.cluster if n.name == name)


def measured_cpu_spec(
    nodes: list[NodeState],
    recorded: MeasureSection,
    *,
    memory_gib: float | None = None,
    slots: int | None = None,
) -> DeviceSpec | None:
    """The planner's CPU device from what the measure stage recorded: the slowest machine's
    numbers (a pipeline runs at its slowest stage's pace), shared by that node's slots (or by
    ``slots``); None when nothing was measured or the nodes are GPU nodes."""
    from cluster.device_specs import measured_cpu_device

    measured = [(recorded.cpu[n.name], n) for n in nodes if n.name in recorded.cpu]
    if not measured or any(n.device_kind != "cpu" for n in nodes):
        return None

    def per_slot(pair: tuple[CpuMeasurement, NodeState]) -> float:
        return pair[0].weight_stream_gbs / (slots or max(1, pair[1].devices))

    cpu, node = min(measured, key=per_slot)
    share = slots or max(1, node.devices)
    return measured_cpu_device(cpu, slots=share, memory_gib=memory_gib, where=node.label)


def measured_gpu_spec(
    nodes: list[NodeState], recorded: MeasureSection, *, memory_gib: float | None = None
) -> DeviceSpec | None:
    """The planner's GPU device from what the measure stage recorded: the table's entry for the
    slowest measured GPU node's card (lowest copy rate: a pipeline runs at its slowest stage's
    pace) with its measured rates; None unless every node is a GPU node with a measurement."""
    from cluster.device_specs import measured_gpu_device

    if not nodes or any(n.device_kind != "gpu" or n.name not in recorded.gpu for n in nodes):
        return None
    node = min(nodes, key=lambda n: recorded.gpu[n.name].copy_gbs)
    return measured_gpu_device(recorded.gpu[node.name], memory_gib=memory_gib, where=node.label)


def measured_link_gbps(recorded: MeasureSection) -> float | None:
    """The network the planner should assume between nodes: the slowest link measured."""
    slowest = slowest_link(recorded.links)
    return slowest.gbps if slowest else None
