"""`up --local --tls self-signed` end to end: the real Serve deployment answers over HTTPS only,
with the printed certificate and fingerprint, to the openai client and `llamacluster chat`."""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest

from cluster.tls import fingerprint_sha256
from tests.cluster.test_up_e2e import _bring_down_and_check, _ok, _state, llamacluster

pytestmark = pytest.mark.e2e


@pytest.mark.timeout(1200)
def test_up_local_with_a_self_signed_certificate(tmp_path, demo_model_dir) -> None:
    home = tmp_path / "home"
    env = {**os.environ, "LLAMACLUSTER_HOME": str(home), "VLLM_CPU_KVCACHE_SPACE": "1"}
    args = ["--local", "--model", str(demo_model_dir), "--tp", "1", "--pp", "1"]
    args += ["--ray-port", "0", "--dashboard-port", "0", "--api-port", "0"]
    args += ["--cpu-kvcache-gb", "1", "--skip", "monitor", "--tls", "self-signed"]
    args += ["--skip", "measure"]  # the CPU and link measurement: not what this test checks
    try:
        up = _ok(llamacluster("up", *args, env=env))
        state = _state(home, "local")
        endpoint = state["server"]["endpoint"]
        # The API binds the head's private address (preflight's first non-loopback one for
        # --local), and only it: 127.0.0.1 does not answer.
        private = state["nodes"][0]["private_ip"]
        port = state["ports"]["api"]
        assert endpoint == f"https://{private}:{port}", endpoint
        if private != "127.0.0.1":
            with pytest.raises(httpx.ConnectError):
                httpx.get(f"https://127.0.0.1:{port}/health", verify=False, timeout=10)
        cert = home / "clusters" / "local" / "tls" / "api.crt"
        assert f"TLS cert: {cert}" in up, up
        assert f"SHA-256:  {fingerprint_sha256(cert)}" in up, up
        assert (home / "clusters" / "local" / "tls" / "api.key").stat().st_mode & 0o777 == 0o600
        key = Path(state["secrets"]["api_key_file"]).read_text().strip()
        verify = ssl.create_default_context(cafile=str(cert))
        with openai.OpenAI(
            base_url=endpoint + "/v1", api_key=key, http_client=httpx.Client(verify=verify)
        ) as client:
            stream = client.chat.completions.create(
                model=state["server"]["served_name"],
                messages=[{"role": "user", "content": "Hello"}],
                max_tokens=8,
                stream=True,
            )
            assert len([c for c in stream if c.choices]) >= 2
        # Plain HTTP on the same port gets no answer.
        with pytest.raises(httpx.HTTPError):
            httpx.get(endpoint.replace("https://", "http://") + "/v1/models", timeout=10)
        chat = subprocess.run(
            [sys.executable, "-c", "from cluster.cli.app import run; run()", "chat", "--name", "local",
             "--prompt", "Hi", "--max-tokens", "4", "--no-stats"],
            env={**env, "SSL_CERT_FILE": str(cert)}, capture_output=True, text=True, timeout=300,
            check=False,
        )  # fmt: skip
        assert chat.returncode == 0, chat.stderr
        again = _ok(llamacluster("up", *args, env=env))
        assert "nothing changed" in again, again  # the certificate is kept: no redeploy
        status = _ok(llamacluster("status", "--local", env=env, timeout=300))
        assert "ready" in status and f"api {endpoint}" in status, status
        # The exposure probe connects to the private address: the API answers there.
        if private != "127.0.0.1":
            assert f"OPEN head {private}:{port} (api)" in status, status
        tunnel = _ok(llamacluster("tunnel", "--local", env=env))
        assert f"API {endpoint}/v1" in tunnel, tunnel
    finally:
        if (home / "clusters" / "local" / "state.json").exists():
            _bring_down_and_check(home, "local", env)
