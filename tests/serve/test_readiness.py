"""`wait_until_ready` against a real HTTP server on loopback, and what its module imports."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cluster.errors import NotReadyError
from serve.readiness import wait_until_ready
from tests.support.status_server import status_server

REPO = Path(__file__).resolve().parents[2]


def test_a_restarting_engine_is_waited_for() -> None:
    loading = (503, {"status": "loading"})
    routes = {
        "/ready": [loading, loading, (200, {"status": "ready"})],
        "/health": (503, {"status": "restarting"}),
    }
    with status_server(routes) as (url, seen):
        wait_until_ready(url, timeout_s=30, poll_s=0.05)
    assert seen == ["/ready", "/health", "/ready", "/health", "/ready"]


def test_a_failed_engine_ends_the_wait_with_its_reason() -> None:
    failed = {"error": {"message": "the engine failed to start: out of memory"}}
    routes = {"/ready": (503, {"status": "loading"}), "/health": (500, failed)}
    with (
        status_server(routes) as (url, _),
        pytest.raises(NotReadyError, match="not healthy: the engine failed to start"),
    ):
        wait_until_ready(url, timeout_s=30, poll_s=0.05)


def test_the_timeout_names_the_last_answer() -> None:
    routes = {"/ready": (503, {"status": "loading weights"}), "/health": (200, {"status": "ok"})}
    with (
        status_server(routes) as (url, _),
        pytest.raises(NotReadyError, match=r"not ready after 0.3s \(last: loading weights\)"),
    ):
        wait_until_ready(url, timeout_s=0.3, poll_s=0.05)


def test_waiting_imports_neither_ray_nor_vllm() -> None:
    """`up` waits on the head in a fresh process: importing Ray Serve there cost seconds (tens
    on a node busy with engines) before the first request and again at its exit."""
    code = (
        "import sys, serve.remote, serve.readiness\n"
        "print(sorted(m for m in ('ray', 'vllm', 'torch', 'fastapi') if m in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == "[]", done.stdout
