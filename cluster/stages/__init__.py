"""The stages of `llamacluster up`, in the order they run."""

from __future__ import annotations

from cluster.stages.base import Stage
from cluster.stages.download import Download
from cluster.stages.env import SharedEnv
from cluster.stages.measure import Measure
from cluster.stages.monitor import Monitor
from cluster.stages.preflight import Preflight
from cluster.stages.ray import RayCluster
from cluster.stages.serve import Ready, Serve
from cluster.stages.storage import Cache, SharedStorage

#: Every stage of `up`, in order; names match cluster.stages.config.STAGE_NAMES.
STAGES: tuple[Stage, ...] = (
    Preflight(),
    SharedStorage(),
    Cache(),
    SharedEnv(),
    Measure(),
    Download(),
    RayCluster(),
    Serve(),
    Ready(),
    Monitor(),
)
