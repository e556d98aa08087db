"""`--replicas auto`: how many tp x pp replicas the planner fits on several inventories."""

from __future__ import annotations

import json

import pytest

from cluster.device_specs import get_device
from cluster.errors import ConfigError
from cluster.planner import (
    ClusterShape,
    choose_replicas,
    cpu_memory_slots,
    explicit_replicas,
    host_slot_limit,
    plan_deployment,
    worker_memory_gib,
)
from tests.cluster.test_planner import LLAMA3_70B, run_cli, shape_of, write_model_dir


@pytest.mark.parametrize(
    ("nodes", "tp", "pp", "replicas", "idle"),
    [
        ([8], 2, 1, 4, 0),  # one node of 8 GPUs, tp=2: four groups
        ([4, 4], 4, 1, 2, 0),  # one group per node
        ([4, 4], 4, 2, 1, 0),  # tp=8 does not fit a node: tp=4 with pp=2, one replica
        ([4, 4], 8, 1, 1, 0),  # tp=8 forced wider than a node: one replica across both
        ([8, 8], 4, 1, 4, 0),
        ([3, 3], 2, 1, 2, 2),  # a device left on each node
        ([4, 2], 4, 1, 1, 2),  # the 2-GPU node cannot hold a tp=4 block
        ([2, 2, 2], 2, 2, 1, 2),  # three tp=2 blocks, two per replica
        ([1], 1, 1, 1, 0),  # the one-slot CPU machine: the direct-ingress single replica
    ],
)
def test_replicas_fill_the_devices_with_tp_inside_a_node(nodes, tp, pp, replicas, idle):
    choice = choose_replicas(nodes, tp=tp, pp=pp)
    assert (choice.replicas, choice.idle_devices) == (replicas, idle), choice.why
    assert choice.auto and choice.devices_used == replicas * tp * pp
    assert choice.line().startswith(f"replicas: {replicas} of tp={tp} × pp={pp} (")


def test_why_names_the_cluster_and_what_is_left():
    choice = choose_replicas([3, 3], tp=2, pp=1)
    assert "6 devices on 2 nodes × 3" in choice.why and "tp=2 inside a node" in choice.why
    assert "2 device(s) idle" in choice.why
    wide = choose_replicas([4, 4], tp=8, pp=1)
    assert "wider than a node" in wide.why
    uneven = choose_replicas([4, 2], tp=4, pp=1)
    assert "2 nodes (4, 2)" in uneven.why


def test_a_layout_larger_than_the_cluster_is_one_clear_error():
    with pytest.raises(ConfigError) as info:
        choose_replicas([4, 4], tp=8, pp=2)
    assert info.value.message == "tp=8 × pp=2 needs 16 devices; the cluster has 8 (2 nodes × 4)"
    assert info.value.hint and "--tp/--pp" in info.value.hint
    with pytest.raises(ConfigError, match="no nodes"):
        choose_replicas([], tp=1, pp=1)


def test_at_most_the_servers_limit():
    choice = choose_replicas([8] * 10, tp=1, pp=1)
    assert choice.replicas == 64 and "capped at 64" in choice.why


def test_cpu_slots_count_only_what_the_hosts_memory_holds():
    # Two slots, each worker 1.5 GiB + 1 GiB of KV cache: 24 GiB holds both, 4 GiB one.
    assert host_slot_limit(24, 2.5, slots=2) == 2
    assert host_slot_limit(4, 2.5, slots=2) == 1
    assert host_slot_limit(2, 2.5, slots=2) == 0
    slots = cpu_memory_slots([2, 2], [24.0, 4.0], worker_gib=1.5, kv_cache_gib=1)
    assert slots == [2, 1]
    assert cpu_memory_slots([2], [None], worker_gib=1.5, kv_cache_gib=1) == [None]
    choice = choose_replicas([2, 2], tp=1, pp=1, memory_slots=slots)
    assert choice.replicas == 3 and "node 2's memory holds 1 of its 2 slots" in choice.why
    # Memory too small even for one worker: still one replica (the engine is the judge).
    one = choose_replicas([2], tp=1, pp=1, memory_slots=[0])
    assert one.replicas == 1 and "one replica" in one.why


def test_worker_memory_is_the_planners_per_device_figure():
    shape = shape_of(LLAMA3_70B)
    cluster = ClusterShape(nodes=1, devices_per_node=8, device=get_device("a100-80gb"))
    plan = plan_deployment(shape, cluster)
    need = worker_memory_gib(shape, cluster, tp=plan.tp, pp=plan.pp)
    fullest = max(s.weights_gib + s.headroom_gib for s in plan.memory)
    assert need == pytest.approx(fullest)
    assert worker_memory_gib(shape, cluster, tp=4, pp=1) < need  # a wider tp holds less each


def test_an_integer_is_kept_as_given():
    choice = explicit_replicas(3, tp=2, pp=1, devices=8)
    assert (choice.replicas, choice.auto, choice.idle_devices) == (3, False, 2)
    assert choice.why == "--replicas 3"


def test_plan_shows_the_replica_line(tmp_path, capsys):
    path = write_model_dir(tmp_path, LLAMA3_70B)
    args = ["plan", "--model", str(path), "--gpu", "a100-80gb", "--gpus-per-node", "8"]
    code, out, _ = run_cli([*args, "--nodes", "2", "--max-model-len", "8192"], capsys)
    assert code == 0
    # 70B at 8k fits tp=2 on an 80 GiB A100: 16 GPUs hold 8 replicas.
    assert "replicas: 8 of tp=2 × pp=1 (16 devices on 2 nodes × 8; tp=2 inside a node" in out
    code, out, _ = run_cli([*args, "--max-model-len", "8192", "--json"], capsys)
    replicas = json.loads(out)["replicas"]
    assert (replicas["replicas"], replicas["devices_used"], replicas["auto"]) == (4, 8, True)
