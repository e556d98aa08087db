"""A worker node's Ray killed under load while the engine spans both nodes: the cluster heals by
itself (the node's supervisor starts Ray again, the server's watchdog restarts the whole engine
group once the node is back). Two network-namespace nodes over SSH, real Ray, vLLM and HTTP."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.bench_faults import (
    kill_pids,
    load_for,
    measure_fault,
    session_pids,
    start_cluster,
    stop_cluster,
    vllm_worker_pid,
    wait_steady,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

STALL_TIMEOUT_S = 10.0
# From the kill to the first completed request sent after the fault was seen: the node's Ray
# back (about 10 s), then an engine load across both nodes (30-90 s on a busy 2-core machine).
RECOVERY_BOUND_S = 240.0


def test_worker_node_ray_killed_under_load_heals_by_itself(
    tmp_path: Path, netns_hosts, demo_model_dir: Path
) -> None:
    cluster = start_cluster(
        tmp_path,
        demo_model_dir,
        tp=2,
        pp=1,
        stall_timeout=STALL_TIMEOUT_S,
        name="e2e-faults",
        skip=("cache", "monitor", "measure"),
        hosts=netns_hosts(2),
    )
    load = load_for(cluster, concurrency=2, output_len=16)
    try:
        load.start()
        wait_steady(load, timeout_s=180)
        worker_sid = cluster.session("worker1")
        old_worker = vllm_worker_pid(cluster)
        killed: list[int] = []

        def kill_worker_ray() -> None:
            # Every Ray process of the worker node, by its recorded session; its supervisor
            # (the session leader) stays.
            killed.extend(session_pids(worker_sid))
            kill_pids(killed)

        row = measure_fault(
            load,
            kill_worker_ray,
            stall_timeout=STALL_TIMEOUT_S,
            recover_timeout=RECOVERY_BOUND_S,
        )
        print(f"\nworker node's Ray killed: {row}")
        assert old_worker in killed and worker_sid not in killed
        assert row["detect_s"] is not None, row
        assert row["recovered"], f"no completion within {RECOVERY_BOUND_S:.0f}s: {row}"
        assert row["recover_s"] < RECOVERY_BOUND_S, row
        assert row["hung"] == 0, row
        # The engine died with its worker and was restarted in place (not a redeploy by hand),
        # and its new group has a worker on the worker node again, in the same supervised
        # session as before.
        causes = [(r["cause"], r["outcome"]) for r in row["server_restarts"]]
        assert ("engine_dead", "recovered") in causes, row["server_restarts"]
        # The restart waited for the node's bundle to be on a live node again instead of
        # placing workers on the lost node: no attempt was spent on it.
        assert "failed" not in [r["outcome"] for r in row["server_restarts"]], row
        assert cluster.session("worker1") == worker_sid
        assert vllm_worker_pid(cluster) not in killed
    finally:
        load.stop()
        stop_cluster(cluster)
