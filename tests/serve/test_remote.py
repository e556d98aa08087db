"""serve.remote run as the head runs it: `python -m serve.remote VERB`, a JSON request on stdin."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time

import pytest

from cluster.errors import RemoteError
from cluster.remote import RemoteCall
from cluster.runner import LocalRunner
from serve.remote import MODULE, PortFreeRequest, ReadyRequest
from tests.support.status_server import status_server


def run_verb(verb: str, request: object, *, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run one verb in a child process; ``request`` is sent as JSON (a str as it is)."""
    stdin = request if isinstance(request, str) else json.dumps(request)
    return subprocess.run(
        [sys.executable, "-m", MODULE, verb],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def reply_of(proc: subprocess.CompletedProcess) -> dict:
    """The contract: the last stdout line is one JSON object."""
    lines = proc.stdout.strip().splitlines()
    assert lines, f"no stdout (stderr: {proc.stderr!r})"
    reply = json.loads(lines[-1])
    assert isinstance(reply, dict)
    return reply


def failure_line(proc: subprocess.CompletedProcess) -> str:
    """A failure: exactly one non-empty line on stderr, the same as the reply's error."""
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert reply_of(proc) == {**reply_of(proc), "ok": False, "error": lines[0]}
    return lines[0]


# ------------------------------------------------------------------------- the request


@pytest.mark.parametrize(
    ("verb", "stdin", "expected"),
    [
        ("ready", "{not json", "bad ready request: Invalid JSON"),
        ("ready", "", "bad ready request: no JSON on stdin"),
        ("ready", "[1, 2]", "bad ready request: Input should be an object"),
        (
            "deploy",
            '{"ray_address": "10.0.0.1:6379"}',
            "bad deploy request: config: Field required",
        ),
        ("stop", '{"app_name": "x"}', "bad stop request: ray_address: Field required"),
        ("wait", '{"url": "http://127.0.0.1:1"}', "bad wait request: timeout_s: Field required"),
        (
            "port-free",
            '{"port": 8000, "wait_s": 1, "extra": 1}',
            "bad port-free request: extra: Extra inputs are not permitted",
        ),
        (
            "port-free",
            '{"port": 70000, "wait_s": -1}',
            "bad port-free request: port: Input should be less than or equal to 65535; "
            "wait_s: Input should be greater than or equal to 0",
        ),
        (
            "deploy",
            '{"ray_address": "no-port", "config": {}}',
            "bad deploy request: ray_address: String should match pattern",
        ),
        ("ready", '{"url": "127.0.0.1:8000"}', "bad ready request: url: String should match"),
    ],
)
def test_a_bad_request_exits_2_with_one_line_naming_the_field(verb, stdin, expected):
    proc = run_verb(verb, stdin)
    assert proc.returncode == 2
    assert failure_line(proc).startswith(expected)


@pytest.mark.parametrize("argv", [[], ["launch"], ["ready", "extra"]])
def test_an_unknown_verb_exits_2_with_the_usage(argv):
    proc = subprocess.run(
        [sys.executable, "-m", MODULE, *argv], input="{}", capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert failure_line(proc) == (
        "usage: python -m serve.remote deploy|stop|wait|ready|health|port-free|keys "
        "(one JSON request on stdin)"
    )


# ----------------------------------------------------------------------------- port-free


def test_port_free_succeeds_at_once_on_a_free_port():
    with socket.create_server(("127.0.0.1", 0)) as s:
        port = s.getsockname()[1]
    proc = run_verb("port-free", {"port": port, "wait_s": 0})
    assert proc.returncode == 0, proc.stderr
    assert reply_of(proc) == {"ok": True, "port": port}
    assert proc.stderr == ""


def test_port_free_fails_after_the_wait_while_a_listener_holds_the_port():
    with socket.create_server(("", 0)) as held:
        port = held.getsockname()[1]
        start = time.monotonic()
        proc = run_verb("port-free", {"port": port, "wait_s": 1.0})
        took = time.monotonic() - start
        assert proc.returncode == 1
        line = failure_line(proc)
        assert line.startswith(f"port {port} is still taken after 1 s")
        assert reply_of(proc)["port"] == port
        assert took >= 1.0  # it waited before giving up
        # The listener is untouched: a client still connects to it.
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


def test_port_free_returns_once_the_listener_lets_go():
    held = socket.create_server(("", 0))
    port = held.getsockname()[1]
    timer = threading.Timer(1.5, held.close)
    timer.start()
    try:
        start = time.monotonic()
        proc = run_verb("port-free", {"port": port, "wait_s": 30})
        took = time.monotonic() - start
    finally:
        timer.cancel()
        held.close()
    assert proc.returncode == 0, proc.stderr
    assert reply_of(proc) == {"ok": True, "port": port}
    assert 1.0 <= took < 20  # waited for the release, not for the 30 s deadline
    socket.create_server(("", port)).close()  # and the port is indeed free


# --------------------------------------------------------------------------------- ready


def test_ready_is_ok_when_ready_answers_200():
    with status_server({"/ready": (200, {"status": "ready"})}) as (url, seen):
        proc = run_verb("ready", {"url": url})
    assert proc.returncode == 0, proc.stderr
    assert reply_of(proc) == {"ok": True, "status": 200}
    assert seen == ["/ready"]


def test_ready_is_not_ok_when_ready_answers_503():
    with status_server({"/ready": (503, {"status": "loading"})}) as (url, seen):
        proc = run_verb("ready", {"url": url + "/"})  # a trailing slash is not doubled
    assert proc.returncode == 1
    assert failure_line(proc) == f"{url}/ready answered HTTP 503"
    assert reply_of(proc)["status"] == 503
    assert seen == ["/ready"]


def test_ready_is_not_ok_when_nothing_listens():
    with socket.create_server(("127.0.0.1", 0)) as s:
        port = s.getsockname()[1]
    proc = run_verb("ready", {"url": f"http://127.0.0.1:{port}", "timeout_s": 2})
    assert proc.returncode == 1
    assert failure_line(proc).startswith(f"http://127.0.0.1:{port}/ready did not answer: URLError")
    assert reply_of(proc)["status"] is None


def test_the_controller_calls_ready_through_a_runner_and_reads_the_reply():
    runner = LocalRunner()
    with status_server({"/ready": (200, {})}) as (url, _):
        call = RemoteCall(sys.executable, MODULE, "ready", ReadyRequest(url=url))
        reply = call.run(runner.run, timeout=60)
    assert reply.ok and reply.value(what="probe") == {"ok": True, "status": 200}
    assert reply.result.command == f"{sys.executable} -m serve.remote ready"
    with status_server({"/ready": (503, {})}) as (url, _):
        reply = RemoteCall(sys.executable, MODULE, "ready", ReadyRequest(url=url)).run(
            runner.run, timeout=60
        )
    assert not reply.ok and reply.result.returncode == 1
    assert reply.error == f"{url}/ready answered HTTP 503"
    with pytest.raises(RemoteError, match=r"probe failed on 127\.0\.0\.1: .*answered HTTP 503"):
        reply.value(what="probe")


def test_a_remote_call_shows_its_command_and_request_for_a_dry_run():
    call = RemoteCall("/env/bin/python", MODULE, "port-free", PortFreeRequest(port=8000, wait_s=2))
    assert call.argv == ["/env/bin/python", "-m", "serve.remote", "port-free"]
    assert json.loads(call.stdin) == {"port": 8000, "wait_s": 2.0}
    assert call.display("note") == (
        '/env/bin/python -m serve.remote port-free   # note; stdin: {"port":8000,"wait_s":2.0}'
    )


# ---------------------------------------------------------------------------------- wait


def test_wait_returns_once_ready_answers_200():
    with status_server({"/ready": (200, {"status": "ready"})}) as (url, _):
        proc = run_verb("wait", {"url": url, "timeout_s": 30})
    assert proc.returncode == 0, proc.stderr
    assert reply_of(proc) == {"ok": True, "url": url}


def test_wait_fails_early_with_the_health_checks_reason():
    unhealthy = {"error": {"message": "engine failed to start"}}
    routes = {"/ready": (503, unhealthy), "/health": (503, unhealthy)}
    with status_server(routes) as (url, seen):
        proc = run_verb("wait", {"url": url, "timeout_s": 60})
    assert proc.returncode == 1
    assert failure_line(proc).startswith(f"server at {url} is not healthy: engine failed to start")
    assert seen == ["/ready", "/health"]


def test_wait_gives_up_at_its_timeout_while_loading():
    routes = {"/ready": (503, {"status": "loading"}), "/health": (200, {})}
    with status_server(routes) as (url, seen):
        proc = run_verb("wait", {"url": url, "timeout_s": 1.5})
    assert proc.returncode == 1
    assert failure_line(proc).startswith(f"server at {url} not ready after 1.5s (last: loading)")
    assert seen.count("/ready") >= 2  # it polled
