"""The bundle checks a cancelled wait started are all cancelled, also those its thread started
after the cancellation (the Ray side of the checks: tests/serve/test_placement_wait.py)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from serve import placement

pytestmark = pytest.mark.anyio


async def test_checks_started_after_a_cancellation_are_cancelled_too(monkeypatch) -> None:
    cancelled: list[str] = []
    lock = threading.Lock()

    def slow_check(pg, index: int) -> str:
        time.sleep(0.05)  # a GCS call that takes a while for each bundle
        return f"ref-{index}"

    def record_cancel(refs) -> None:
        with lock:
            cancelled.extend(refs)

    monkeypatch.setattr(placement, "check_bundle", slow_check)
    monkeypatch.setattr(placement, "cancel_checks", record_cancel)
    refs: dict[int, str] = {}
    task = asyncio.ensure_future(placement._start_checks(object(), refs, range(6)))
    await asyncio.sleep(0.12)  # two or three of the six started
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    started_before = set(refs.values())
    assert 0 < len(started_before) < 6
    placement.cancel_checks(list(started_before))  # what the caller's own cleanup does
    deadline = time.monotonic() + 5
    while len(cancelled) < 6 and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert sorted(cancelled) == [f"ref-{i}" for i in range(6)]  # each one once
