"""The loopback hub: huggingface_hub and hf_transfer accept it; ranges, gating and faults work."""

from __future__ import annotations

from pathlib import Path

from cluster.demo_model import DEMO_MODEL_REPO_ID, file_sha256, iter_model_files
from tests.support.hub import LoopbackHub


def _same_tree(a: Path, b: Path) -> None:
    ours = {p.relative_to(a).as_posix(): file_sha256(p) for p in iter_model_files(a)}
    theirs = {p.relative_to(b).as_posix(): file_sha256(p) for p in iter_model_files(b)}
    assert ours == theirs


def test_snapshot_download_is_byte_for_byte(hub: LoopbackHub, demo_model_dir: Path, tmp_path: Path) -> None:
    from huggingface_hub import snapshot_download

    got = snapshot_download(DEMO_MODEL_REPO_ID, cache_dir=tmp_path / "cache")
    _same_tree(demo_model_dir, Path(got))
