"""`bench --name CLUSTER` puts the plan's expected figures next to the measured ones: the
recorded model, layout and devices planned at the run's shape, and measured / expected."""

from __future__ import annotations

import pytest

import cluster.state as st
from cluster.bench.expected import cluster_expectations, expected_table
from cluster.bench.metrics import PointMetrics, Stats
from cluster.bench.runner import BenchResult
from cluster.device_specs import device_for_gpu_name
from cluster.errors import ConfigError
from tests.cluster.test_planner import LLAMA_7B, write_model_dir


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMACLUSTER_HOME", str(tmp_path / "home"))


def test_nvidia_smi_names_map_to_the_table():
    assert device_for_gpu_name("NVIDIA H200").key == "h200"
    assert device_for_gpu_name("NVIDIA H100 80GB HBM3").key == "h100-sxm"
    assert device_for_gpu_name("NVIDIA H100 PCIe").key == "h100-pcie"
    assert device_for_gpu_name("NVIDIA A100-SXM4-40GB").key == "a100-40gb"
    assert device_for_gpu_name("NVIDIA A100-SXM4-80GB").key == "a100-80gb"
    assert device_for_gpu_name("NVIDIA A10G").key == "a10"
    assert device_for_gpu_name("Tesla T4") is None


def _record(tmp_path, *, gpu: str = "NVIDIA H200") -> None:
    model = write_model_dir(tmp_path, LLAMA_7B, name="llama7b")
    state = st.ClusterState(name="gpu1", access=st.Access(local=True), shared_dir=str(tmp_path))
    state.nodes.append(
        st.NodeState(
            name="head", label="h", host="h", devices=1, device_kind="gpu",
            device_info={"gpu": gpu, "memory_mib": "143771"},
        )
    )  # fmt: skip
    state.model.dir = str(model)
    state.server.tp, state.server.pp = 1, 1
    state.save()


def _point(c: int, tpot: float, ttft: float, tok_s: float) -> PointMetrics:
    def stats(p50: float) -> Stats:
        return Stats(**{f: p50 for f in Stats.__dataclass_fields__})

    return PointMetrics(
        endpoint="main", point=f"c={c}", x=c, mode="closed", requests=10, completed=10,
        failed=0, errors={}, duration_s=1.0, input_tokens=5120, output_tokens=1280,
        request_throughput=10, output_throughput=tok_s, total_token_throughput=tok_s,
        ttft_ms=stats(ttft), tpot_ms=stats(tpot), itl_ms=stats(tpot), e2e_ms=stats(1000),
        tokens_per_chunk=1, max_tokens_per_chunk=1, token_sources={}, prompt_sources={},
        full_length_fraction=1.0,
    )  # fmt: skip


def test_recorded_cluster_is_planned_at_the_run_shape(tmp_path, capsys):
    _record(tmp_path)
    expected, planned = cluster_expectations(
        "gpu1", input_len=512, output_len=128, concurrencies=[1, 8]
    )
    assert [e.concurrency for e in expected] == [1, 8]
    # The LLaMA-7B calibration row: 4.89 ms measured per token at batch 1, prefill 12.13 ms.
    assert expected[0].tpot_ms == pytest.approx(4.89, rel=0.1)
    assert expected[0].ttft_ms == pytest.approx(12.13, rel=0.1)
    assert expected[1].output_tokens_per_s > 5 * expected[0].output_tokens_per_s
    assert "NVIDIA H200" in planned and "tp=1 x pp=1" in planned
    result = BenchResult(config={}, endpoints=[], points=[_point(1, 9.78, 12.13, 100.0)])
    table = expected_table(result, expected)
    assert table is not None
    from rich.console import Console

    console = Console(width=200, record=True)
    console.print(table)
    text = console.export_text()
    assert "c=1" in text and f"{9.78 / expected[0].tpot_ms:.2f}" in text


def test_unplannable_cluster_is_one_clear_error(tmp_path):
    with pytest.raises(ConfigError):
        cluster_expectations("nope", input_len=8, output_len=8, concurrencies=[1])
    state = st.ClusterState(name="empty", access=st.Access(local=True), shared_dir="/tmp/x")
    state.save()
    with pytest.raises(ConfigError, match="records no served model"):
        cluster_expectations("empty", input_len=8, output_len=8, concurrencies=[1])
