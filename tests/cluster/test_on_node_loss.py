"""`up --on-node-loss replan`: the smaller layout the server may fall back to comes from the
planner for the nodes left after a loss, and only when the model fits them."""

from __future__ import annotations

import io
import json

from rich.console import Console

from cluster.inventory import local_cluster
from cluster.lifecycle import UpConfig
from cluster.runner import LocalRunner
from cluster.stages.base import Reporter, UpContext
from cluster.stages.serve import degraded_layout
from cluster.state import Access, ClusterState, ModelSection, NodeState
from tests.cluster.test_stages import LLAMA_70B


def _context(tmp_path, nodes: int, gpus_per_node: int, mib: int, **config) -> UpContext:
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_70B))
    cluster = local_cluster()
    state = ClusterState(
        name="t",
        access=Access(local=True),
        model=ModelSection(dir=str(tmp_path)),
        nodes=[
            NodeState(
                name=f"n{i}",
                label=f"n{i}",
                host=f"h{i}",
                devices=gpus_per_node,
                device_kind="gpu",
                device_info={"memory_mib": str(mib)},
            )
            for i in range(nodes)
        ],
    )
    out = io.StringIO()
    ctx = UpContext(
        config=UpConfig(local=True, on_node_loss="replan", **config),
        cluster=cluster,
        state=state,
        runners=[LocalRunner(n) for n in cluster],
        reporter=Reporter(Console(file=out, width=200)),
    )
    ctx.out = out  # type: ignore[attr-defined]
    return ctx


def test_the_fallback_is_the_planners_layout_for_one_node_fewer(tmp_path) -> None:
    # 140 GB of weights on 80 GB GPUs, one per node: tp=1 x pp=2 needs both nodes of three...
    ctx = _context(tmp_path, 3, 1, 81559)
    assert degraded_layout(ctx, 1, 3) == (1, 2)
    # ... and a layout that is already the smallest has no smaller fallback.
    assert degraded_layout(ctx, 1, 2) is None


def test_no_fallback_when_the_model_does_not_fit_the_nodes_left(tmp_path) -> None:
    ctx = _context(tmp_path, 2, 1, 81559)  # one 80 GB GPU cannot hold 140 GB
    assert degraded_layout(ctx, 1, 2) is None
    assert "does not fit one node fewer" in ctx.out.getvalue()  # type: ignore[attr-defined]
    assert degraded_layout(_context(tmp_path, 1, 8, 81559), 2, 1) is None  # nothing to lose
