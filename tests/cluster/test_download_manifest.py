"""Records, temp names, manifest merge, require_complete_manifest and verify (no hub needed)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from cluster.download.manifest import (
    manifest_path,
    require_complete_manifest,
    verify_model_dir,
    write_manifest,
)
from cluster.download.plan import RepoFile, make_plan
from cluster.download.progress import ClusterProgress, format_eta
from cluster.download.records import (
    RecordEntry,
    append_record,
    hash_file,
    is_own_temp,
    read_records,
    record_path,
    remove_stale_temps,
    temp_path,
    verified_entry,
)
from cluster.errors import DownloadError, NotReadyError


def _put(target: Path, path: str, data: bytes, *, node: str, commit: str = "c" * 40) -> RepoFile:
    """Write a file as a node would after verifying it, and record it."""
    p = target / path
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    sha = hashlib.sha256(data).hexdigest()
    f = RepoFile(path=path, size=len(data), sha256=sha)
    st = p.stat()
    append_record(
        target,
        RecordEntry(
            path=path,
            size=st.st_size,
            sha256=sha,
            checksum_id=f.checksum_id,
            mtime_ns=st.st_mtime_ns,
            node=node,
            commit=commit,
        ),
    )
    return f


def test_git_blob_sha1_matches_git(tmp_path: Path) -> None:
    p = tmp_path / "config.json"
    p.write_bytes(b"hello\n")
    sha256, sha1 = hash_file(p, git_blob=True)
    assert sha1 == "ce013625030ba8dba906f756967f9e9ca394464a"  # `git hash-object` of "hello\n"
    assert sha256 == hashlib.sha256(b"hello\n").hexdigest()


def test_temp_names_are_hidden_unique_and_owned(tmp_path: Path) -> None:
    final = tmp_path / "model-00001-of-00002.safetensors"
    a, b = temp_path(final, "head"), temp_path(final, "head")
    assert a != b and a.parent == final.parent
    assert a.name.startswith(".") and not a.name.endswith(".safetensors")
    assert is_own_temp(a.name, "head")
    assert not is_own_temp(a.name, "worker1")
    ip_temp = temp_path(final, "127.0.0.2").name
    assert is_own_temp(ip_temp, "127.0.0.2") and not is_own_temp(ip_temp, "0.0.2")


def test_remove_stale_temps_only_touches_own_node(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    mine = temp_path(tmp_path / "sub" / "a.safetensors", "w1")
    theirs = temp_path(tmp_path / "b.safetensors", "w2")
    keep = tmp_path / "c.safetensors"
    for p in (mine, theirs, keep):
        p.write_bytes(b"x")
    assert remove_stale_temps(tmp_path, "w1") == [mine]
    assert not mine.exists() and theirs.exists() and keep.exists()


def test_records_are_per_node_and_survive_a_torn_line(tmp_path: Path) -> None:
    _put(tmp_path, "a.safetensors", b"aaa", node="head")
    _put(tmp_path, "b.safetensors", b"bbb", node="w1")
    with open(record_path(tmp_path, "w1"), "a") as fh:
        fh.write('{"path": "c.safet')  # killed mid-write
    records = read_records(tmp_path)
    assert {p: [e.node for e in es] for p, es in records.items()} == {
        "a.safetensors": ["head"],
        "b.safetensors": ["w1"],
    }


def test_verified_entry_needs_same_size_mtime_and_content_id(tmp_path: Path) -> None:
    f = _put(tmp_path, "a.safetensors", b"abcdef", node="head")
    assert verified_entry(tmp_path, f, read_records(tmp_path)) is not None
    other = f.model_copy(update={"sha256": "0" * 64})
    assert verified_entry(tmp_path, other, read_records(tmp_path)) is None
    p = tmp_path / "a.safetensors"
    st = p.stat()
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # touched: no longer trusted
    assert verified_entry(tmp_path, f, read_records(tmp_path)) is None


def test_manifest_merge_require_and_verify(tmp_path: Path) -> None:
    files = [
        _put(tmp_path, "config.json", b"{}", node="head"),
        _put(tmp_path, "model-1.safetensors", b"1" * 100, node="head"),
        _put(tmp_path, "model-2.safetensors", b"2" * 90, node="w1"),
    ]
    plan = make_plan(
        repo="org/m", revision="main", commit="c" * 40, files=files, nodes=["head", "w1"]
    )
    with pytest.raises(NotReadyError, match=r"no manifest\.json"):
        require_complete_manifest(tmp_path)
    manifest = write_manifest(tmp_path, plan)
    assert manifest.complete and [f.path for f in manifest.files] == sorted(f.path for f in files)
    assert {f.path: f.node for f in manifest.files}["model-2.safetensors"] == "w1"
    assert require_complete_manifest(tmp_path).commit == "c" * 40
    assert verify_model_dir(tmp_path)[1] == []

    # One byte flipped, same size: verify names exactly that file.
    p = tmp_path / "model-2.safetensors"
    data = bytearray(p.read_bytes())
    data[10] ^= 0xFF
    p.write_bytes(bytes(data))
    _, bad = verify_model_dir(tmp_path)
    assert [b.path for b in bad] == ["model-2.safetensors"]
    assert "sha256" in bad[0].reason

    p.unlink()
    with pytest.raises(NotReadyError, match=r"model-2\.safetensors"):
        require_complete_manifest(tmp_path)


def test_manifest_refused_when_a_file_is_missing(tmp_path: Path) -> None:
    present = _put(tmp_path, "a.safetensors", b"a", node="head")
    absent = RepoFile(path="b.safetensors", size=1, sha256="0" * 64)
    plan = make_plan(
        repo="org/m", revision="main", commit="c" * 40, files=[present, absent], nodes=["head"]
    )
    with pytest.raises(DownloadError, match=r"1 file\(s\) not verified.*b\.safetensors"):
        write_manifest(tmp_path, plan)
    assert not manifest_path(tmp_path).exists()


def test_progress_aggregates_bytes_rate_and_eta() -> None:
    files = [
        RepoFile(path="a.safetensors", size=1000, sha256="a" * 64),
        RepoFile(path="b.safetensors", size=1000, sha256="b" * 64),
        RepoFile(path="c.safetensors", size=1000, sha256="c" * 64),
    ]
    plan = make_plan(repo="o/m", revision="main", commit="c" * 40, files=files, nodes=["h", "w"])
    now = [0.0]
    prog = ClusterProgress(plan, clock=lambda: now[0])
    prog.apply({"event": "start", "node": "h"})
    prog.apply({"event": "start", "node": "w"})
    held = {a.node: [f.path for f in a.files] for a in plan.nodes}
    prog.apply(
        {"event": "file_done", "node": "h", "path": held["h"][0], "size": 1000, "skipped": True}
    )
    now[0] = 10.0
    prog.apply({"event": "progress", "node": "w", "path": held["w"][0], "done": 500})
    rate, eta = prog.node_rate_eta("w")
    assert rate == pytest.approx(50.0) and eta == pytest.approx(10.0)
    # The warm pass reads files again: not download progress.
    prog.apply(
        {"event": "file_done", "node": "w", "path": held["w"][0], "size": 1000, "stage": "warm"}
    )
    done, total, _, overall_eta = prog.overall()
    assert (done, total) == (1500, 3000)
    assert overall_eta is None  # the head has fetched nothing yet: no honest ETA
    assert format_eta(3725) == "1:02:05" and format_eta(None) == "-"
