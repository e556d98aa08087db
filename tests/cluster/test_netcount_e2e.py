"""Network kB per token on a two-node cluster (each node its own network namespace):
tp=2 × pp=1 moves more bytes per token between the nodes than tp=1 × pp=2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.fixtures import _require_netns

pytestmark = [pytest.mark.e2e, pytest.mark.engine, pytest.mark.timeout(2400)]

REPO = Path(__file__).resolve().parents[2]


def test_bytes_per_token_by_layout(tmp_path: Path, demo_model_dir: Path) -> None:
    _require_netns()
    out = tmp_path / "netcost.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_netcost.py"), "--layouts", "2x1,1x2",
         "--requests", "8", "--model-dir", str(demo_model_dir), "--out", str(out)],
        capture_output=True, text=True, timeout=2300, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {r["layout"]: r for r in json.loads(out.read_text())["rows"]}
    tp, pp = rows["tp=2 × pp=1"], rows["tp=1 × pp=2"]
    for row in (tp, pp):
        assert row["completed"] == 8 and row["output_tokens"] > 0
        for node in ("head", "worker1"):
            assert row[f"{node} kB tx/tok"] > 0 and row[f"{node} kB rx/tok"] > 0
        # Two namespaces, two counters: the total is the sum of both nodes.
        assert row["net kB tx/tok"] == pytest.approx(
            row["head kB tx/tok"] + row["worker1 kB tx/tok"], rel=1e-6
        )

    def worker_traffic(row: dict) -> float:
        # The worker's eth0 carries only cluster traffic (the client talks to the head), less
        # what it moves idle (Ray heartbeats, metrics) over the same time.
        moved = row["worker1 kB tx/tok"] + row["worker1 kB rx/tok"]
        return moved - row["idle kB/tok"]["worker1"]

    # tp all-reduces twice per layer per token; pp sends one activation per token per stage.
    assert worker_traffic(tp) > 2 * worker_traffic(pp), (tp, pp)
