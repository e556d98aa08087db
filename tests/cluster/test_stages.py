"""Stage plans (--dry-run) and the pure preflight helpers, without running anything on a node."""

from __future__ import annotations

import pytest

from cluster.inventory import parse_inventory
from cluster.lifecycle import UpConfig, up
from cluster.stages.config import STAGE_NAMES
from cluster.stages.preflight import check_alike, node_state_from_probe, parse_probe, pick_address


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMACLUSTER_HOME", str(tmp_path / "home"))


def test_dry_run_prints_every_stage_per_node_and_runs_nothing(tmp_path, capsys):
    inv = tmp_path / "ips.txt"
    inv.write_text("root@127.0.0.2:2222\nroot@127.0.0.3:2222\n")
    cfg = UpConfig(
        inventory=inv,
        model="org/model",
        shared_dir=tmp_path / "shared",
        system_root=tmp_path / "root",
        tp=2,
        pp=2,
        dry_run=True,
    )
    state = up(cfg)
    out = capsys.readouterr().out
    for name in STAGE_NAMES:
        assert f"▸ {name}" in out
    assert "127.0.0.2:2222$" in out and "127.0.0.3:2222$" in out
    assert "python3 - add-fsc --root" in out  # cache stage in the temp-root mode
    assert "apt-get" not in out  # no system command in the temp-root mode
    assert "ray start --head" in out.replace("'", "") or "start --head" in out
    assert "--address 127.0.0.2:6379" in out
    assert not (tmp_path / "shared").exists()  # nothing ran
    assert state.nodes == []


def test_local_dry_run_skips_storage_and_cache(capsys):
    up(UpConfig(local=True, dry_run=True, model="/tmp/some-model"))
    out = capsys.readouterr().out
    assert "skipped: one node: nothing to share" in out
    assert "skipped: --local" in out


def test_pick_address_and_interface():
    node = parse_inventory("root@127.0.0.2:2222").head
    addrs = ["lo 127.0.0.1/8", "eth0 192.0.2.2/24"]
    assert pick_address(node, addrs) == ("127.0.0.2", "lo")
    node = parse_inventory("gpu1 10.0.0.7").head
    assert pick_address(node, ["lo 127.0.0.1/8", "ens5 10.0.0.7/16"]) == ("10.0.0.7", "ens5")
    local = parse_inventory("127.0.0.1").head  # Ray would rewrite 127.0.0.1: use the real address
    assert pick_address(local, addrs) == ("192.0.2.2", "eth0")


def test_probe_parsing_gpu_nodes_and_mismatches():
    text = (
        "os=Ubuntu 22.04\npython=/usr/bin/python3\npython_version=3.10.12\nuid=1000\nsudo=yes\n"
        "numa=2\ngpu=NVIDIA H100 80GB HBM3, 81559, 550.54\ngpu=NVIDIA H100 80GB HBM3, 81559, 550.54\n"
        "cuda=12.4\naddr=ens5 10.0.0.7/16\ndisk_free_kb=104857600\n"
    )
    node = parse_inventory("ubuntu@10.0.0.7").head
    rec = node_state_from_probe(node, parse_probe(text), device="auto", cpu_slots=None)
    assert (rec.device_kind, rec.devices, rec.sudo) == ("gpu", 2, "sudo -n")
    assert rec.device_info["cuda"] == "12.4"
    cpu = node_state_from_probe(node, parse_probe(text), device="cpu", cpu_slots=None)
    assert (cpu.device_kind, cpu.devices) == ("cpu", 2)  # one slot per NUMA node
    other = rec.model_copy(
        update={"label": "b", "device_info": {**rec.device_info, "driver": "535.1"}}
    )
    assert check_alike([rec, rec.model_copy(update={"label": "a"})]) == []
    assert "driver differs" in check_alike([rec, other])[0]
