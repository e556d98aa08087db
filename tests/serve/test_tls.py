"""HTTPS on the endpoint: the self-signed certificate, the key checks, and Ray Serve's own
direct-ingress server started with the options the deploy passes, reached by the openai client,
`llamacluster chat` and `llamacluster bench` trusting the certificate file."""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from cluster.errors import ConfigError
from cluster.stages.config import UpConfig
from cluster.tls import check_tls_pair, fingerprint_sha256, self_signed
from serve.api import Gateway, ServerState
from serve.config import ServeConfig
from tests.support.server import free_port
from tests.support.stream_server import StreamBehaviour, StreamServer, build_app

KEY = "sk-tls-test-key"


@pytest.fixture
def cert_pair(tmp_path: Path) -> tuple[Path, Path]:
    cert, key = tmp_path / "tls" / "api.crt", tmp_path / "tls" / "api.key"
    assert self_signed(["127.0.0.1", "localhost"], cert_path=cert, key_path=key)
    return cert, key


def test_self_signed_certificate_key_mode_fingerprint_and_reuse(
    cert_pair: tuple[Path, Path], tmp_path: Path
) -> None:
    cert, key = cert_pair
    assert key.stat().st_mode & 0o777 == 0o600
    check_tls_pair(cert, key)
    openssl = subprocess.run(
        ["openssl", "x509", "-in", str(cert), "-noout", "-fingerprint", "-sha256", "-ext",
         "subjectAltName"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert openssl.stdout.splitlines()[0].split("=", 1)[1] == fingerprint_sha256(cert)
    assert "IP Address:127.0.0.1" in openssl.stdout and "DNS:localhost" in openssl.stdout
    # A rerun keeps the certificate (no redeploy); a new address makes a new one.
    before = cert.read_bytes()
    assert not self_signed(["localhost"], cert_path=cert, key_path=key)
    assert cert.read_bytes() == before
    assert self_signed(["10.1.2.3", "localhost"], cert_path=cert, key_path=key)
    assert "IP Address:10.1.2.3" in subprocess.run(
        ["openssl", "x509", "-in", str(cert), "-noout", "-ext", "subjectAltName"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert not list(cert.parent.glob(".*.tmp"))


def test_bad_tls_files_are_refused_in_one_line(
    cert_pair: tuple[Path, Path], tmp_path: Path
) -> None:
    cert, key = cert_pair
    key.chmod(0o644)
    with pytest.raises(ConfigError, match="readable by others") as refused:
        ServeConfig(model="m", no_auth=True, tls_certfile=cert, tls_keyfile=key)
    assert refused.value.one_line().endswith(f"(chmod 600 {key})")
    key.chmod(0o600)
    other_cert, other_key = tmp_path / "o.crt", tmp_path / "o.key"
    self_signed(["127.0.0.1"], cert_path=other_cert, key_path=other_key)
    with pytest.raises(ConfigError, match="do not load together"):
        UpConfig(local=True, tls_cert=cert, tls_key=other_key)
    with pytest.raises(ValueError, match="both"):
        ServeConfig(model="m", no_auth=True, tls_certfile=cert)
    with pytest.raises(ValueError, match="pick one"):
        UpConfig(local=True, tls="self-signed", tls_cert=cert, tls_key=key)
    with pytest.raises(ValueError, match="not an IP address"):
        UpConfig(local=True, api_host="head.example")
    good = ServeConfig(model="m", no_auth=True, tls_certfile=cert, tls_keyfile=key)
    assert good.scheme == "https"
    assert UpConfig(local=True, api_host="0.0.0.0").api_on_all_interfaces


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(Path(sys.executable).parent / "llamacluster"), *args],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=120,
        check=False,
    )


@pytest.mark.anyio
async def test_direct_ingress_server_speaks_https_to_every_client(
    cert_pair: tuple[Path, Path], tmp_path: Path
) -> None:
    from ray.serve._private.http_util import start_asgi_http_server
    from ray.serve.config import HTTPOptions

    cert, key = cert_pair
    stream = StreamServer(behaviour=StreamBehaviour(ttft_ms=5, itl_ms=1, model="tiny-tls"))
    gateway = Gateway(
        ServerState(app=build_app(stream), last_probe_ok=time.monotonic()), api_keys=[KEY]
    )
    port = free_port()
    # What serve.app.deploy hands Serve; the replica's server takes it with its own port.
    options = HTTPOptions(host="127.0.0.1", port=port, ssl_certfile=str(cert), ssl_keyfile=str(key))
    task, server = await start_asgi_http_server(
        gateway, options, event_loop=asyncio.get_running_loop()
    )
    base = f"https://127.0.0.1:{port}/v1"
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    key_file.chmod(0o600)
    try:
        while not server.started:
            await asyncio.sleep(0.01)

        def openai_calls() -> tuple[list[str], str]:
            trusted = openai.OpenAI(
                base_url=base,
                api_key=KEY,
                http_client=httpx.Client(verify=ssl.create_default_context(cafile=str(cert))),
            )
            with trusted:
                models = [m.id for m in trusted.models.list()]
            with openai.OpenAI(base_url=base, api_key=KEY, max_retries=0) as untrusted:
                try:
                    untrusted.models.list()
                    refused = ""
                except openai.APIConnectionError as exc:
                    refused = repr(exc.__cause__)
            return models, refused

        models, refused = await asyncio.to_thread(openai_calls)
        assert models == ["tiny-tls"]
        assert "CERTIFICATE_VERIFY_FAILED" in refused
        # Plain HTTP to the HTTPS port gets no answer.
        with pytest.raises(httpx.HTTPError):
            await asyncio.to_thread(httpx.get, f"http://127.0.0.1:{port}/v1/models", timeout=5)

        trust = {"SSL_CERT_FILE": str(cert)}
        chat = await asyncio.to_thread(
            _cli, "chat", "--base-url", base, "--api-key-file", str(key_file), "--prompt", "hi",
            "--max-tokens", "4", "--no-stats", env=trust,
        )  # fmt: skip
        assert chat.returncode == 0, chat.stderr
        assert chat.stdout.strip()
        out = tmp_path / "bench"
        bench = await asyncio.to_thread(
            _cli, "bench", "--base-url", base, "--api-key-file", str(key_file), "-n", "3",
            "--input-len", "8", "--output-len", "8", "-o", str(out), env=trust,
        )  # fmt: skip
        assert bench.returncode == 0, bench.stderr + bench.stdout
        (point,) = json.loads(next(out.rglob("*.json")).read_text())["points"]
        assert point["completed"] == 3 and point["failed"] == 0
        assert len(stream.received) >= 4  # the chat and the bench reached the server
        # Without the certificate the CLI fails in one line, naming the endpoint.
        refused_chat = await asyncio.to_thread(
            _cli, "chat", "--base-url", base, "--api-key-file", str(key_file), "--prompt", "hi",
            env={"SSL_CERT_FILE": ""},
        )  # fmt: skip
        assert refused_chat.returncode != 0
        assert "Traceback" not in refused_chat.stderr
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)
