"""Download planning: file selection and byte balancing across nodes (pure, no hub)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from cluster.demo_model import DEMO_MODEL_REPO_ID
from cluster.download.errors import AccessDeniedError
from cluster.download.plan import (
    RepoFile,
    assign_files,
    make_plan,
    plan_download,
    select_files,
)
from cluster.errors import ConfigError
from tests.support.hub import LoopbackHub, file_sha256


def _weights(sizes: list[int]) -> list[RepoFile]:
    n = len(sizes)
    return [
        RepoFile(path=f"model-{i + 1:05d}-of-{n:05d}.safetensors", size=s, sha256=f"{i:064x}")
        for i, s in enumerate(sizes)
    ]


SMALL = [
    RepoFile(path="config.json", size=700, git_sha1="a" * 40),
    RepoFile(path="tokenizer.json", size=9_000, git_sha1="b" * 40),
    RepoFile(path="model.safetensors.index.json", size=20_000, git_sha1="c" * 40),
    RepoFile(path="generation_config.json", size=150, git_sha1="d" * 40),
]


def _uneven_sizes(seed: int, count: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(1, 5_000) * 1_000_000 for _ in range(count)]


@pytest.mark.parametrize("num_nodes", [1, 2, 3, 5])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_plan_balances_bytes_and_places_every_file_once(num_nodes: int, seed: int) -> None:
    files = _weights(_uneven_sizes(seed, 30)) + SMALL
    nodes = [f"node{i}" for i in range(num_nodes)]
    plan = make_plan(repo="org/m", revision="main", commit="f" * 40, files=files, nodes=nodes)

    assert [a.node for a in plan.nodes] == nodes
    placed = [f.path for a in plan.nodes for f in a.files]
    assert sorted(placed) == sorted(f.path for f in files)  # every file exactly once
    loads = [a.total_bytes for a in plan.nodes]
    assert max(loads) - min(loads) <= max(f.size for f in files)
    assert sum(loads) == sum(f.size for f in files)
    head_files = {f.path for f in plan.nodes[0].files}
    assert {f.path for f in SMALL} <= head_files  # config/tokenizer/index on the head
    for other in plan.nodes[1:]:
        assert not any(f.path in head_files for f in other.files)


def test_plan_is_deterministic_and_balances_bytes_not_counts() -> None:
    # One huge file and many small shards: counts would be unbalanced on purpose.
    files = _weights([900, 100, 100, 100, 100, 100, 100, 100, 100, 100])
    a = assign_files(files, ["h", "w1"])
    b = assign_files(list(reversed(files)), ["h", "w1"])
    assert a == b
    assert [x.total_bytes for x in a] == [900, 900]
    assert [len(x.files) for x in a] == [1, 9]


def test_equal_sizes_tie_break_round_robin_in_node_order() -> None:
    files = _weights([10] * 6)
    plan = assign_files(files, ["head", "w1", "w2"])
    assert [len(x.files) for x in plan] == [2, 2, 2]
    assert plan[0].files[0].path == files[0].path  # largest-first, then by path, head first


def test_more_nodes_than_files_leaves_some_idle() -> None:
    plan = assign_files(_weights([5, 3]), ["a", "b", "c", "d", "e"])
    assert [x.total_bytes for x in plan] == [5, 3, 0, 0, 0]


def test_default_excludes_duplicates_and_originals() -> None:
    files = [
        *_weights([10, 10]),
        RepoFile(path="config.json", size=1),
        RepoFile(path="original/consolidated.00.pth", size=50),
        RepoFile(path="original/params.json", size=1),
        RepoFile(path="consolidated.safetensors", size=20),
        RepoFile(path="pytorch_model-00001-of-00002.bin", size=30),
        RepoFile(path="pytorch_model.bin.index.json", size=1),
        RepoFile(path="model.Q4_K_M.gguf", size=9),
        RepoFile(path="training_state.pt", size=9),
        RepoFile(path="flax_model.msgpack", size=9),
    ]
    kept, excluded = select_files(files)
    assert sorted(f.path for f in kept) == sorted(["config.json", files[0].path, files[1].path])
    assert "original/params.json" in excluded
    assert "pytorch_model.bin.index.json" in excluded


def test_bin_weights_kept_when_no_safetensors() -> None:
    files = [RepoFile(path="pytorch_model.bin", size=30), RepoFile(path="config.json", size=1)]
    kept, _ = select_files(files)
    assert {f.path for f in kept} == {"pytorch_model.bin", "config.json"}


def test_include_overrides_default_skip_and_exclude_wins() -> None:
    files = [*_weights([10, 10]), RepoFile(path="original/consolidated.00.pth", size=50)]
    kept, _ = select_files(files, include=["original/*"])
    assert [f.path for f in kept] == ["original/consolidated.00.pth"]
    kept, _ = select_files(files, exclude=["model-00002-*"])
    assert [f.path for f in kept] == [files[0].path]


def test_plan_errors_are_actionable() -> None:
    with pytest.raises(ConfigError, match="no nodes"):
        assign_files(_weights([1]), [])
    with pytest.raises(ConfigError, match="unique"):
        assign_files(_weights([1]), ["a", "a"])
    with pytest.raises(ConfigError, match="include/exclude"):
        make_plan(
            repo="o/m",
            revision="main",
            commit="c" * 40,
            files=_weights([1]),
            nodes=["a"],
            include=["nothing*"],
        )


def test_large_non_weight_file_is_balanced_like_a_weight() -> None:
    big = RepoFile(path="tokenizer.json", size=64 * 1024 * 1024)
    plan = assign_files([*_weights([100 * 1024 * 1024]), big], ["head", "w1"])
    assert [f.path for f in plan[1].files] == ["tokenizer.json"]


def test_plan_download_resolves_one_commit_with_hub_hashes(
    hub: LoopbackHub, demo_model_dir: Path
) -> None:
    plan = plan_download(DEMO_MODEL_REPO_ID, nodes=["head", "worker1"])
    served = hub.repos[DEMO_MODEL_REPO_ID]
    assert plan.commit == served.commit and plan.revision == "main"
    by_path = {f.path: f for f in plan.files}
    assert set(by_path) == set(served.files)
    for path, f in by_path.items():
        assert f.size == served.files[path].size
        if path.endswith(".safetensors"):
            assert f.sha256 == file_sha256(demo_model_dir / path)  # LFS sha256
        else:
            assert f.sha256 is None and f.git_sha1 == served.files[path].git_oid
    # Planning is one metadata call from the controller, tagged as such; no file is fetched.
    api = [r for r in hub.requests if r.path.startswith("/api/models/")]
    assert [r.identity for r in api] == ["controller"]
    assert hub.fetched() == []


def test_plan_download_errors_name_the_way_out(hub: LoopbackHub) -> None:
    with pytest.raises(ConfigError, match="revision 'nope' not found"):
        plan_download(DEMO_MODEL_REPO_ID, nodes=["head"], revision="nope")
    with pytest.raises(AccessDeniedError) as info:
        plan_download("someone/missing-model", nodes=["head"])
    assert f"{hub.url}/someone/missing-model" in info.value.one_line()
    assert "HF_TOKEN" in info.value.one_line()


def test_cli_dry_run_prints_the_per_node_plan(hub: LoopbackHub, tmp_path: Path, capsys) -> None:
    from cluster.cli.app import main

    ips = tmp_path / "ips.txt"
    ips.write_text("127.0.0.1\n127.0.0.2\n127.0.0.3\n")
    code = main(
        [
            "download",
            DEMO_MODEL_REPO_ID,
            "--target",
            str(tmp_path / "m"),
            "--ips",
            str(ips),
            "--local",
            "--dry-run",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    for word in ("head", "worker1", "worker2", "model-00001-of-00004.safetensors", "MB"):
        assert word in out
    assert not (tmp_path / "m").exists()
