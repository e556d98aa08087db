"""The NFS/cachefilesd file edits against files in a temp root, and the script run as a node would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cluster import fscache

PROVIDER_FSTAB = """\
# /etc/fstab: static file system information.
UUID=1234-abcd  /               ext4    errors=remount-ro 0       1
/swapfile       none            swap    sw              0       0
10.0.0.2:/export/shared   /mnt/shared   nfs4   rw,hard,nconnect=8   0   0
"""


def _root(tmp_path: Path, fstab: str | None = PROVIDER_FSTAB) -> Path:
    root = tmp_path / "root"
    (root / "etc" / "default").mkdir(parents=True)
    if fstab is not None:
        (root / "etc" / "fstab").write_text(fstab)
        os.chmod(root / "etc" / "fstab", 0o640)
    return root


def _findmnt_verify(path: Path) -> str:
    """findmnt's verdict on the file; sources/targets that do not exist on this machine are
    reported as errors by findmnt, so the check is: no parse error, no complaint other than
    "unreachable"/"cannot detect" ones."""
    done = subprocess.run(
        ["findmnt", "--verify", "--tab-file", str(path)], capture_output=True, text=True
    )
    report = done.stdout + done.stderr
    assert "0 parse errors" in report, report
    complaints = [
        line.strip()
        for line in report.splitlines()
        if line.strip().startswith(("[E]", "[W]"))
        and "unreachable" not in line
        and "cannot detect" not in line
    ]
    assert not complaints, report
    return report


def _findmnt_options(path: Path, target: str) -> str:
    done = subprocess.run(
        ["findmnt", "--tab-file", str(path), "-n", "-o", "OPTIONS", "--mountpoint", target],
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip()


def test_add_fsc_edits_only_the_options_once_with_one_backup(tmp_path):
    root = _root(tmp_path)
    fstab = root / "etc" / "fstab"
    result = fscache.add_fsc(str(root), "/mnt/shared/llamacluster")
    assert result == {"changed": True, "mountpoint": "/mnt/shared", "line": 5}
    text = fstab.read_text()
    assert text.splitlines()[3] == fscache._mark("fsc", "/mnt/shared").strip()
    assert (
        text.splitlines()[4]
        == "10.0.0.2:/export/shared   /mnt/shared   nfs4   rw,hard,nconnect=8,fsc   0   0"
    )
    assert text.splitlines()[:3] == PROVIDER_FSTAB.splitlines()[:3]
    assert oct(fstab.stat().st_mode & 0o777) == oct(0o640)
    backup = Path(str(fstab) + fscache.BACKUP_SUFFIX)
    assert backup.read_text() == PROVIDER_FSTAB
    before = fstab.read_bytes()
    assert fscache.add_fsc(str(root), "/mnt/shared/llamacluster")["changed"] is False
    assert fstab.read_bytes() == before
    assert backup.read_text() == PROVIDER_FSTAB  # still the original, not the edited file
    assert sorted(p.name for p in fstab.parent.iterdir() if "fstab" in p.name) == [
        "fstab",
        "fstab.llamacluster.bak",
    ]
    _findmnt_verify(fstab)
    assert _findmnt_options(fstab, "/mnt/shared") == "rw,hard,nconnect=8,fsc"


def test_defaults_becomes_defaults_fsc_and_findmnt_accepts_it(tmp_path):
    root = _root(tmp_path, "nfs.example:/vol  /data  nfs  defaults  0 0\n")
    fscache.add_fsc(str(root), "/data")
    assert (root / "etc/fstab").read_text() == (
        fscache._mark("fsc", "/data") + "nfs.example:/vol  /data  nfs  defaults,fsc  0 0\n"
    )
    _findmnt_verify(root / "etc/fstab")
    assert _findmnt_options(root / "etc/fstab", "/data") == "defaults,fsc"


def test_ambiguous_lines_are_refused_without_a_write(tmp_path):
    text = PROVIDER_FSTAB + "10.0.0.3:/export/shared /mnt/shared nfs rw 0 0\n"
    root = _root(tmp_path, text)
    with pytest.raises(fscache.Refused, match="2 NFS lines"):
        fscache.add_fsc(str(root), "/mnt/shared")
    assert (root / "etc/fstab").read_text() == text
    assert not (root / "etc" / ("fstab" + fscache.BACKUP_SUFFIX)).exists()


def test_provider_mount_without_a_line_warns_and_skips(tmp_path):
    root = _root(tmp_path, "UUID=1 / ext4 defaults 0 1\n")
    result = fscache.add_fsc(str(root), "/mnt/shared")
    assert result["skipped"] and "no NFS line" in result["warning"]
    assert not (root / "etc" / ("fstab" + fscache.BACKUP_SUFFIX)).exists()


def test_commented_and_non_nfs_lines_are_ignored(tmp_path):
    text = "#10.0.0.2:/x /mnt/shared nfs rw 0 0\n/dev/sdb1 /mnt/shared ext4 rw 0 2\n"
    root = _root(tmp_path, text)
    assert fscache.add_fsc(str(root), "/mnt/shared")["skipped"]
    assert (root / "etc/fstab").read_text() == text


def test_cachefilesd_run_and_dir_idempotent(tmp_path):
    root = _root(tmp_path)
    default = root / "etc/default/cachefilesd"
    default.write_text(
        "# You must uncomment the run=yes line below for cachefilesd to start.\n#RUN=yes\n"
    )
    conf = root / "etc/cachefilesd.conf"
    conf.write_text("dir /var/cache/fscache\ntag mycache\nbrun 10%\n")
    result = fscache.configure_cachefilesd(str(root), cache_dir="/nvme/fscache")
    assert result == {
        "changed": True,
        "files": ["/etc/default/cachefilesd", "/etc/cachefilesd.conf"],
    }
    assert default.read_text().splitlines()[-1] == "RUN=yes"
    assert conf.read_text() == "dir /nvme/fscache\ntag mycache\nbrun 10%\n"
    snapshot = (default.read_bytes(), conf.read_bytes())
    assert fscache.configure_cachefilesd(str(root), cache_dir="/nvme/fscache")["changed"] is False
    assert (default.read_bytes(), conf.read_bytes()) == snapshot


def test_revert_restores_every_file_and_drops_backups(tmp_path):
    root = _root(tmp_path)
    fscache.add_fsc(str(root), "/mnt/shared")
    fscache.configure_cachefilesd(str(root))  # both files absent before: revert removes them
    result = fscache.revert(str(root))
    assert result["changed"] and "/etc/fstab" in result["restored"]
    assert set(result["removed"]) == {"/etc/default/cachefilesd", "/etc/cachefilesd.conf"}
    assert (root / "etc/fstab").read_text() == PROVIDER_FSTAB
    assert oct((root / "etc/fstab").stat().st_mode & 0o777) == oct(0o640)
    assert not (root / "etc/default/cachefilesd").exists()
    assert not [p for p in (root / "etc").rglob("*") if fscache.BACKUP_SUFFIX in p.name]
    assert fscache.revert(str(root))["changed"] is False


def test_nfs_server_head_export_and_worker_mount(tmp_path):
    root = _root(tmp_path, "UUID=1 / ext4 defaults 0 1")  # no trailing newline
    export = fscache.add_export(
        str(root), shared_dir="/srv/llama", clients=["10.0.0.11", "10.0.0.12"]
    )
    assert export["changed"]
    line = "/srv/llama 10.0.0.11(rw,sync,no_subtree_check,root_squash) 10.0.0.12(rw,sync,no_subtree_check,root_squash)\n"
    assert (root / "etc/exports").read_text() == fscache._mark("export", "/srv/llama") + line
    assert (
        fscache.add_export(str(root), shared_dir="/srv/llama/", clients=["x"])["changed"] is False
    )
    mount = fscache.add_mount(str(root), server="10.0.0.10", shared_dir="/srv/llama")
    assert mount["changed"]
    fstab = root / "etc/fstab"
    assert fstab.read_text() == (
        "UUID=1 / ext4 defaults 0 1\n"
        + fscache._mark("mount", "/srv/llama")
        + "10.0.0.10:/srv/llama /srv/llama nfs4 "
        + "defaults,_netdev,nofail,x-systemd.mount-timeout=30s,timeo=150,fsc 0 0\n"
    )
    before = fstab.read_bytes()
    assert (
        fscache.add_mount(str(root), server="10.0.0.10", shared_dir="/srv/llama")["changed"]
        is False
    )
    assert fstab.read_bytes() == before
    _findmnt_verify(fstab)
    assert _findmnt_options(fstab, "/srv/llama") == fscache.DEFAULT_MOUNT_OPTIONS
    with pytest.raises(fscache.Refused, match="already mounts"):
        fscache.add_mount(str(root), server="10.9.9.9", shared_dir="/srv/llama")


def test_script_runs_with_plain_python3_from_stdin(tmp_path):
    """The node path: the module's source on stdin of `python3 -`, no project installed."""
    root = _root(tmp_path)
    cmd = fscache.script_command(
        "add-fsc", "--root", str(root), "--shared-dir", "/mnt/shared", python="/usr/bin/python3"
    )
    env = {"PATH": "/usr/bin:/bin"}  # no venv, no PYTHONPATH: stdlib only
    done = subprocess.run(
        ["bash", "-c", cmd],
        input=fscache.script_source(),
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["changed"] is True
    (root / "etc/fstab").write_text(PROVIDER_FSTAB + PROVIDER_FSTAB.splitlines()[-1] + "\n")
    refused = subprocess.run(
        ["bash", "-c", cmd], input=fscache.script_source(), capture_output=True, text=True, env=env
    )
    assert refused.returncode == fscache.EXIT_REFUSED
    assert "NFS lines" in json.loads(refused.stdout)["refused"]


def test_module_imports_only_the_standard_library():
    names = set(sys.stdlib_module_names) | {"__future__"}
    source = fscache.script_source()
    imported = {
        line.split()[1].split(".")[0]
        for line in source.splitlines()
        if line.startswith(("import ", "from "))
    }
    assert imported <= names, imported - names


def test_command_plans_are_what_the_real_system_needs():
    assert fscache.remount_commands("/mnt/shared", "sudo -n") == [
        "sudo -n umount /mnt/shared",
        "sudo -n mount /mnt/shared",
    ]
    assert "apt-get install -y -q cachefilesd" in fscache.install_cachefilesd_commands()[0]
    assert "/proc/fs/nfsfs/volumes" in fscache.check_fsc_command("/mnt/shared")
