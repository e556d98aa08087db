"""Sharded, verified, resumable model download across the nodes (plan, fetch, manifest, verify)."""

from cluster.download.manifest import (
    Manifest,
    require_complete_manifest,
    verify_model_dir,
    write_manifest,
)
from cluster.download.plan import DownloadPlan, RepoFile, make_plan, plan_download

__all__ = [
    "DownloadPlan",
    "Manifest",
    "RepoFile",
    "make_plan",
    "plan_download",
    "require_complete_manifest",
    "verify_model_dir",
    "write_manifest",
]
