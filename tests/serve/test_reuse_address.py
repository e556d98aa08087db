"""A replica killed with client connections open leaves them in TIME_WAIT on the endpoint port:
Serve's own direct-ingress listener cannot bind the port again for a minute, ours can at once.
Real Serve server start (uvicorn) in child processes, a real SIGKILL, real TCP."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import pytest

from tests.support.server import free_port

# A child process starting Serve's direct-ingress HTTP server the way a replica does, with or
# without our listener option; prints {"listening": true} or the bind error, then serves.
SERVER = r"""
import asyncio, json, sys
from ray.serve._private import replica
from ray.serve.config import HTTPOptions
from serve.reuse_address import listen_with_reuse_address

async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})

async def main():
    if sys.argv[2] == "ours":
        assert listen_with_reuse_address() and listen_with_reuse_address()
    try:
        task, _ = await replica.start_asgi_http_server(
            app, HTTPOptions(host="127.0.0.1", port=int(sys.argv[1])),
            event_loop=asyncio.get_running_loop(), enable_so_reuseport=False)
    except RuntimeError as exc:
        print(json.dumps({"error": repr(exc.__cause__)}), flush=True)
        return
    await asyncio.sleep(0.5)
    print(json.dumps({"listening": True}), flush=True)
    await task

asyncio.run(main())
"""


def _start(port: int, kind: str) -> tuple[subprocess.Popen, dict]:
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVER, str(port), kind],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline()
    if not line:
        proc.kill()
        raise AssertionError(f"server child said nothing: {proc.stderr.read()[-3000:]}")
    return proc, json.loads(line)


def _kill_with_open_connections(proc: subprocess.Popen, port: int) -> None:
    """Two keep-alive clients with an answered request each, then SIGKILL of the server: its
    side closes first, so those connections sit in TIME_WAIT on ``port``."""
    clients = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(2)]
    for c in clients:
        c.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert c.recv(1024).startswith(b"HTTP/1.1 200")
    proc.kill()
    proc.wait(timeout=30)
    for c in clients:
        c.recv(1024)  # EOF from the dead server
        c.close()
    time.sleep(0.2)


@pytest.mark.parametrize("kind", ["ours", "serve_default"])
def test_a_replacement_listener_binds_at_once_after_a_replica_was_killed(kind: str) -> None:
    port = free_port()
    first, said = _start(port, kind)
    try:
        assert said == {"listening": True}, said
        _kill_with_open_connections(first, port)
        states = subprocess.run(
            ["ss", "-Htan", "state", "time-wait", f"sport = :{port}"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout
        assert states.strip(), "the killed server left no TIME_WAIT connection to test with"
        second, said = _start(port, kind)
        try:
            if kind == "ours":
                assert said == {"listening": True}, said
            else:  # what a replacement replica met before: the port refused for 60 s
                assert "Address already in use" in said.get("error", ""), said
        finally:
            second.kill()
            second.wait(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait(timeout=30)
