"""Download guards against the loopback hub with real node processes: a malicious listing, a full
disk (real tmpfs), a hung transfer, two operators on one directory, and one commit per directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cluster.demo_model import DEMO_MODEL_REPO_ID
from cluster.download.controller import download_model
from cluster.download.lease import lease_path, new_lease
from cluster.download.node import FetchSettings, NodeRequest
from cluster.download.plan import plan_download
from cluster.errors import ConfigError, DownloadError
from cluster.inventory import Node
from cluster.runner import LocalRunner
from tests.support.hub import HubFile, HubRepo, LoopbackHub

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

FAST = FetchSettings(backoff_s=0.05)


def local_runners(n: int) -> list[LocalRunner]:
    return [LocalRunner(Node(index=i, host=f"127.0.0.{i + 1}", local=True)) for i in range(n)]


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Callable[[int], Path]]:
    """Mount real tmpfs filesystems of a given size (needs root); unmounted afterwards."""
    mounted: list[Path] = []

    def mount(size: int) -> Path:
        d = tmp_path / f"disk{len(mounted)}"
        d.mkdir()
        pages = (size + 4095) // 4096 * 4096
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={pages}", "tmpfs", str(d)],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounted.append(d)
        return d

    yield mount
    for d in mounted:
        subprocess.run(["umount", str(d)], check=False)


def _largest(hub: LoopbackHub) -> str:
    files = hub.repos[DEMO_MODEL_REPO_ID].files.values()
    return max(files, key=lambda f: f.size).path


def test_malicious_names_from_the_hub_write_nothing(hub: LoopbackHub, tmp_path: Path) -> None:
    demo = hub.repos[DEMO_MODEL_REPO_ID]
    good = next(iter(demo.files.values()))
    evil = HubFile("../escaped.json", good.size, good.git_oid, good.sha256, False, good.local)
    hub.repos["evil/model"] = HubRepo(
        repo_id="evil/model",
        root=demo.root,
        files={good.path: good, evil.path: evil},
        commit="e" * 40,
    )
    target = tmp_path / "models" / "m"
    try:
        with pytest.raises(DownloadError) as info:
            download_model("evil/model", target=str(target), runners=local_runners(2))
    finally:
        del hub.repos["evil/model"]
    assert "'../escaped.json'" in info.value.one_line()
    assert not target.exists() and not (tmp_path / "models" / "escaped.json").exists()
    assert hub.fetched() == []


def _run_node(request: NodeRequest, env: dict[str, str] | None = None) -> tuple[int, list[dict]]:
    done = subprocess.run(
        [sys.executable, "-m", "cluster.download.node"],
        input=request.model_dump_json(),
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=120,
    )
    return done.returncode, [json.loads(line) for line in done.stdout.splitlines() if line]


@pytest.mark.parametrize("downloader", ["hf_transfer", "hub"])
def test_disk_full_while_writing_is_fatal_at_once(
    hub: LoopbackHub, tmp_path: Path, small_disk, downloader: str
) -> None:
    name = _largest(hub)
    size = hub.repos[DEMO_MODEL_REPO_ID].files[name].size
    target = small_disk(size // 2)
    plan = plan_download(DEMO_MODEL_REPO_ID, nodes=["head"], include=[name])
    settings = FetchSettings(downloader=downloader, inline_max_bytes=0, backoff_s=0.05)
    started = time.monotonic()
    code, events = _run_node(
        NodeRequest(action="fetch", node="head", target=str(target), plan=plan, settings=settings)
    )
    assert code == 6
    failed = [e for e in events if e["event"] == "failed"]
    assert len(failed) == 1 and failed[0]["kind"] == "disk", events
    message = failed[0]["message"]
    assert message.startswith(f"node head: no space left writing {target / name}"), message
    assert "needs " in message and " free in " in message
    assert not [e for e in events if e["event"] in ("retry", "fallback")]  # not retried
    assert time.monotonic() - started < 30
    assert not list(target.glob(".*.part")) and not (target / name).exists()


def test_free_space_is_checked_up_front_after_resume_credit(
    hub: LoopbackHub, demo_model_dir: Path, tmp_path: Path, small_disk
) -> None:
    files = hub.repos[DEMO_MODEL_REPO_ID].files
    total = sum(f.size for f in files.values())
    target = small_disk(total + 256 * 1024)
    download_model(DEMO_MODEL_REPO_ID, target=str(target), runners=local_runners(1), settings=FAST)
    name = _largest(hub)
    (target / name).unlink()
    filler = target / "filler.bin"

    def fill_to(free: int) -> None:
        filler.unlink(missing_ok=True)
        have = os.statvfs(target).f_bavail * os.statvfs(target).f_frsize
        with open(filler, "wb") as fh:
            fh.write(b"\0" * max(0, have - free))

    # Not enough for the one missing file: refused before any byte is fetched.
    fill_to(files[name].size // 2)
    hub.clear_log()
    with pytest.raises(DownloadError) as info:
        download_model(
            DEMO_MODEL_REPO_ID, target=str(target), runners=local_runners(1), settings=FAST
        )
    line = info.value.one_line()
    assert f"not enough space in {target}" in line and "1 file(s)" in line, line
    assert hub.fetched() == []
    assert not lease_path(target).exists()  # released on the way out
    # Room for the missing file, though not for the whole model: the verified files count.
    fill_to(files[name].size + 64 * 1024)
    download_model(DEMO_MODEL_REPO_ID, target=str(target), runners=local_runners(1), settings=FAST)
    assert {r.filename for r in hub.fetched()} == {name}


def test_a_stalled_transfer_is_killed_and_retried(hub: LoopbackHub, tmp_path: Path) -> None:
    name = _largest(hub)
    hub.faults.limit_bandwidth(40)  # the first 1 KiB chunk waits ~25 s: a hung connection
    events: list[dict] = []

    def on_event(event: dict) -> None:
        events.append(event)
        if event["event"] == "retry":
            hub.faults.reset()  # the next attempt gets the bytes at full speed

    started = time.monotonic()
    download_model(
        DEMO_MODEL_REPO_ID,
        target=str(tmp_path / "m"),
        runners=local_runners(1),
        include=[name],
        settings=FetchSettings(
            inline_max_bytes=0, stall_timeout_s=2, backoff_s=0.05, connections=2
        ),
        on_event=on_event,
    )
    assert time.monotonic() - started < 20
    retries = [e for e in events if e["event"] == "retry"]
    assert len(retries) == 1 and retries[0]["path"] == name
    reason = retries[0]["reason"]
    assert reason.startswith("no progress for 2 s: transfer process "), reason
    pid = int(reason.split("transfer process ")[1].split()[0])
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # the stalled child is gone
    assert not [e for e in events if e["event"] == "fallback"]
    assert (tmp_path / "m" / name).is_file()


def _cli(hub: LoopbackHub, *args: str) -> subprocess.Popen:
    code = "import sys; from cluster.cli.app import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.Popen(
        [sys.executable, "-c", code, "download", DEMO_MODEL_REPO_ID, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **hub.env(), "COLUMNS": "200"},
    )


def test_two_concurrent_downloads_into_one_target(hub: LoopbackHub, tmp_path: Path) -> None:
    target = tmp_path / "shared-model"
    hub.faults.limit_bandwidth(1_000_000)  # the first one runs a few seconds
    first = _cli(hub, "--target", str(target), "--local", "--ips", str(tmp_path / "none"))
    try:
        deadline = time.monotonic() + 60
        while not lease_path(target).exists():
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        second = _cli(hub, "--target", str(target), "--local", "--ips", str(tmp_path / "none"))
        out, _ = second.communicate(timeout=120)
        assert second.returncode == 3, out
        line = [x for x in out.splitlines() if "is busy" in x]
        assert line, out
        assert f"pid {first.pid} on " in out and "since " in out and "--wait" in out
        queued = _cli(hub, "--target", str(target), "--local", "--ips", str(tmp_path / "none"))
        queued_args = queued.args
        queued.kill()
        queued.wait()
        waiter = subprocess.Popen(
            [*queued_args, "--wait"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, **hub.env(), "COLUMNS": "200"},
        )
        out_waiter, _ = waiter.communicate(timeout=150)
        out_first, _ = first.communicate(timeout=150)
    finally:
        for p in (first,):
            if p.poll() is None:
                p.kill()
                p.wait()
    assert first.returncode == 0, out_first
    assert waiter.returncode == 0, out_waiter
    assert "waiting for it (--wait)" in out_waiter and "done:" in out_waiter
    assert not lease_path(target).exists()


def test_expired_lease_of_a_dead_operator_is_taken_over(hub: LoopbackHub, tmp_path: Path) -> None:
    target = tmp_path / "m"
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    stale = new_lease("download dead/op", ttl_s=60).model_copy(
        update={"pid": gone.pid, "expires_at": time.time() - 5}
    )
    lease_path(target).parent.mkdir(parents=True)
    lease_path(target).write_text(stale.model_dump_json())
    download_model(DEMO_MODEL_REPO_ID, target=str(target), runners=local_runners(2), settings=FAST)
    assert (target / "manifest.json").is_file() and not lease_path(target).exists()


def test_another_commit_into_a_downloaded_directory_is_refused(
    hub: LoopbackHub, tmp_path: Path
) -> None:
    target = tmp_path / "m"
    download_model(DEMO_MODEL_REPO_ID, target=str(target), runners=local_runners(1), settings=FAST)
    manifest = json.loads((target / "manifest.json").read_text())
    old = manifest["commit"]
    repo = hub.repos[DEMO_MODEL_REPO_ID]
    repo.commit = "c" * 40  # the branch moved upstream
    try:
        hub.clear_log()
        with pytest.raises(ConfigError) as info:  # exit code 3: the user picks the way out
            download_model(
                DEMO_MODEL_REPO_ID, target=str(target), runners=local_runners(2), settings=FAST
            )
    finally:
        repo.commit = old
    line = info.value.one_line()
    assert f"@{old[:12]}" in line and "@cccccccccccc" in line and f"--revision {old}" in line
    assert hub.fetched() == []
    assert json.loads((target / "manifest.json").read_text())["commit"] == old
