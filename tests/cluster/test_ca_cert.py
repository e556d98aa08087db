"""`chat` and `bench` trust an HTTPS endpoint's certificate given by `--ca-cert` (bench's Python
API by ``Endpoint.ca_cert``), and a recorded cluster's own certificate without the flag: a real
HTTPS server (uvicorn with a self-signed certificate) on loopback, the real CLI."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn

from cluster.bench.config import BenchConfig, Endpoint, LoadConfig, WorkloadConfig
from cluster.bench.runner import run_benchmark
from cluster.endpoint import client_ssl_context, resolve_target
from cluster.errors import ConfigError
from cluster.stages.serve import controller_tls_files
from cluster.state import ClusterState, ServerSection
from cluster.tls import self_signed
from tests.support.stream_server import StreamBehaviour, StreamServer, build_app

CLI = str(Path(sys.executable).parent / "llamacluster")


@pytest.fixture
def https_server(tmp_path: Path) -> Iterator[tuple[StreamServer, Path]]:
    """An OpenAI-shaped streaming server speaking HTTPS on 127.0.0.1 with a fresh self-signed
    certificate (as `up --tls self-signed` makes); yields it and the certificate file."""
    cert, key = tmp_path / "tls" / "api.crt", tmp_path / "tls" / "api.key"
    assert self_signed(["127.0.0.1", "localhost"], cert_path=cert, key_path=key)
    server = StreamServer(behaviour=StreamBehaviour(ttft_ms=5, itl_ms=1, model="tiny-tls"))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(
        build_app(server),
        loop="asyncio",
        http="h11",
        lifespan="off",
        log_level="critical",
        ssl_certfile=str(cert),
        ssl_keyfile=str(key),
    )
    uv = uvicorn.Server(config)
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not uv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "HTTPS server did not start"
        time.sleep(0.01)
    server.base_url = f"https://127.0.0.1:{sock.getsockname()[1]}/v1"
    try:
        yield server, cert
    finally:
        uv.should_exit = True
        thread.join(timeout=10)
        sock.close()


def _cli(*args: str, home: Path | None = None) -> subprocess.CompletedProcess[str]:
    # No SSL_CERT_FILE: only what the command is told to trust.
    env = {k: v for k, v in os.environ.items() if k not in ("SSL_CERT_FILE", "SSL_CERT_DIR")}
    env["OPENAI_API_KEY"] = "sk-test"
    if home is not None:
        env["LLAMACLUSTER_HOME"] = str(home)
    return subprocess.run(
        [CLI, *args], capture_output=True, text=True, env=env, timeout=120, check=False
    )


def test_chat_trusts_ca_cert_and_refuses_an_unknown_certificate_in_one_line(
    https_server: tuple[StreamServer, Path],
) -> None:
    server, cert = https_server
    args = ["chat", "--base-url", server.base_url, "--prompt", "hi", "--max-tokens", "4"]
    trusted = _cli(*args, "--no-stats", "--ca-cert", str(cert))
    assert trusted.returncode == 0, trusted.stderr
    assert trusted.stdout.strip()
    refused = _cli(*args)
    assert refused.returncode != 0
    assert "Traceback" not in refused.stderr
    assert len(refused.stderr.strip().splitlines()) <= 2, refused.stderr
    assert len(server.received) == 1  # the refused one never got past the handshake


def test_bench_cli_and_python_api_trust_ca_cert(
    https_server: tuple[StreamServer, Path], tmp_path: Path
) -> None:
    server, cert = https_server
    out = tmp_path / "bench"
    bench = _cli(
        "bench", "--base-url", server.base_url, "--ca-cert", str(cert), "-n", "3",
        "--input-len", "8", "--output-len", "8", "--no-plots", "--no-progress", "-o", str(out),
    )  # fmt: skip
    assert bench.returncode == 0, bench.stderr + bench.stdout
    (point,) = json.loads(next(out.rglob("*.json")).read_text())["points"]
    assert point["completed"] == 3 and point["failed"] == 0

    def config(ca: Path | None) -> BenchConfig:
        return BenchConfig(
            endpoints=[Endpoint(name="tls", base_url=server.base_url, ca_cert=ca)],
            workload=WorkloadConfig(input_len=8, output_len=8),
            load=LoadConfig(concurrency=[1], num_requests=2, timeout_s=30),
        )

    result = run_benchmark(config(cert))
    assert [p.completed for p in result.points] == [2]
    with pytest.raises(ConfigError, match=r"certificate verify failed|CERTIFICATE_VERIFY"):
        run_benchmark(config(None))  # untrusted: the probe of /v1/models fails in one line


def test_a_recorded_https_cluster_is_trusted_by_its_own_certificate(
    https_server: tuple[StreamServer, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server, cert = https_server
    home = tmp_path / "home"
    monkeypatch.setenv("LLAMACLUSTER_HOME", str(home))
    endpoint = server.base_url.removesuffix("/v1")
    state = ClusterState(
        name="tlsc", server=ServerSection(endpoint=endpoint, served_name="tiny-tls")
    )
    state.save()
    kept = controller_tls_files("tlsc")[0]
    kept.parent.mkdir(parents=True, exist_ok=True)
    kept.write_bytes(cert.read_bytes())  # where `up --tls` keeps the served certificate
    assert resolve_target(name="tlsc").ca_cert == kept
    chat = _cli("chat", "--name", "tlsc", "--prompt", "hi", "--max-tokens", "4", home=home)
    assert chat.returncode == 0, chat.stderr
    out = tmp_path / "bench"
    bench = _cli(
        "bench", "--name", "tlsc", "--no-net-counters", "-n", "2", "--input-len", "8",
        "--output-len", "8", "--no-plots", "--no-progress", "-o", str(out), home=home,
    )  # fmt: skip
    assert bench.returncode == 0, bench.stderr + bench.stdout
    # A plain-HTTP endpoint gets no certificate, even when the file is there.
    state.server.endpoint = "http://127.0.0.1:1"
    state.save()
    assert resolve_target(name="tlsc").ca_cert is None


def test_bad_ca_cert_files_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        client_ssl_context(tmp_path / "missing.crt")
    junk = tmp_path / "junk.crt"
    junk.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match="holds no PEM certificate"):
        resolve_target(base_url="https://h/v1", ca_cert=junk)
    done = _cli("bench", "--base-url", "https://127.0.0.1:1/v1", "--ca-cert", str(junk))
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert "holds no PEM certificate" in done.stderr
