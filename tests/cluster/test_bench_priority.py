"""The load client's CPU priority (cluster/bench/priority.py): raised for the block, restored
after, and left alone where it cannot be raised."""

from __future__ import annotations

import os
import threading

import pytest

from cluster.bench import priority


def _thread_nice() -> int:
    return os.getpriority(os.PRIO_PROCESS, 0)


def test_the_session_group_is_raised_and_restored_under_autogroup():
    if not priority.autogroup_enabled():
        pytest.skip("this kernel does not schedule by autogroup (the thread branch is below)")
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
