"""Whole-or-nothing writes: exact modes, no temp files left, the old file kept on failure."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from cluster.files import atomic_write


def test_secret_gets_exact_mode_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        path = atomic_write(tmp_path / "sub" / "token", "s3cret", mode=0o600)
    finally:
        os.umask(old)
    assert path.read_text() == "s3cret"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["token"]


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    atomic_write(path, b"old")

    with pytest.raises(TypeError):
        atomic_write(path, 12345)  # type: ignore[arg-type]
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]
