"""Data-parallel replicas: how many tp x pp groups a cluster's devices hold (`--replicas auto`).

Each replica is one tp x pp engine in a placement group of its own. tp stays inside a node where
it fits (tensor parallelism wants the in-node link), so a node of D devices holds D // tp blocks
of tp devices, and a replica takes pp such blocks (its pipeline stages, on one node or several).
On CPU nodes the worker slots share the host's memory: a node counts only the slots its memory
holds, each worker with its stage's weights, runtime headroom and KV cache.
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import BaseModel, Field, computed_field

from cluster.errors import ConfigError
from cluster.planner.engine_options import plan_weight_dtype
from cluster.planner.layout import _evaluate
from cluster.planner.memory import resolve_kv_dtype
from cluster.planner.options import ClusterShape, PlanOptions
from cluster.planner.shape import ModelShape

MAX_REPLICAS = 64
"""The most replicas the server runs behind one endpoint (serve.config.ServeConfig's bound)."""

HOST_MEMORY_FRACTION = 0.9
"""Share of a CPU node's memory its workers may take (the rest: OS, Ray, the engine process)."""


class ReplicaChoice(BaseModel):
    """How many tp x pp engines serve behind the endpoint, and why that many."""

    replicas: int = Field(ge=1, description="Engines (tp x pp groups) behind the endpoint.")
    tp: int = Field(ge=1, description="Tensor-parallel size of each replica.")
    pp: int = Field(ge=1, description="Pipeline-parallel size of each replica.")
    devices: int = Field(ge=0, description="Device slots of the cluster (GPUs or CPU slots).")
    auto: bool = Field(description="Chosen by the planner (--replicas auto), not given.")
    why: str = Field(description="How the count follows from the cluster, in one sentence.")

    @computed_field(description="replicas x tp x pp.")
    @property
    def devices_used(self) -> int:
        return self.replicas * self.tp * self.pp

    @computed_field(description="Device slots no replica uses.")
    @property
    def idle_devices(self) -> int:
        return max(0, self.devices - self.devices_used)

    def line(self) -> str:
        """``replicas: 4 of tp=2 × pp=1 (why)``: what `plan` and `up` print."""
        return f"replicas: {self.replicas} of tp={self.tp} × pp={self.pp} ({self.why})"


def host_slot_limit(host_gib: float, worker_gib: float, *, slots: int) -> int:
    """Workers a CPU node's memory holds, at most its ``slots``: HOST_MEMORY_FRACTION of the
    host over one worker's need (never below 0)."""
    if worker_gib <= 0:
        return slots
    return max(0, min(slots, int(HOST_MEMORY_FRACTION * host_gib // worker_gib)))


def explicit_replicas(count: int, *, tp: int, pp: int, devices: int) -> ReplicaChoice:
    """An integer --replicas, kept as given (the slot check refuses it when it does not fit)."""
    return ReplicaChoice(
        replicas=count, tp=tp, pp=pp, devices=devices, auto=False, why=f"--replicas {count}"
    )


def choose_replicas(
    node_devices: Sequence[int],
    *,
    tp: int,
    pp: int,
    memory_slots: Sequence[int | None] | None = None,
    limit: int = MAX_REPLICAS,
) -> ReplicaChoice:
    """As many tp x pp groups as the nodes' devices hold, tp inside a node where it fits.

    ``node_devices``: device slots per node. ``memory_slots``: per node, how many of its slots
    its memory holds (CPU nodes share the host's memory; None: all of them). A layout wider than
    the cluster is a ConfigError; a layout that fits the devices but not the memory count is
    still one replica (the engine itself is the judge of one).
    """
    if not node_devices:
        raise ConfigError("no nodes to place replicas on", hint="check the inventory")
    need = tp * pp
    total = sum(node_devices)
    devices = f"{total} device{'s' if total != 1 else ''}"
    shape = _describe(node_devices)
    if need > total:
        raise ConfigError(
            f"tp={tp} × pp={pp} needs {need} devices; the cluster has {total} ({shape})",
            hint="lower --tp/--pp (left out, the planner picks a layout that fits) or add nodes",
        )
    caps = list(memory_slots) if memory_slots is not None else [None] * len(node_devices)
    usable = [d if cap is None else min(d, cap) for d, cap in zip(node_devices, caps, strict=True)]
    capped = [
        f"node {i + 1}'s memory holds {u} of its {d} slots"
        for i, (d, u) in enumerate(zip(node_devices, usable, strict=True))
        if u < d
    ]
    if tp <= max(node_devices):
        blocks = sum(u // tp for u in usable)
        groups = blocks // pp
        why = f"{devices} on {shape}; tp={tp} inside a node: {blocks} block(s) of {tp}"
        if pp > 1:
            why += f", {pp} per replica (pp={pp})"
    else:
        groups = sum(usable) // need
        why = (
            f"{devices} on {shape}; tp={tp} is wider than a node, so each replica spans "
            "nodes (its all-reduces cross the network)"
        )
    if capped:
        why += "; " + ", ".join(capped)
    if groups < 1:
        # The devices hold one (checked above) but the blocks or the memory count do not:
        # one replica, placed across what is there, as an integer --replicas 1 would be.
        groups = 1
        why += "; one replica across the nodes"
    if groups > limit:
        why += f"; capped at {limit}"
        groups = limit
    idle = total - groups * need
    if idle:
        why += f"; {idle} device(s) idle"
    return ReplicaChoice(replicas=groups, tp=tp, pp=pp, devices=total, auto=True, why=why)


def worker_memory_gib(
    shape: ModelShape,
    cluster: ClusterShape,
    *,
    tp: int,
    pp: int,
    options: PlanOptions | None = None,
) -> float:
    """Memory one worker of a tp x pp layout needs besides its KV cache: the fullest stage's
    weights per device plus the runtime headroom, GiB (the planner's per-device figures)."""
    options = options or PlanOptions()
    weight_dtype = plan_weight_dtype(shape, options.dtype, options.quantization)
    kv_dtype = resolve_kv_dtype(options.kv_dtype, weight_dtype)
    layout, _ = _evaluate(
        shape, cluster, options, tp=tp, pp=pp, weight_dtype=weight_dtype, kv_dtype=kv_dtype
    )
    return max(s.weights_gib + s.headroom_gib for s in layout.stages)


def cpu_memory_slots(
    node_devices: Sequence[int],
    host_gib: Sequence[float | None],
    *,
    worker_gib: float,
    kv_cache_gib: float,
) -> list[int | None]:
    """Per CPU node, the worker slots its memory holds (None where the memory is unknown)."""
    need = worker_gib + kv_cache_gib
    return [
        None if host is None else host_slot_limit(host, need, slots=d)
        for d, host in zip(node_devices, host_gib, strict=True)
    ]


def _describe(node_devices: Sequence[int]) -> str:
    """``2 nodes × 4`` when alike, else ``3 nodes (4, 4, 2)``."""
    n = len(node_devices)
    nodes = f"{n} node{'s' if n > 1 else ''}"
    if len(set(node_devices)) == 1:
        return f"{nodes} × {node_devices[0]}"
    return f"{nodes} ({', '.join(map(str, node_devices))})"
