"""The loopback hub: huggingface_hub and hf_transfer accept it; ranges, gating and faults work."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from cluster.demo_model import DEMO_MODEL_REPO_ID
from tests.support.hub import (
    GATED_REPO_ID,
    LoopbackHub,
    file_sha256,
    identity_of,
    iter_model_files,
    node_user_agent,
)


def _tree_digests(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): file_sha256(p) for p in iter_model_files(root)}


def _largest_shard(model_dir: Path) -> Path:
    return max(model_dir.glob("*.safetensors"), key=lambda p: p.stat().st_size)


def _download(hub: LoopbackHub, filename: str, dest: Path, **kwargs: object) -> Path:
    from huggingface_hub import hf_hub_download

    return Path(
        hf_hub_download(DEMO_MODEL_REPO_ID, filename, cache_dir=dest, endpoint=hub.url, **kwargs)
    )


def test_snapshot_download_is_byte_for_byte(
    hub: LoopbackHub, demo_model_dir: Path, tmp_path: Path
) -> None:
    from huggingface_hub import snapshot_download

    got = Path(snapshot_download(DEMO_MODEL_REPO_ID, cache_dir=tmp_path / "cache"))
    assert _tree_digests(got) == _tree_digests(demo_model_dir)
    assert got.name == hub.repos[DEMO_MODEL_REPO_ID].commit
    # Weights came through the LFS redirect; small files straight from resolve.
    fetched = {r.filename: r.path for r in hub.fetched()}
    assert set(fetched) == set(_tree_digests(demo_model_dir))
    assert all(fetched[p.name].startswith("/_lfs/") for p in demo_model_dir.glob("*.safetensors"))
    assert "/resolve/" in fetched["config.json"]
    assert any(r.status == 302 for r in hub.requests)


def test_a_separate_process_finds_the_hub_through_hf_endpoint(
    hub: LoopbackHub, demo_model_dir: Path, tmp_path: Path
) -> None:
    # What a node program does: only the environment says where the hub is.
    code = (
        "import sys; from huggingface_hub import snapshot_download;"
        " print(snapshot_download(sys.argv[1], local_dir=sys.argv[2],"
        " user_agent='llamacluster-node/node-9'))"
    )
    env = {**os.environ, **hub.env(), "HF_HOME": str(tmp_path / "hf-home")}
    env.pop("HF_TOKEN", None)
    dest = tmp_path / "model"
    subprocess.run(
        [sys.executable, "-c", code, DEMO_MODEL_REPO_ID, str(dest)],
        check=True,
        env=env,
        timeout=120,
    )
    assert _tree_digests(dest) == _tree_digests(demo_model_dir)
    assert {r.filename for r in hub.fetched(identity="node-9")} == set(_tree_digests(dest))


def test_model_info_reports_sizes_sha256_and_commit(hub: LoopbackHub, demo_model_dir: Path) -> None:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RevisionNotFoundError

    api = HfApi(endpoint=hub.url)
    info = api.model_info(DEMO_MODEL_REPO_ID, files_metadata=True)
    assert re.fullmatch(r"[0-9a-f]{40}", info.sha or "")
    assert api.model_info(DEMO_MODEL_REPO_ID, revision="main").sha == info.sha
    assert api.model_info(DEMO_MODEL_REPO_ID, revision=info.sha).sha == info.sha
    siblings = {s.rfilename: s for s in info.siblings or []}
    assert set(siblings) == set(_tree_digests(demo_model_dir))
    for path in iter_model_files(demo_model_dir):
        sib = siblings[path.name]
        assert sib.size == path.stat().st_size
        if path.suffix == ".safetensors":
            assert sib.lfs is not None and sib.lfs.sha256 == file_sha256(path)
        else:
            assert sib.lfs is None
    with pytest.raises(RevisionNotFoundError):
        api.model_info(DEMO_MODEL_REPO_ID, revision="no-such-branch")


def test_tree_listing_and_paths_info(hub: LoopbackHub, demo_model_dir: Path) -> None:
    from huggingface_hub import HfApi

    api = HfApi(endpoint=hub.url)
    tree = {f.path: f for f in api.list_repo_tree(DEMO_MODEL_REPO_ID, recursive=True)}
    shard = _largest_shard(demo_model_dir)
    assert tree[shard.name].size == shard.stat().st_size
    assert tree[shard.name].lfs.sha256 == file_sha256(shard)
    info = api.get_paths_info(DEMO_MODEL_REPO_ID, ["config.json", shard.name, "missing.bin"])
    assert sorted(f.path for f in info) == sorted(["config.json", shard.name])


def test_file_metadata_headers_like_the_hub(hub: LoopbackHub, demo_model_dir: Path) -> None:
    from huggingface_hub import get_hf_file_metadata

    shard = _largest_shard(demo_model_dir)
    meta = get_hf_file_metadata(hub.file_url(DEMO_MODEL_REPO_ID, shard.name))
    assert meta.etag == file_sha256(shard)
    assert meta.size == shard.stat().st_size
    assert meta.commit_hash == hub.repos[DEMO_MODEL_REPO_ID].commit
    assert "/_lfs/" in meta.location
    small = get_hf_file_metadata(hub.file_url(DEMO_MODEL_REPO_ID, "config.json"))
    assert small.size == (demo_model_dir / "config.json").stat().st_size
    assert re.fullmatch(r"[0-9a-f]{40}", small.etag or "")  # git blob sha1


def test_range_requests(hub: LoopbackHub, demo_model_dir: Path) -> None:
    shard = _largest_shard(demo_model_dir)
    data = shard.read_bytes()
    size = len(data)
    url = hub.file_url(DEMO_MODEL_REPO_ID, shard.name)
    with httpx.Client(follow_redirects=True) as client:
        r = client.get(url, headers={"Range": "bytes=10-19"})
        assert r.status_code == 206 and r.content == data[10:20]
        assert r.headers["Content-Range"] == f"bytes 10-19/{size}"
        r = client.get(url, headers={"Range": f"bytes={size - 5}-{size + 1000}"})  # clamped
        assert r.status_code == 206 and r.content == data[-5:]
        assert r.headers["Content-Range"] == f"bytes {size - 5}-{size - 1}/{size}"
        r = client.get(url, headers={"Range": "bytes=-7"})
        assert r.status_code == 206 and r.content == data[-7:]
        r = client.get(url, headers={"Range": f"bytes={size}-"})
        assert r.status_code == 416 and r.headers["Content-Range"] == f"bytes */{size}"
        head = client.head(url)
        assert head.status_code == 200 and head.content == b""
        assert int(head.headers["Content-Length"]) == size
        assert head.headers["X-Repo-Commit"] == hub.repos[DEMO_MODEL_REPO_ID].commit
        first = client.get(url, follow_redirects=False)
        assert first.status_code == 302
        assert first.headers["X-Linked-Size"] == str(size)
        assert first.headers["X-Linked-Etag"] == f'"{file_sha256(shard)}"'
    ranges = [r.range for r in hub.requests if r.status == 206]
    assert "bytes=10-19" in ranges


def test_hf_transfer_downloads_a_shard(
    hub: LoopbackHub, demo_model_dir: Path, tmp_path: Path
) -> None:
    # hf_transfer holds the GIL while it downloads, so it must run outside the hub's process.
    shard = _largest_shard(demo_model_dir)
    dest = tmp_path / shard.name
    code = (
        "import sys, hf_transfer; hf_transfer.download(sys.argv[1], sys.argv[2], max_files=4,"
        " chunk_size=256 * 1024, headers={'User-Agent': sys.argv[3]})"
    )
    url = hub.file_url(DEMO_MODEL_REPO_ID, shard.name)
    args = [sys.executable, "-c", code, url, str(dest), node_user_agent("node-a")]
    subprocess.run(args, check=True, timeout=60)
    assert file_sha256(dest) == file_sha256(shard)
    chunks = [r for r in hub.fetched(identity="node-a") if r.filename == shard.name]
    assert len(chunks) >= shard.stat().st_size // (256 * 1024)
    assert all(r.status == 206 and r.range for r in chunks)
    assert sum(r.bytes_sent for r in chunks) >= shard.stat().st_size


def test_rate_limit_429_is_retried_after_retry_after(
    hub: LoopbackHub, demo_model_dir: Path, tmp_path: Path
) -> None:
    shard = _largest_shard(demo_model_dir)
    hub.faults.rate_limit(count=1, retry_after=1, match="/_lfs/", method="GET")
    started = time.monotonic()
    got = _download(hub, shard.name, tmp_path / "cache")
    assert file_sha256(got) == file_sha256(shard)
    assert time.monotonic() - started >= 1.0  # waited for Retry-After
    statuses = [r.status for r in hub.requests if r.method == "GET" and r.filename == shard.name]
    assert statuses == [429, 200]
    limited = next(r for r in hub.requests if r.status == 429)
    assert limited.path.startswith("/_lfs/")


def test_server_errors_503_retried_and_500_surfaces(
    hub: LoopbackHub, demo_model_dir: Path, tmp_path: Path
) -> None:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    hub.faults.fail_next(503, count=1, match="config.json")
    got = _download(hub, "config.json", tmp_path / "cache")
    assert got.read_bytes() == (demo_model_dir / "config.json").read_bytes()
    assert [r.status for r in hub.requests if r.filename == "config.json"][:2] == [503, 200]
    hub.faults.fail_next(500, count=1, match="/api/models/")
    with pytest.raises(HfHubHTTPError) as err:
        HfApi(endpoint=hub.url).model_info(DEMO_MODEL_REPO_ID)
    assert err.value.response.status_code == 500


def test_dropped_connection_is_resumed(
    hub: LoopbackHub, demo_model_dir: Path, tmp_path: Path
) -> None:
    shard = _largest_shard(demo_model_dir)
    hub.faults.drop_connection(shard.name, after_bytes=300_000)
    got = _download(hub, shard.name, tmp_path / "cache")
    assert file_sha256(got) == file_sha256(shard)
    gets = [r for r in hub.requests if r.method == "GET" and r.filename == shard.name]
    assert gets[0].dropped and gets[0].bytes_sent == 300_000
    # huggingface_hub reads 10 MB chunks, so a short file restarts from 0 rather than resuming.
    assert len(gets) == 2 and gets[1].status in (200, 206) and not gets[1].dropped
    assert gets[1].bytes_sent + (300_000 if gets[1].range else 0) == shard.stat().st_size


def test_corrupted_byte_is_caught_by_sha256(
    hub: LoopbackHub, demo_model_dir: Path, tmp_path: Path
) -> None:
    from huggingface_hub import HfApi

    shard = _largest_shard(demo_model_dir)
    hub.faults.corrupt(shard.name)
    got = _download(hub, shard.name, tmp_path / "cache")
    info = HfApi(endpoint=hub.url).model_info(DEMO_MODEL_REPO_ID, files_metadata=True)
    expected = next(s for s in info.siblings or [] if s.rfilename == shard.name)
    assert got.stat().st_size == expected.size  # same size: only a hash can tell
    assert file_sha256(got) != expected.lfs.sha256
    pairs = zip(got.read_bytes(), shard.read_bytes(), strict=True)
    diff = [i for i, (a, b) in enumerate(pairs) if a != b]
    assert diff == [shard.stat().st_size // 2]


def test_gated_repo_needs_the_token(hub: LoopbackHub, demo_model_dir: Path, tmp_path: Path) -> None:
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download
    from huggingface_hub.errors import GatedRepoError

    info = HfApi(endpoint=hub.url).model_info(GATED_REPO_ID)
    assert info.gated == "manual"  # metadata stays public, files do not
    with pytest.raises(GatedRepoError) as err:
        hf_hub_download(GATED_REPO_ID, "config.json", cache_dir=tmp_path / "a", token=False)
    assert err.value.response.status_code == 401
    with pytest.raises(GatedRepoError) as err:
        hf_hub_download(GATED_REPO_ID, "config.json", cache_dir=tmp_path / "b", token="hf_wrong")
    assert err.value.response.status_code == 403
    with pytest.raises(GatedRepoError):
        snapshot_download(GATED_REPO_ID, cache_dir=tmp_path / "c", token=False)
    got = Path(snapshot_download(GATED_REPO_ID, cache_dir=tmp_path / "d", token=hub.token))
    assert _tree_digests(got) == _tree_digests(demo_model_dir)
    r = httpx.get(hub.file_url(GATED_REPO_ID, "config.json"))
    assert r.status_code == 401 and r.headers["X-Error-Code"] == "GatedRepo"
    assert hub.token not in " ".join(r.user_agent for r in hub.requests)


def _parallel_rates(hub: LoopbackHub, url: str, names: list[str], nbytes: int) -> list[float]:
    """Download the first ``nbytes`` of ``url`` once per name, all at once; bytes/s of each."""
    rates: list[float] = [0.0] * len(names)

    def fetch(k: int) -> None:
        headers = {"User-Agent": f"{node_user_agent(names[k])} huggingface_hub/x"}
        headers["Range"] = f"bytes=0-{nbytes - 1}"
        started = time.monotonic()
        r = httpx.get(url, headers=headers, follow_redirects=True, timeout=60)
        assert r.status_code == 206 and len(r.content) == nbytes
        rates[k] = nbytes / (time.monotonic() - started)

    threads = [threading.Thread(target=fetch, args=(k,)) for k in range(len(names))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return rates


def test_bandwidth_cap_is_per_identity(hub: LoopbackHub, demo_model_dir: Path) -> None:
    shard = _largest_shard(demo_model_dir)
    nbytes, cap = 300_000, 250_000.0  # about 1.2 s per download at the cap
    hub.faults.limit_bandwidth(cap)
    url = hub.file_url(DEMO_MODEL_REPO_ID, shard.name)
    apart = _parallel_rates(hub, url, ["node-a", "node-b"], nbytes)
    together = _parallel_rates(hub, url, ["node-c", "node-c"], nbytes)
    # Each identity gets its own cap; one identity's connections share one cap.
    assert all(0.4 * cap < rate < 1.15 * cap for rate in apart), (apart, cap)
    assert all(rate < 0.6 * cap for rate in together), (together, cap)
    assert min(apart) > 1.4 * max(together), (apart, together)
    for name in ("node-a", "node-b"):
        assert [r.filename for r in hub.fetched(identity=name)] == [shard.name]
    assert len(hub.fetched(identity="node-c")) == 2


def test_identity_falls_back_to_the_address() -> None:
    assert identity_of("python-httpx/0.28 llamacluster-node/worker-2", "127.0.0.1") == "worker-2"
    assert identity_of("huggingface_hub/2.4", "127.0.0.3") == "127.0.0.3"
    assert identity_of(None, "127.0.0.1") == "127.0.0.1"
