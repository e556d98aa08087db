"""The alternating-window server benchmark (benchmarks/bench_server_ab.py): its ratios over
window pairs, and the other server's processes stopped for a window and continued after."""

from __future__ import annotations

import subprocess
import sys
import time

import psutil
import pytest

from benchmarks.bench_server_ab import pair_summary, stopped


def _window(pair: int, server: str, tok_s: float, *, itl=10.0, ttft=20.0, failed=0, bg=0.05):
    return {
        "pair": pair,
        "server": server,
        "tok_s": tok_s,
        "itl_p99_ms": itl,
        "ttft_p50_ms": ttft,
        "failed": failed,
        "background_cores": bg,
    }


def test_ratios_are_taken_within_each_pair_and_the_median_is_over_pairs():
    windows = [
        _window(0, "vllm", 1000, itl=10, ttft=20),
        _window(0, "llamacluster", 900, itl=11, ttft=22, bg=0.08),
        # The host slows down by half for the second pair: both windows of it.
        _window(1, "llamacluster", 480, itl=20, ttft=40, bg=0.09),
        _window(1, "vllm", 500, itl=20, ttft=41),
        _window(2, "vllm", 800, itl=12, ttft=25),
        _window(2, "llamacluster", 1000, itl=12, ttft=30, bg=0.07),
    ]
    got = pair_summary(windows)
    assert [row["pair"] for row in got["pairs"]] == [0, 1, 2]
    assert got["tok_s_ratio"] == pytest.approx(0.96)  # 0.9, 0.96, 1.25
    assert got["tok_s_ratio_range"] == pytest.approx([0.9, 1.25])
    assert got["itl_p99_ratio"] == pytest.approx(1.0)  # 1.1, 1.0, 1.0
    assert got["ttft_p50_overhead_ms"] == pytest.approx(2.0)  # +2, -1, +5
    assert got["background_cores_llamacluster"] == pytest.approx(0.08)
    assert got["background_cores_vllm"] == pytest.approx(0.05)
    assert got["left_out"] == []


def test_a_pair_with_a_failed_request_or_one_window_missing_is_not_counted():
    windows = [
        _window(0, "vllm", 1000),
        _window(0, "llamacluster", 100, failed=3),
        _window(1, "llamacluster", 950),
        _window(1, "vllm", 1000),
        _window(2, "vllm", 1000),  # the run ended before its partner
    ]
    got = pair_summary(windows)
    assert [row["pair"] for row in got["pairs"]] == [1]
    assert [row["pair"] for row in got["left_out"]] == [0]
    assert got["tok_s_ratio"] == pytest.approx(0.95)
    assert pair_summary(windows[:2])["pairs"] == []
    assert "tok_s_ratio" not in pair_summary(windows[:2])


def _counter() -> subprocess.Popen:
    """A process that prints a growing number every 10 ms."""
    code = "import itertools, sys, time\nfor i in itertools.count():\n    print(i, flush=True)\n    time.sleep(0.01)\n"  # fmt: skip
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)


def test_the_other_servers_processes_stop_for_the_block_and_continue_after_even_on_error():
    procs = [_counter(), _counter()]
    try:
        pids = {p.pid for p in procs}
        time.sleep(0.3)
        with pytest.raises(KeyError), stopped(pids):
            assert {psutil.Process(pid).status() for pid in pids} == {psutil.STATUS_STOPPED}
            raise KeyError("the window failed")
        for proc in procs:
            assert psutil.Process(proc.pid).status() != psutil.STATUS_STOPPED
            first = int(proc.stdout.readline())
            assert int(proc.stdout.readline()) == first + 1  # it runs on
        with stopped(pids | {2**22 + 12345}):  # a process gone meanwhile is no error
            pass
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
