"""The load client's CPU priority (cluster/bench/priority.py): raised for the block, restored
after, and left alone where it cannot be raised."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from cluster.bench import priority
from tests.support.priority import kernel_lets_raise

REPO = Path(__file__).resolve().parents[2]


def _thread_nice() -> int:
    return os.getpriority(os.PRIO_PROCESS, 0)


def test_the_session_group_is_raised_and_restored_under_autogroup():
    if priority.lever() != "autogroup":
        pytest.skip("no autogroup of this session's own to raise (the thread branch is below)")
    before = priority.autogroup_nice()
    with priority.raised_priority(-5) as raised:
        inside = priority.autogroup_nice()
    assert priority.autogroup_nice() == before
    if raised is None:  # not permitted: nothing changed
        assert inside == before
    else:
        assert inside == -5 and raised == f"session autogroup nice {before} -> -5"


def test_without_autogroup_the_thread_and_the_threads_it_starts_are_raised(tmp_path, monkeypatch):
    switch = tmp_path / "sched_autogroup_enabled"
    switch.write_text("0\n")
    monkeypatch.setattr(priority, "AUTOGROUP_SWITCH", switch)
    before = _thread_nice()
    seen: list[int] = []
    with priority.raised_priority(before - 3) as raised:
        inside = _thread_nice()
        worker = threading.Thread(target=lambda: seen.append(_thread_nice()))
        worker.start()
        worker.join()
    assert _thread_nice() == before
    if raised is None:  # not permitted (no CAP_SYS_NICE): nothing changed
        assert inside == before
    else:
        assert inside == before - 3 and seen == [before - 3]
        assert raised == f"thread nice {before} -> {before - 3}"


def test_a_session_in_the_root_group_raises_its_thread(tmp_path, monkeypatch):
    """A process the init process started without ``setsid`` (a container's first process and
    its children, CI's pytest among them) is in the root autogroup: its ``/proc/self/autogroup``
    reads empty (as ``/proc/1/autogroup`` does in a container) and the kernel refuses a write
    (EINVAL), while its threads compete at the top level by their own nice value."""
    if not priority.autogroup_enabled():
        pytest.skip("this kernel does not schedule by autogroup")
    init_group = Path("/proc/1/autogroup")
    root_group = tmp_path / "autogroup"
    root_group.write_text("")
    with contextlib.suppress(OSError):
        if init_group.read_text() == "":  # the init process's own file where it reads as such
            root_group = init_group
    monkeypatch.setattr(priority, "AUTOGROUP_SELF", root_group)
    assert priority.lever() == "thread"
    before = _thread_nice()
    with priority.raised_priority(before - 3) as raised:
        inside = _thread_nice()
    assert _thread_nice() == before
    if kernel_lets_raise(before - 3, "thread"):
        assert inside == before - 3 and raised == f"thread nice {before} -> {before - 3}"
    else:
        assert inside == before and raised is None


def test_an_exception_in_the_block_still_restores(tmp_path, monkeypatch):
    switch = tmp_path / "sched_autogroup_enabled"
    switch.write_text("0\n")
    monkeypatch.setattr(priority, "AUTOGROUP_SWITCH", switch)
    before = _thread_nice()
    try:
        with priority.raised_priority(before - 2):
            raise KeyError("boom")
    except KeyError:
        pass
    assert _thread_nice() == before


_BACK_TO_BACK = """
import json
from cluster.bench import priority
seen = []
for _ in range(3):
    with priority.raised_priority(-5) as raised:
        inside = priority.autogroup_nice()
    seen.append([raised, inside, priority.autogroup_nice()])
print(json.dumps(seen))
"""


def _confinement(kind: str) -> tuple[str, ...]:
    """A command prefix that runs a child as CI's containers run pytest."""
    if kind == "no CAP_SYS_ADMIN":  # the kernel's 100 ms rate limit on autogroup writes
        if os.geteuid() != 0 or not shutil.which("setpriv"):
            return ()  # not root: CAP_SYS_ADMIN is already missing
        return ("setpriv", "--inh-caps=-sys_admin", "--bounding-set=-sys_admin")
    # root in a user namespace: every capability in CapEff, refused by the kernel all the same
    prefix = ("unshare", "--user", "--map-root-user")
    if not shutil.which("unshare") or subprocess.run([*prefix, "true"], check=False).returncode:
        pytest.skip("this machine does not let a process make a user namespace")
    return prefix


@pytest.mark.parametrize("kind", ["no CAP_SYS_ADMIN", "user namespace"])
def test_blocks_back_to_back_are_raised_and_restored_as_far_as_the_kernel_lets(kind):
    if not priority.autogroup_enabled():
        pytest.skip("this kernel does not schedule by autogroup")
    prefix = _confinement(kind)
    child = subprocess.run([*prefix, sys.executable, "-c", _BACK_TO_BACK], cwd=REPO,
                           start_new_session=True, capture_output=True, text=True, timeout=60,
                           check=False)  # fmt: skip
    assert child.returncode == 0, child.stderr
    assert "warning" not in child.stderr
    seen = json.loads(child.stdout)
    if kernel_lets_raise(-5, "autogroup", prefix):  # each raise and restore retried past EAGAIN
        assert seen == [["session autogroup nice 0 -> -5", -5, 0]] * 3
    else:  # refused: told (None), nothing changed
        assert seen == [[None, 0, 0]] * 3
