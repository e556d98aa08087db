"""Download guards without node processes: unsafe hub names, disk-full detection, the directory
lease, one commit per directory, and the serving side's manifest check."""

from __future__ import annotations

import errno
import hashlib
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster.download.errors import is_disk_full
from cluster.download.lease import (
    DownloadBusyError,
    acquire_lease,
    lease_path,
    new_lease,
    read_lease,
    release_lease,
    renew_lease,
)
from cluster.download.manifest import write_manifest
from cluster.download.plan import RepoFile, make_plan, unsafe_path_reason
from cluster.download.prepare import CommitMixError, prepare_target
from cluster.download.records import RecordEntry, append_record
from cluster.errors import DownloadError, NotReadyError

COMMIT_A = "a" * 40
COMMIT_B = "b" * 40

UNSAFE_NAMES = [
    "/etc/passwd",
    "../outside.safetensors",
    "sub/../../outside.json",
    "a/./b.json",
    "a//b.json",
    "evil\\..\\x.json",
    "nul\x00.json",
    "bell\x07.json",
    "newline\n.json",
    ".llamacluster/download/head.jsonl",
    "manifest.json",
    "",
]


@pytest.mark.parametrize("name", UNSAFE_NAMES)
def test_unsafe_hub_names_are_refused_by_the_planner(name: str) -> None:
    assert unsafe_path_reason(name) is not None
    files = [RepoFile(path="config.json", size=2, sha256="0" * 64), RepoFile(path=name, size=1)]
    with pytest.raises(DownloadError) as info:
        make_plan(repo="org/m", revision="main", commit=COMMIT_A, files=files, nodes=["head"])
    line = info.value.one_line()
    assert repr(name) in line and "nothing was written" in line and "\n" not in line


@pytest.mark.parametrize(
    "name", ["config.json", "sub/dir/model.safetensors", "..hidden", "a..b", ".gitattributes"]
)
def test_ordinary_names_pass(name: str) -> None:
    assert unsafe_path_reason(name) is None


def test_disk_full_is_recognised_from_errors_and_messages() -> None:
    assert is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert is_disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"))
    wrapped = RuntimeError("write failed")
    wrapped.__cause__ = OSError(errno.ENOSPC, "full")
    assert is_disk_full(wrapped)
    assert is_disk_full("Exception: Error while downloading: No space left on device (os error 28)")
    assert is_disk_full("os error 122")
    assert not is_disk_full(OSError(errno.ENOENT, "No such file or directory"))
    assert not is_disk_full("os error 2")
    assert not is_disk_full("HTTP 503")


# -- the lease ------------------------------------------------------------------------------------


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_live_lease_refuses_a_second_holder_naming_it(tmp_path: Path) -> None:
    first = acquire_lease(tmp_path, new_lease("download org/a", ttl_s=60))
    assert read_lease(tmp_path) == first
    assert oct(lease_path(tmp_path).stat().st_mode & 0o777) == "0o644"
    with pytest.raises(DownloadBusyError) as info:
        acquire_lease(tmp_path, new_lease("download org/b", ttl_s=60))
    line = info.value.one_line()
    assert f"pid {first.pid} on {first.host}" in line and "`download org/a`" in line
    assert "since " in line and "--wait" in line
    assert info.value.exit_code == 3
    # Only its holder renews or removes it.
    other = new_lease("download org/b", ttl_s=60)
    assert renew_lease(tmp_path, other) is None and not release_lease(tmp_path, other)
    renewed = renew_lease(tmp_path, first)
    assert renewed is not None and renewed.expires_at >= first.expires_at
    assert release_lease(tmp_path, first) and read_lease(tmp_path) is None
    assert not list(lease_path(tmp_path).parent.glob(".lease.json.*"))  # no temp left behind


def test_expired_lease_of_another_host_is_taken_over(tmp_path: Path) -> None:
    stale = new_lease("download org/a", ttl_s=60).model_copy(
        update={"host": "elsewhere", "expires_at": time.time() - 1}
    )
    lease_path(tmp_path).parent.mkdir(parents=True)
    lease_path(tmp_path).write_text(stale.model_dump_json())
    mine = acquire_lease(tmp_path, new_lease("download org/b", ttl_s=60))
    assert read_lease(tmp_path) == mine


def test_unexpired_lease_of_a_dead_process_here_is_taken_over(tmp_path: Path) -> None:
    dead = new_lease("download org/a", ttl_s=600).model_copy(update={"pid": _dead_pid()})
    lease_path(tmp_path).parent.mkdir(parents=True)
    lease_path(tmp_path).write_text(dead.model_dump_json())
    mine = acquire_lease(tmp_path, new_lease("download org/b", ttl_s=60))
    assert read_lease(tmp_path) == mine


def test_live_lease_of_another_host_is_honoured_until_it_expires(tmp_path: Path) -> None:
    remote = new_lease("download org/a", ttl_s=1.0).model_copy(update={"host": "elsewhere"})
    lease_path(tmp_path).parent.mkdir(parents=True)
    lease_path(tmp_path).write_text(remote.model_dump_json())
    with pytest.raises(DownloadBusyError, match="on elsewhere"):
        acquire_lease(tmp_path, new_lease("download org/b", ttl_s=60))
    lines: list[str] = []
    started = time.monotonic()
    mine = acquire_lease(
        tmp_path, new_lease("download org/b", ttl_s=60), wait=True, poll_s=0.1, on_wait=lines.append
    )
    assert time.monotonic() - started < 5
    assert read_lease(tmp_path) == mine
    assert len(lines) == 1 and "waiting for it (--wait)" in lines[0]


# -- one commit per directory ------------------------------------------------------------------


def _put(target: Path, path: str, data: bytes, *, commit: str) -> RepoFile:
    p = target / path
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    sha = hashlib.sha256(data).hexdigest()
    st = p.stat()
    f = RepoFile(path=path, size=len(data), sha256=sha)
    append_record(
        target,
        RecordEntry(
            path=path,
            size=st.st_size,
            sha256=sha,
            checksum_id=f.checksum_id,
            mtime_ns=st.st_mtime_ns,
            node="head",
            commit=commit,
        ),
    )
    return f


def test_a_second_commit_into_the_same_directory_is_refused(tmp_path: Path) -> None:
    old = _put(tmp_path, "model-00001-of-00002.safetensors", b"old weights", commit=COMMIT_A)
    new = RepoFile(path="model-00001-of-00002.safetensors", size=11, sha256="1" * 64)
    plan_b = make_plan(repo="org/m", revision="main", commit=COMMIT_B, files=[new], nodes=["h"])
    with pytest.raises(CommitMixError) as info:
        prepare_target(tmp_path, plan_b, node="h")
    line = info.value.one_line()
    assert f"org/m@{COMMIT_A[:12]}" in line and f"org/m@{COMMIT_B[:12]}" in line
    assert f"--revision {COMMIT_A}" in line
    # The same commit resumes; what is verified counts as already there.
    plan_a = make_plan(repo="org/m", revision="main", commit=COMMIT_A, files=[old], nodes=["h"])
    assert prepare_target(tmp_path, plan_a, node="h")["to_fetch_bytes"] == 0


def test_manifest_of_another_commit_is_refused_even_without_records(tmp_path: Path) -> None:
    f = _put(tmp_path, "config.json", b"{}", commit=COMMIT_A)
    write_manifest(
        tmp_path,
        make_plan(repo="org/m", revision="main", commit=COMMIT_A, files=[f], nodes=["h"]),
    )
    (tmp_path / ".llamacluster/download/head.jsonl").unlink()
    plan_b = make_plan(repo="org/m", revision="main", commit=COMMIT_B, files=[f], nodes=["h"])
    with pytest.raises(CommitMixError, match=COMMIT_A[:12]):
        prepare_target(tmp_path, plan_b, node="h")


# -- serving refuses an unfinished download and passes the commit to vLLM ----------------------


def _complete_model(target: Path, commit: str) -> None:
    files = [_put(target, "config.json", b'{"model_type": "llama"}', commit=commit)]
    files.append(_put(target, "model.safetensors", b"\x00" * 64, commit=commit))
    write_manifest(
        target, make_plan(repo="org/m", revision="main", commit=commit, files=files, nodes=["h"])
    )


def test_serve_config_refuses_a_directory_without_a_complete_manifest(tmp_path: Path) -> None:
    from serve.config import load_config

    _complete_model(tmp_path, COMMIT_A)
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 10)  # partial
    with pytest.raises(NotReadyError, match="missing or has the wrong size"):
        load_config(model=str(tmp_path), no_auth=True)
    (tmp_path / "manifest.json").unlink()  # a download under way removes it
    with pytest.raises(NotReadyError, match="missing or unfinished"):
        load_config(model=str(tmp_path), no_auth=True)


def test_serve_config_passes_the_manifest_commit_to_vllm(tmp_path: Path) -> None:
    from serve.config import load_config
    from serve.vllm_glue import vllm_cli_args

    _complete_model(tmp_path, COMMIT_A)
    config = load_config(model=str(tmp_path), revision=COMMIT_A, no_auth=True)
    args = vllm_cli_args(config)
    assert args[args.index("--revision") + 1] == COMMIT_A
    with pytest.raises(NotReadyError, match=f"holds org/m@{COMMIT_A[:12]}"):
        load_config(model=str(tmp_path), revision=COMMIT_B, no_auth=True)
