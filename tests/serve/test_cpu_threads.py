"""Compute threads of CPU workers: `up` leaves one core per worker slot of each machine (so
replicas and tp ranks sharing a machine do not contend for the same cores), the setting reaches
each engine worker's environment, and it is refused on GPU nodes."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster.errors import ConfigError
from cluster.stages.serve import worker_threads
from cluster.state import NodeState
from serve.app import AOT_COMPILE_ENV, replica_env
from serve.config import ServeConfig, load_config


def _node(name: str, cpus: int | None, slots: int, machine: str, kind: str = "cpu") -> NodeState:
    info = {} if cpus is None else {"cpus": str(cpus)}
    return NodeState(
        name=name,
        label=name,
        host=name,
        devices=slots,
        device_kind=kind,
        device_info=info,
        machine_id=machine,
    )


def test_threads_leave_one_core_per_slot_of_each_machine() -> None:
    # One 2-core machine with two slots (two replicas): one thread each, not two.
    assert worker_threads([_node("head", 2, 2, "m1")]) == 1
    # A 32-core node with one slot: the worker computes on 31 cores.
    assert worker_threads([_node("head", 32, 1, "m1")]) == 31
    # Two nodes sharing a 16-core machine (4 slots in all) and a 64-core one with 2 slots:
    # the fewest of the machines, 12.
    nodes = [_node("head", 16, 2, "m1"), _node("w1", 16, 2, "m1"), _node("w2", 64, 2, "m2")]
    assert worker_threads(nodes) == 12
    # More slots than cores: still one thread.
    assert worker_threads([_node("head", 2, 4, "m1")]) == 1
    # No core count recorded, or GPU nodes only: nothing to set.
    assert worker_threads([_node("head", None, 1, "m1")]) is None
    assert worker_threads([_node("head", 8, 1, "m1", kind="gpu")]) is None


def test_threads_reach_the_workers_environment(demo_model_dir: Path) -> None:
    config = ServeConfig(model=str(demo_model_dir), api_keys=["k"], device="cpu", cpu_threads=3)
    assert replica_env(config)["OMP_NUM_THREADS"] == "3"
    unset = config.model_copy(update={"cpu_threads": None})
    assert "OMP_NUM_THREADS" not in replica_env(unset)
    # The compile cache vLLM reads back on CPU (its AOT artifacts fail to load there).
    assert replica_env(config)[AOT_COMPILE_ENV] == "0"


def test_threads_on_gpu_nodes_are_refused_in_one_line(demo_model_dir: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(model=str(demo_model_dir), no_auth=True, device="gpu", cpu_threads=2)
    assert "cpu_threads only applies to CPU nodes" in str(err.value)
    assert "\n" not in str(err.value)
