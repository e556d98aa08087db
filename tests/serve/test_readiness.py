"""`wait_until_ready` against a real HTTP server on loopback, and what its module imports."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest

from cluster.errors import NotReadyError
from serve.readiness import wait_until_ready

REPO = Path(__file__).resolve().parents[2]


class _Server(BaseHTTPRequestHandler):
    # path -> list of (status, body); the last entry repeats.
    answers: ClassVar[dict[str, list[tuple[int, dict]]]] = {}

    def do_GET(self) -> None:
        queue = self.answers[self.path]
        status, body = queue.pop(0) if len(queue) > 1 else queue[0]
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[tuple[str, type[_Server]]]:
    handler = type("Handler", (_Server,), {"answers": {}})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", handler
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_a_restarting_engine_is_waited_for(server) -> None:
    url, handler = server
    loading = (503, {"status": "loading"})
    handler.answers["/ready"] = [loading, loading, (200, {"status": "ready"})]
    handler.answers["/health"] = [(503, {"status": "restarting"})]
    wait_until_ready(url, timeout_s=30, poll_s=0.05)
    assert handler.answers["/ready"] == [(200, {"status": "ready"})]


def test_a_failed_engine_ends_the_wait_with_its_reason(server) -> None:
    url, handler = server
    handler.answers["/ready"] = [(503, {"status": "loading"})]
    failed = {"error": {"message": "the engine failed to start: out of memory"}}
    handler.answers["/health"] = [(500, failed)]
    with pytest.raises(NotReadyError, match="not healthy: the engine failed to start"):
        wait_until_ready(url, timeout_s=30, poll_s=0.05)


def test_the_timeout_names_the_last_answer(server) -> None:
    url, handler = server
    handler.answers["/ready"] = [(503, {"status": "loading weights"})]
    handler.answers["/health"] = [(200, {"status": "ok"})]
    with pytest.raises(NotReadyError, match=r"not ready after 0.3s \(last: loading weights\)"):
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
