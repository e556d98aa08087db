"""System files on the nodes: `down --purge` undoes only llamacluster's own lines, keeps the
state until every node confirms, and the NFS export/mount options are the safe ones."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from cluster import fscache
from cluster.errors import RemoteError
from cluster.inventory import parse_inventory
from cluster.lifecycle import down
from cluster.runner import LocalRunner
from cluster.stages.base import Reporter, UpContext
from cluster.stages.config import UpConfig
from cluster.stages.storage import SharedStorage
from cluster.state import Access, ClusterState, NodeState, load_state

FSTAB = "UUID=1 / ext4 defaults 0 1\n10.0.0.2:/export/shared /mnt/shared nfs4 rw,hard 0 0\n"
EXPORTS = "/srv/other 10.0.0.9(ro)\n"
ADMIN_FSTAB = "10.0.0.7:/backup /srv/llama-backup nfs4 ro,nofail 0 0\n"
ADMIN_EXPORT = "/srv/llama-backup 10.0.0.11(ro,root_squash)\n"


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMACLUSTER_HOME", str(tmp_path / "home"))


def _root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc/fstab").write_text(FSTAB)
    (root / "etc/exports").write_text(EXPORTS)
    return root


def test_revert_takes_out_only_our_lines_and_keeps_an_admins_next_to_them(tmp_path):
    root = _root(tmp_path)
    fscache.add_fsc(str(root), "/mnt/shared")
    fscache.add_mount(str(root), server="10.0.0.10", shared_dir="/srv/llama")
    fscache.add_export(str(root), shared_dir="/srv/llama", clients=["10.0.0.11"])
    # An administrator adds lines afterwards, right after ours and right before them.
    fstab, exports = root / "etc/fstab", root / "etc/exports"
    fstab.write_text(fstab.read_text() + ADMIN_FSTAB)
    lines = exports.read_text().splitlines(keepends=True)
    exports.write_text(lines[0] + ADMIN_EXPORT + "".join(lines[1:]) + ADMIN_EXPORT)
    result = fscache.revert(str(root))
    assert set(result["restored"]) == {"/etc/fstab", "/etc/exports"}
    assert fstab.read_text() == FSTAB + ADMIN_FSTAB
    assert exports.read_text() == EXPORTS + ADMIN_EXPORT + ADMIN_EXPORT
    assert not [p for p in (root / "etc").iterdir() if fscache.BACKUP_SUFFIX in p.name]
    assert fscache.revert(str(root))["changed"] is False


def test_a_marker_whose_line_was_replaced_removes_only_the_marker(tmp_path):
    root = _root(tmp_path)
    fscache.add_mount(str(root), server="10.0.0.10", shared_dir="/srv/llama")
    fstab = root / "etc/fstab"
    fstab.write_text(
        fstab.read_text().replace("10.0.0.10:/srv/llama /srv/llama", "x:/y /elsewhere")
    )
    fscache.revert(str(root))
    assert fstab.read_text().startswith(FSTAB) and "/elsewhere" in fstab.read_text()
    assert fscache.MARK_PREFIX not in fstab.read_text()


def test_exports_squash_root_unless_asked_and_mounts_do_not_hold_boot(tmp_path):
    root = _root(tmp_path)
    script = fscache.script_source()

    def export(*extra: str) -> str:
        (root / "etc/exports").write_text("")
        done = subprocess.run(
            [sys.executable, "-", "add-export", "--root", str(root), "--shared-dir", "/s",
             "--client", "10.0.0.11", *extra],
            input=script, capture_output=True, text=True, check=True,
        )  # fmt: skip
        assert '"changed": true' in done.stdout
        return (root / "etc/exports").read_text().splitlines()[-1]

    assert export() == "/s 10.0.0.11(rw,sync,no_subtree_check,root_squash)"
    assert export("--no-root-squash") == "/s 10.0.0.11(rw,sync,no_subtree_check,no_root_squash)"
    options = fscache.DEFAULT_MOUNT_OPTIONS.split(",")
    assert "nofail" in options and "x-systemd.mount-timeout=30s" in options
    assert any(o.startswith("timeo=") for o in options)


def _state(tmp_path: Path, python: str) -> ClusterState:
    state = ClusterState(
        name="t",
        access=Access(local=True, system_root=str(_root(tmp_path))),
        nodes=[NodeState(name="head", label="127.0.0.1", host="127.0.0.1", python=python)],
    )
    state.storage.fs_edits = {"head": ["/etc/exports"]}
    state.save()
    return state


def test_purge_keeps_the_state_until_every_node_confirms(tmp_path):
    _state(tmp_path, python="/nonexistent/python3")
    with pytest.raises(RemoteError, match=r"cluster t kept: 127\.0\.0\.1 did not confirm"):
        down("t", purge=True, console=Console(file=io.StringIO()))
    assert load_state("t").storage.fs_edits == {"head": ["/etc/exports"]}
    assert down("t", purge=True, force=True, console=Console(file=io.StringIO())) is None
    with pytest.raises(Exception, match="no cluster named 't'"):
        load_state("t")


def test_storage_stage_records_its_edits_and_purge_undoes_them(tmp_path):
    state = _state(tmp_path, python=sys.executable)
    state.storage.fs_edits = {}
    state.nodes.append(
        NodeState(name="worker1", label="127.0.0.2", host="127.0.0.2", python=sys.executable)
    )
    state.shared_dir = str(tmp_path / "shared")
    state.save()
    cluster = parse_inventory("127.0.0.1\n127.0.0.2\n")
    config = UpConfig(local=True, nfs_server="head", system_root=Path(state.access.system_root))
    ctx = UpContext(
        config=config,
        cluster=cluster,
        state=state,
        runners=[LocalRunner(n) for n in cluster],
        reporter=Reporter(Console(file=io.StringIO())),
    )
    SharedStorage().run(ctx)
    root = Path(state.access.system_root)
    exported = (root / "etc/exports").read_text().splitlines()[-1]
    assert exported.endswith(" 127.0.0.2(rw,sync,no_subtree_check,root_squash)")
    assert load_state("t").storage.fs_edits == {"head": ["/etc/exports"], "worker1": ["/etc/fstab"]}
    (root / "etc/exports").write_text((root / "etc/exports").read_text() + ADMIN_EXPORT)
    assert down("t", purge=True, console=Console(file=io.StringIO())) is None
    assert (root / "etc/exports").read_text() == EXPORTS + ADMIN_EXPORT
    assert (root / "etc/fstab").read_text() == FSTAB
