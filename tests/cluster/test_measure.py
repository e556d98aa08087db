"""The CPU micro-benchmark and the link test as real programs, and how the planner takes them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import pytest

from cluster import cpu_features
from cluster.device_specs import get_device, measured_cpu_device
from cluster.errors import ConfigError
from cluster.measure import (
    DENSE_CALLS_PER_LAYER,
    CpuMeasurement,
    LinkMeasurement,
    best_rate,
    engine_threads,
    link_gbps,
    serving_dtype,
    slowest_link,
)
from cluster.stages.measure import (
    link_pairs,
    machine_slots,
    machines,
    measured_cpu_spec,
    measured_link_gbps,
)
from cluster.state import ClusterState, MeasureSection, NodeState, load_state

pytestmark = pytest.mark.timeout(120)

AMX_FLAGS = {"avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8"}
AVX512_BF16_FLAGS = {"avx2", "avx512f", "avx512_bf16"}
AVX2_FLAGS = {"avx2"}


def _program(verb: str, request: dict, *, timeout: float = 90) -> dict:
    done = subprocess.run(
        [sys.executable, "-m", "cluster.measure", verb],
        input=json.dumps(request),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    reply = json.loads(done.stdout.strip().splitlines()[-1])
    assert done.returncode == 0 and reply["ok"], done.stderr[-2000:]
    return reply


def _cpu(
    read: float = 30.0, tflops: float = 0.4, gemv: float | None = None, **extra
) -> CpuMeasurement:
    return CpuMeasurement(
        gemv_gbs=gemv,
        read_gbs=read,
        copy_gbs=read,
        triad_gbs=read,
        matmul_tflops=tflops,
        dtype="bf16",
        matmul_size=2048,
        threads=8,
        array_mib=512,
        library="torch",
        seconds=3.0,
        at=1_800_000_000.0,
        **extra,
    )


def _link(dst: str, gbps: float) -> LinkMeasurement:
    return LinkMeasurement(
        src="head", dst=dst, dst_ip="10.0.0.9", gbps=gbps, rtt_ms=0.2, streams=4, bytes=1, seconds=2
    )


def _node(name: str, *, devices: int = 1, machine: str | None = None, ip: str = "") -> NodeState:
    return NodeState(
        name=name,
        label=name,
        host=ip or name,
        private_ip=ip or None,
        devices=devices,
        machine_id=machine,
    )


def test_cpu_benchmark_returns_sane_positive_numbers_in_the_engines_dtype():
    reply = _program("cpu", {"array_mib": 64, "repeats": 2, "slots": 1})
    m = CpuMeasurement.model_validate(reply)
    # Any CPU of the last decade streams between 1 GB/s and a few TB/s from memory.
    for gbs in (m.read_gbs, m.copy_gbs, m.triad_gbs, m.gemv_gbs):
        assert gbs is not None and 1.0 < gbs < 5000.0, m
    # The engine's own dense kernel when vLLM is in the env (it is in the test env).
    assert m.gemv_kernel == "vLLM onednn_mm" and m.weight_stream_gbs == m.gemv_gbs
    assert 0.001 < m.matmul_tflops < 1000.0, m
    assert m.dtype == serving_dtype(cpu_features.local_flags(), arch=cpu_features.local_arch())
    assert m.library == "torch" and m.array_mib == 64 and m.slots == 1
    assert m.threads == engine_threads(len(os.sched_getaffinity(0)), 1)
    assert m.matmul_size in (1024, 2048, 4096, 8192)
    # The fixed cost of a layer's kernel calls: microseconds to a fraction of a millisecond.
    assert m.gemv_call_ms is not None and 0.0 <= m.gemv_call_ms < 5.0, m
    assert m.layer_kernels_ms is not None and 0.0005 < m.layer_kernels_ms < 5.0, m
    assert m.layer_overhead_ms == DENSE_CALLS_PER_LAYER * m.gemv_call_ms + m.layer_kernels_ms
    assert "ms per layer" in m.describe()


def test_cpu_benchmark_with_numpy_in_fp32():
    # Best of three: one sample can land on a moment the scheduler gave to another process.
    reply = _program("cpu", {"array_mib": 32, "repeats": 3, "library": "numpy", "dtype": "fp32"})
    m = CpuMeasurement.model_validate(reply)
    assert m.library == "numpy" and m.dtype == "fp32" and m.gemv_kernel == "numpy matvec"
    assert m.read_gbs > 1.0 and m.gemv_gbs > 1.0 and m.matmul_tflops > 0.001
    assert m.layer_overhead_ms is None  # the engine runs torch: no layer cost from numpy


@pytest.mark.parametrize(
    ("verb", "request_text", "first_words"),
    [
        ("cpu", '{"array_mib": 1}', "bad cpu request: array_mib:"),
        ("gpu", '{"stream_mib": [0]}', "bad gpu request: stream_mib.0:"),
    ],
)
def test_a_bad_request_exits_2_with_one_line(verb, request_text, first_words):
    done = subprocess.run(
        [sys.executable, "-m", "cluster.measure", verb],
        input=request_text,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith(first_words)


def test_link_test_over_loopback_counts_every_byte_and_times_round_trips():
    import socket

    with socket.socket() as s:  # a free port, as preflight chooses them
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    received: dict = {}
    rx = threading.Thread(
        target=lambda: received.update(
            _program("receive", {"ip": "127.0.0.1", "port": port, "streams": 2, "wait_s": 30})
        )
    )
    rx.start()
    sent = _program(
        "send", {"host": "127.0.0.1", "port": port, "streams": 2, "seconds": 0.5, "pings": 20}
    )
    rx.join(60)
    assert len(received["connections"]) == 2
    assert sent["bytes"] == sum(c["bytes"] for c in received["connections"]) > 0
    assert sent["gbps"] == pytest.approx(link_gbps(sent["bytes"], sent["seconds"]))
    assert sent["gbps"] > 0.1 and 0 < sent["rtt_ms"] < 50
    assert sent["seconds"] == pytest.approx(max(c["seconds"] for c in received["connections"]))


def test_the_send_verb_says_when_nobody_listens():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    done = subprocess.run(
        [sys.executable, "-m", "cluster.measure", "send"],
        input=json.dumps({"host": "127.0.0.1", "port": port, "connect_s": 0.3}),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1].startswith(f"cannot connect to 127.0.0.1:{port}")


@pytest.mark.parametrize(
    ("flags", "arch", "dtype"),
    [
        (AMX_FLAGS, "x86_64", "bf16"),
        (AVX512_BF16_FLAGS, "x86_64", "bf16"),
        ({"avx2", "avx512f"}, "x86_64", "fp32"),
        (AVX2_FLAGS, "x86_64", "fp32"),
        (set(), "aarch64", "fp32"),
    ],
)
def test_serving_dtype_follows_the_cpus_bf16_support(flags, arch, dtype):
    assert serving_dtype(flags, arch=arch) == dtype


def test_rates_and_links_arithmetic():
    assert best_rate(10.0, [2.0, 0.5, 1.0]) == 20.0
    # vLLM keeps one core per local worker for its scheduler.
    assert engine_threads(64, 2) == 62 and engine_threads(2, 1) == 1 and engine_threads(1, 1) == 1
    assert link_gbps(125_000_000, 1.0) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        link_gbps(1, 0)
    links = {"worker1": _link("worker1", 9.4), "worker2": _link("worker2", 0.9)}
    assert slowest_link(links).dst == "worker2"
    assert slowest_link({}) is None
    assert measured_link_gbps(MeasureSection(links=links)) == 0.9
    assert measured_link_gbps(MeasureSection()) is None


def test_measured_cpu_device_shares_the_node_among_its_slots():
    spec = measured_cpu_device(_cpu(read=200.0, tflops=4.0), slots=2, where="head")
    assert spec.is_cpu and spec.measured
    assert spec.bandwidth_gbs == 100.0 and spec.bf16_tflops == 2.0
    assert "measured on head" in spec.source and "1/2 per slot" in spec.source
    assert spec.memory_gib == get_device("cpu").memory_gib
    # The engine kernel's batch-1 weight stream wins over the plain read when measured.
    assert measured_cpu_device(_cpu(read=200.0, gemv=150.0)).bandwidth_gbs == 150.0
    assert measured_cpu_device(_cpu(), memory_gib=20).memory_gib == 20
    with pytest.raises(ConfigError, match="slots must be at least 1"):
        measured_cpu_device(_cpu(), slots=0)


def test_the_planner_takes_the_slowest_machine_per_slot():
    nodes = [_node("head", devices=2), _node("worker1", devices=1)]
    recorded = MeasureSection(cpu={"head": _cpu(read=100.0), "worker1": _cpu(read=60.0)})
    # head: 50 GB/s per slot, worker1: 60 GB/s for its one slot.
    assert measured_cpu_spec(nodes, recorded).bandwidth_gbs == 50.0
    assert measured_cpu_spec(nodes, recorded, slots=1).bandwidth_gbs == 60.0
    assert measured_cpu_spec(nodes, MeasureSection()) is None
    gpu = [n.model_copy(update={"device_kind": "gpu"}) for n in nodes]
    assert measured_cpu_spec(gpu, recorded) is None


def test_machines_and_link_pairs():
    nodes = [
        _node("head", machine="m1", ip="10.0.0.1"),
        _node("worker1", machine="m1", ip="10.0.0.2"),
        _node("worker2", machine="m2", ip="10.0.0.3"),
        _node("worker3", machine="m3", ip="10.0.0.1"),
    ]
    assert {k: [n.name for n in v] for k, v in machines(nodes).items()} == {
        "m1": ["head", "worker1"],
        "m2": ["worker2"],
        "m3": ["worker3"],
    }
    # Nodes on one machine share its cores: the engine's threads there leave one per slot.
    assert machine_slots(nodes) == {"head": 2, "worker1": 2, "worker2": 1, "worker3": 1}
    # A worker on the head's own address has no link to measure.
    assert [w.name for _, w in link_pairs(nodes)] == ["worker1", "worker2"]


def test_state_files_without_measurements_still_load_and_new_ones_round_trip(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMACLUSTER_HOME", str(tmp_path))
    old = ClusterState(name="old").model_dump(mode="json")
    del old["measure"]
    path = tmp_path / "clusters" / "old" / "state.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(old))
    assert load_state("old").measure == MeasureSection()
    state = ClusterState(
        name="new", measure=MeasureSection(cpu={"head": _cpu()}, links={"w": _link("w", 1.0)})
    )
    state.save()
    again = load_state("new")
    assert again.measure == state.measure


def test_plan_measure_refuses_a_gpu(demo_model_dir):
    done = subprocess.run(
        [sys.executable, "-c", "from cluster.cli.app import run; run()", "plan", "--model",
         str(demo_model_dir), "--measure", "--gpu", "a100"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 3
    assert "--measure measures CPU nodes, not a100" in done.stderr


def test_plan_ips_uses_what_up_recorded_and_status_shows_it(demo_model_dir, tmp_path, monkeypatch):
    from cluster.stages.base import ClusterContext, Reporter
    from cluster.stages.measure import Measure
    from cluster.state import cluster_dir, default_cluster_name

    inv = tmp_path / "ips.txt"
    inv.write_text("10.0.0.1\n10.0.0.2\n")
    home = tmp_path / "home"
    env = {**os.environ, "LLAMACLUSTER_HOME": str(home)}
    name = default_cluster_name(inv)
    nodes = [_node("head", ip="10.0.0.1"), _node("worker1", ip="10.0.0.2")]
    recorded = MeasureSection(
        cpu={"head": _cpu(read=80.0, gemv=60.0), "worker1": _cpu(read=90.0, gemv=70.0)},
        links={"worker1": _link("worker1", 2.5)},
    )
    state = ClusterState(name=name, nodes=nodes, measure=recorded)
    monkeypatch.setenv("LLAMACLUSTER_HOME", str(home))
    state.save()
    assert (cluster_dir(name) / "state.json").exists()
    done = subprocess.run(
        [sys.executable, "-c", "from cluster.cli.app import run; run()", "plan", "--model",
         str(demo_model_dir), "--ips", str(inv), "--gpu", "cpu", "--json"],
        capture_output=True, text=True, timeout=60, check=False, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    plan = json.loads(done.stdout)
    assert plan["cluster"]["link_gbps"] == 2.5  # the slowest recorded link, not 100
    device = plan["cluster"]["device"]
    assert device["measured"] and device["bandwidth_gbs"] == 60.0  # the slower machine's gemv
    assert "measured: head → worker1 2.5 Gbit/s" in done.stderr
    # An explicit --link-gbps wins over the recorded link.
    again = subprocess.run(
        [sys.executable, "-c", "from cluster.cli.app import run; run()", "plan", "--model",
         str(demo_model_dir), "--ips", str(inv), "--link-gbps", "40", "--json"],
        capture_output=True, text=True, timeout=60, check=False, env=env,
    )  # fmt: skip
    assert json.loads(again.stdout)["cluster"]["link_gbps"] == 40
    # status: the measure stage's check reports what was recorded, without measuring again.
    ctx = ClusterContext(cluster=None, state=state, runners=[], reporter=Reporter())  # type: ignore[arg-type]
    check = Measure().check(ctx)
    assert check.ok and "head read 80.0 GB/s" in check.message
    assert "head → worker1 2.5 Gbit/s" in check.message and set(check.per_node) == {
        "head",
        "worker1",
    }
