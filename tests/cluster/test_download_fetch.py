"""Fetching across nodes against the loopback hub: identity, resume, faults, gating, SSH, vLLM."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster.demo_model import DEMO_MODEL_REPO_ID
from cluster.download.controller import download_model
from cluster.download.errors import AccessDeniedError
from cluster.download.manifest import require_complete_manifest, verify_model_dir
from cluster.download.node import FetchSettings, NodeRequest
from cluster.download.plan import plan_download
from cluster.download.records import read_records
from cluster.errors import DownloadError
from cluster.inventory import Node
from cluster.runner import LocalRunner, SSHRunner
from tests.support.hub import GATED_REPO_ID, LoopbackHub, file_sha256

# Every test here starts node processes (multi-node or the whole CLI): the e2e tier.
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

FAST = FetchSettings(backoff_s=0.05)


def local_runners(n: int) -> list[LocalRunner]:
    """``n`` loopback "nodes" driven as local processes (head first)."""
    return [LocalRunner(Node(index=i, host=f"127.0.0.{i + 1}", local=True)) for i in range(n)]


def source_files(model_dir: Path) -> dict[str, str]:
    """sha256 of every file of the served repo (what the hub lists), by path."""
    return {
        p.relative_to(model_dir).as_posix(): file_sha256(p)
        for p in sorted(model_dir.rglob("*"))
        if p.is_file() and not p.relative_to(model_dir).as_posix().startswith(".")
    }


def assert_identical(target: Path, model_dir: Path) -> None:
    """The target holds exactly the repo's files, byte for byte, and nothing half-written."""
    want = source_files(model_dir)
    got = {
        p.relative_to(target).as_posix(): file_sha256(p)
        for p in sorted(target.rglob("*"))
        if p.is_file()
        and not p.relative_to(target).as_posix().startswith(".llamacluster/")
        and p.name != "manifest.json"
    }
    assert got == want
    assert not list(target.rglob("*.part"))


def assert_each_file_fetched_by_its_node(hub: LoopbackHub, plan) -> None:
    """Every planned file was fetched by exactly the node the plan gave it to."""
    for a in plan.nodes:
        fetched = {r.filename for r in hub.fetched(identity=a.node)}
        assert fetched == {f.path for f in a.files}, a.node


def test_two_nodes_fetch_their_share_verified_and_identical(
    hub: LoopbackHub, demo_model_dir: Path, tmp_path: Path
) -> None:
    target = tmp_path / "model"
    events: list[dict] = []
    result = download_model(
        DEMO_MODEL_REPO_ID,
        target=str(target),
        runners=local_runners(2),
        # Weights through the per-file hf_transfer child, small files in-process.
        settings=FetchSettings(backoff_s=0.05, inline_max_bytes=100_000),
        on_event=events.append,
    )
    assert_identical(target, demo_model_dir)
    assert_each_file_fetched_by_its_node(hub, result.plan)
    manifest = require_complete_manifest(target)
    assert manifest.commit == hub.repos[DEMO_MODEL_REPO_ID].commit
    assert {f.path: f.sha256 for f in manifest.files} == source_files(demo_model_dir)
    # Each node's record holds only the files it fetched.
    records = read_records(target)
    owners = {a.node: {f.path for f in a.files} for a in result.plan.nodes}
    for path, entries in records.items():
        assert [e.node for e in entries] == [n for n, files in owners.items() if path in files]
    assert {e["node"] for e in events if e["event"] == "progress"} == {"head", "worker1"}
    assert verify_model_dir(target)[1] == []


def test_hub_downloader_on_two_nodes(
    hub: LoopbackHub, demo_model_dir: Path, tmp_path: Path
) -> None:
    target = tmp_path / "model"
    events: list[dict] = []
    result = download_model(
        DEMO_MODEL_REPO_ID,
        target=str(target),
        runners=local_runners(2),
        settings=FetchSettings(downloader="hub", backoff_s=0.05),
        on_event=events.append,
    )
    assert_identical(target, demo_model_dir)
    assert_each_file_fetched_by_its_node(hub, result.plan)
    assert {e["downloader"] for e in events if e["event"] == "file_start"} == {"hub"}
    assert not list((target / ".llamacluster/download/staging").glob("*"))


def test_rerun_skips_verified_files_without_fetching(
    hub: LoopbackHub, demo_model_dir: Path, tmp_path: Path
) -> None:
    target = tmp_path / "model"
    download_model(DEMO_MODEL_REPO_ID, target=str(target), runners=local_runners(2), settings=FAST)
    hub.clear_log()
    again = download_model(
        DEMO_MODEL_REPO_ID, target=str(target), runners=local_runners(3), settings=FAST
    )
    assert hub.fetched() == []  # other node count, same files: every one already verified
    assert all(
        s["skipped"] == len(a.files)
        for s, a in zip(again.summaries.values(), again.plan.nodes, strict=True)
    )
    assert require_complete_manifest(target).files


def test_killed_mid_file_then_rerun_fetches_only_the_rest(
    hub: LoopbackHub, demo_model_dir: Path, tmp_path: Path
) -> None:
    target = tmp_path / "model"
    plan = plan_download(DEMO_MODEL_REPO_ID, nodes=["head"])
    hub.faults.limit_bandwidth(2_000_000)  # slow enough to be killed mid-file
    request = NodeRequest(
        action="fetch",
        node="head",
        target=str(target),
        plan=plan,
        settings=FetchSettings(jobs=1, inline_max_bytes=0),  # progress while in flight
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "cluster.download.node"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ},
    )
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(request.model_dump_json())
    proc.stdin.close()
    done: list[str] = []
    try:
        for line in proc.stdout:
            event = json.loads(line)
            if event["event"] == "file_done":
                done.append(event["path"])
            # Largest first: kill while the second weight file is half-way.
            started_next = event["event"] == "progress" and event["path"] not in done
            if done and started_next and event["done"] > 200_000:
                break
    finally:
        proc.kill()
        proc.wait()
    assert done, "the node never finished a file before the kill"
    parts = list(target.glob(".*.part"))
    assert parts, "expected the interrupted file under its temp name"
    # No file at a final path unless verified.
    want = source_files(demo_model_dir)
    for p in target.iterdir():
        if p.is_file() and not p.name.startswith("."):
            assert file_sha256(p) == want[p.name], p.name
    verified = {p.name for p in target.iterdir() if p.is_file() and not p.name.startswith(".")}
    assert set(done) <= verified

    hub.faults.reset()
    hub.clear_log()
    download_model(DEMO_MODEL_REPO_ID, target=str(target), runners=local_runners(1), settings=FAST)
    fetched = {r.filename for r in hub.fetched()}
    assert fetched == set(want) - verified
    assert_identical(target, demo_model_dir)


def test_corrupted_byte_on_disk_is_named_and_only_that_file_refetched(
    hub: LoopbackHub, demo_model_dir: Path, tmp_path: Path
) -> None:
    from cluster.cli.app import main

    target = tmp_path / "model"
    download_model(DEMO_MODEL_REPO_ID, target=str(target), runners=local_runners(2), settings=FAST)
    victim = target / "model-00002-of-00004.safetensors"
    data = bytearray(victim.read_bytes())
    data[len(data) // 3] ^= 0x01  # same size, one bit
    victim.write_bytes(bytes(data))

    _, bad = verify_model_dir(target)
    assert [b.path for b in bad] == [victim.name]
    assert main(["verify", str(target)]) == 6

    hub.clear_log()
    download_model(DEMO_MODEL_REPO_ID, target=str(target), runners=local_runners(2), settings=FAST)
    assert {r.filename for r in hub.fetched()} == {victim.name}
    assert_identical(target, demo_model_dir)
    assert main(["verify", str(target)]) == 0


def test_corrupt_bytes_from_the_hub_are_rejected_then_refetched(
    hub: LoopbackHub, demo_model_dir: Path, tmp_path: Path
) -> None:
    target = tmp_path / "model"
    name = "model-00003-of-00004.safetensors"
    hub.faults.corrupt(name)
    with pytest.raises(DownloadError, match=rf"{name}: checksum mismatch \(expected "):
        download_model(
            DEMO_MODEL_REPO_ID,
            target=str(target),
            runners=local_runners(2),
            settings=FetchSettings(max_attempts=2, backoff_s=0.05),
        )
    assert not (target / name).exists()  # never at its final path unverified
    assert not (target / "manifest.json").exists()

    hub.faults.reset()
    hub.clear_log()
    download_model(DEMO_MODEL_REPO_ID, target=str(target), runners=local_runners(2), settings=FAST)
    assert {r.filename for r in hub.fetched()} == {name}
    assert_identical(target, demo_model_dir)


def test_429_with_retry_after_and_503_are_retried(
    hub: LoopbackHub, demo_model_dir: Path, tmp_path: Path
) -> None:
    target = tmp_path / "model"
    hub.faults.rate_limit(count=1, retry_after=1, match="model-00001-of-00004.safetensors")
    hub.faults.fail_next(503, count=2, match="model-00004-of-00004.safetensors")
    events: list[dict] = []
    download_model(
        DEMO_MODEL_REPO_ID,
        target=str(target),
        runners=local_runners(2),
        settings=FAST,
        on_event=events.append,
    )
    assert_identical(target, demo_model_dir)
    statuses = [(r.filename, r.status) for r in hub.requests if r.status in (429, 503)]
    assert ("model-00001-of-00004.safetensors", 429) in statuses
    assert statuses.count(("model-00004-of-00004.safetensors", 503)) == 2
    # The 429's Retry-After was honoured: the next request for that file came >= 1 s later.
    reqs = [r for r in hub.requests if r.filename == "model-00001-of-00004.safetensors"]
    first_429 = next(r for r in reqs if r.status == 429)
    later = [r.started for r in reqs if r.started > first_429.started]
    assert later and min(later) - first_429.finished >= 0.9
    retries = [e for e in events if e["event"] == "retry"]
    assert any(e["wait_s"] == 1.0 for e in retries)


def test_gated_repo_without_token_fails_at_once_with_the_way_out(
    hub: LoopbackHub, tmp_path: Path
) -> None:
    target = tmp_path / "gated"
    started = time.monotonic()
    with pytest.raises(AccessDeniedError) as info:
        download_model(GATED_REPO_ID, target=str(target), runners=local_runners(2), settings=FAST)
    assert time.monotonic() - started < 20  # no retry loop on 401
    line = info.value.one_line()
    assert f"{hub.url}/{GATED_REPO_ID}" in line and "HF_TOKEN" in line
    assert not [p for p in target.glob("*.safetensors")]


def test_gated_repo_with_token_completes_and_keeps_the_token_out_of_files(
    hub: LoopbackHub, demo_model_dir: Path, tmp_path: Path
) -> None:
    target = tmp_path / "gated"
    events: list[dict] = []
    download_model(
        GATED_REPO_ID,
        target=str(target),
        runners=local_runners(2),
        settings=FAST,
        token=hub.token,
        on_event=events.append,
    )
    assert_identical(target, demo_model_dir)
    assert hub.token not in json.dumps(events)
    for p in target.rglob("*"):
        if p.is_file():
            assert hub.token.encode() not in p.read_bytes(), p


def test_hf_transfer_failure_falls_back_to_the_hub_downloader(
    hub: LoopbackHub, demo_model_dir: Path, tmp_path: Path
) -> None:
    target = tmp_path / "model"
    name = "model-00001-of-00004.safetensors"
    hub.faults.drop_connection(name, after_bytes=1000, count=8)
    events: list[dict] = []
    download_model(
        DEMO_MODEL_REPO_ID,
        target=str(target),
        runners=local_runners(1),
        settings=FetchSettings(backoff_s=0.05, connections=2, max_attempts=12),
        on_event=events.append,
    )
    assert_identical(target, demo_model_dir)
    assert [e["path"] for e in events if e["event"] == "fallback"] == [name]


def test_warm_reads_every_weight_on_every_node(
    hub: LoopbackHub, demo_model_dir: Path, tmp_path: Path
) -> None:
    result = download_model(
        DEMO_MODEL_REPO_ID,
        target=str(tmp_path / "m"),
        runners=local_runners(2),
        settings=FAST,
        warm=True,
    )
    weights = sum(f.size for f in result.plan.files if f.path.endswith(".safetensors"))
    assert {n: s["bytes"] for n, s in result.warm.items()} == {"head": weights, "worker1": weights}


def test_cli_download_and_verify_local(
    hub: LoopbackHub, demo_model_dir: Path, tmp_path: Path, capsys
) -> None:
    from cluster.cli.app import main

    target = tmp_path / "m"
    assert main(["download", DEMO_MODEL_REPO_ID, "--target", str(target), "--local"]) == 0
    assert "done:" in capsys.readouterr().out
    assert_identical(target, demo_model_dir)
    assert main(["verify", str(target)]) == 0
    assert "ok:" in capsys.readouterr().out


def _ssh_runners(sshd, n: int) -> list[SSHRunner]:
    config = sshd.ssh_config()
    nodes = [sshd.node(sshd.addresses[i % len(sshd.addresses)], index=i) for i in range(n)]
    return [SSHRunner(node, config) for node in nodes]


@pytest.mark.parametrize("num_nodes", [2, 3])
def test_fetch_through_the_ssh_runner(
    hub: LoopbackHub, demo_model_dir: Path, tmp_path: Path, sshd, num_nodes: int
) -> None:
    target = tmp_path / "model"
    runners = _ssh_runners(sshd, num_nodes)
    try:
        result = download_model(
            DEMO_MODEL_REPO_ID, target=str(target), runners=runners, settings=FAST
        )
    finally:
        for r in runners:
            r.close()
    assert_identical(target, demo_model_dir)
    assert_each_file_fetched_by_its_node(hub, result.plan)
    assert set(result.summaries) == {a.node for a in result.plan.nodes}
    assert len(result.plan.nodes) == num_nodes
    assert require_complete_manifest(target).files


_LOAD_SCRIPT = """
import sys
from vllm import LLM, SamplingParams
if __name__ == "__main__":
    llm = LLM(
        model=sys.argv[1],
        revision=sys.argv[2],
        max_model_len=256,
        enforce_eager=True,
        dtype="float32",
    )
    out = llm.generate(["hello"], SamplingParams(max_tokens=4, temperature=0))
    print("TOKENS", len(out[0].outputs[0].token_ids))
"""


@pytest.mark.engine
@pytest.mark.timeout(600)
def test_vllm_loads_the_downloaded_model(
    hub: LoopbackHub, demo_model_dir: Path, tmp_path: Path, sshd
) -> None:
    target = tmp_path / "model"
    runners = _ssh_runners(sshd, 2)
    try:
        download_model(DEMO_MODEL_REPO_ID, target=str(target), runners=runners, settings=FAST)
    finally:
        for r in runners:
            r.close()
    commit = require_complete_manifest(target).commit  # what the server hands vLLM
    script = tmp_path / "load.py"
    script.write_text(_LOAD_SCRIPT)
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_TARGET_DEVICE": "cpu"}
    proc = subprocess.run(
        [sys.executable, str(script), str(target), commit],
        capture_output=True,
        text=True,
        timeout=560,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "TOKENS 4" in proc.stdout
