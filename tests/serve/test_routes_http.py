"""The endpoint's HTTP server and media fetching: Ray Serve's own direct-ingress server with the
replica's limits (header-read timeout, connection cap) against slow sockets, and vLLM's own
media connector with the server's media settings against a loopback media host."""

from __future__ import annotations

import asyncio
import io
import json
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from serve import vllm_glue
from serve.api import Gateway, LimitedHTTPProtocol, ServerState, install_http_limits
from serve.app import replica_env
from serve.config import ServeConfig
from tests.support.server import free_port

pytestmark = pytest.mark.anyio

KEY = "sk-user-key"


async def test_slow_sockets_are_dropped_and_new_clients_served(monkeypatch) -> None:
    from ray.serve._private.http_util import start_asgi_http_server
    from ray.serve.config import HTTPOptions
    from uvicorn.config import HTTP_PROTOCOLS

    monkeypatch.setitem(HTTP_PROTOCOLS, "auto", HTTP_PROTOCOLS["auto"])
    monkeypatch.setattr(LimitedHTTPProtocol, "header_timeout_s", 30.0)
    monkeypatch.setattr(LimitedHTTPProtocol, "max_connections", 2048)
    install_http_limits(header_timeout_s=1.0, max_connections=24)

    inner = Starlette(routes=[Route("/v1/models", lambda r: JSONResponse({"data": []}))])
    gateway = Gateway(ServerState(app=inner, last_probe_ok=time.monotonic()), api_keys=[KEY])
    port = free_port()
    options = HTTPOptions(host="127.0.0.1", port=port, keep_alive_timeout_s=5)
    loop = asyncio.get_running_loop()
    task, server = await start_asgi_http_server(gateway, options, event_loop=loop)
    url = f"http://127.0.0.1:{port}"
    held: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        while not server.started:
            await asyncio.sleep(0.01)
        # Twenty clients that never finish their request head.
        for _ in range(20):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /v1/models HTTP/1.1\r\nHost: t\r\nX-Slow: ")
            held.append((reader, writer))
        async with httpx.AsyncClient(headers={"Authorization": f"Bearer {KEY}"}) as c:
            started = time.monotonic()
            assert (await c.get(f"{url}/v1/models")).status_code == 200
            assert time.monotonic() - started < 0.5  # served at once, beside the slow ones
            # Past the connection cap: a 503 in OpenAI's shape, then the server hangs up.
            extra = [await asyncio.open_connection("127.0.0.1", port) for _ in range(6)]
            answer = await asyncio.wait_for(extra[-1][0].read(), 5)
            head, _, body = answer.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 503"), answer
            assert json.loads(body)["error"]["code"] == 503
            held += extra
            # The header-read timeout closes every slow socket (EOF), none waits forever.
            dropped_at = time.monotonic()
            for reader, _ in held:
                assert await asyncio.wait_for(reader.read(), 5) in (b"", answer)
            assert time.monotonic() - dropped_at < 3
            # A kept-alive connection must send its next request head in time too.
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(
                f"GET /v1/models HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {KEY}\r\n\r\n".encode()
            )
            first = await asyncio.wait_for(reader.readuntil(b'{"data":[]}'), 5)
            assert first.startswith(b"HTTP/1.1 200")
            writer.write(b"GET /v1/models HTTP/1.1\r\n")
            assert await asyncio.wait_for(reader.read(), 5) == b""
            held.append((reader, writer))
            # And the server still answers new clients.
            assert (await c.get(f"{url}/v1/models")).status_code == 200
    finally:
        for _, writer in held:
            writer.close()
        server.should_exit = True
        await asyncio.wait_for(task, 10)


# --- media URLs through vLLM's own connector --------------------------------------------------


def png_bytes() -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (4, 4), "red").save(out, format="PNG")
    return out.getvalue()


class MediaHost:
    """A loopback host serving /img.png and /moved (a 302 to /img.png); counts every GET."""

    def __init__(self) -> None:
        hits: Counter[str] = Counter()
        image = png_bytes()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                hits[self.path] += 1
                if self.path == "/moved":
                    self.send_response(302)
                    self.send_header("Location", "/img.png")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(image)))
                self.end_headers()
                self.wfile.write(image)

            def log_message(self, *args) -> None:
                pass

        self.hits = hits
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def media_connector(config: ServeConfig, monkeypatch):
    """vLLM's MediaConnector as the server's engine arguments and replica env set it up."""
    from vllm.multimodal.media.connector import MediaConnector

    for name, value in replica_env(config).items():
        if name.startswith("VLLM_MEDIA"):
            monkeypatch.setenv(name, value)
    args = vllm_glue.parse_vllm_args(config)
    return MediaConnector(allowed_media_domains=args.allowed_media_domains)


def test_vllm_refuses_media_urls_by_default_and_never_follows_redirects(
    demo_model_dir: Path, monkeypatch
) -> None:
    from vllm.multimodal.media.image import ImageMediaIO

    host = MediaHost()
    try:
        default = ServeConfig(model=str(demo_model_dir), no_auth=True, device="cpu")
        connector = media_connector(default, monkeypatch)
        with pytest.raises(ValueError, match="allowed domains"):
            connector.load_from_url(f"{host.url}/img.png", ImageMediaIO())
        assert sum(host.hits.values()) == 0  # refused before any fetch

        allowed = default.model_copy(update={"allowed_media_domains": ["127.0.0.1"]})
        connector = media_connector(allowed, monkeypatch)
        assert connector.load_from_url(f"{host.url}/img.png", ImageMediaIO()).size == (4, 4)
        with pytest.raises(Exception):  # noqa: B017 - the 302 is an answer, not an image
            connector.load_from_url(f"{host.url}/moved", ImageMediaIO())
        assert host.hits == Counter({"/img.png": 1, "/moved": 1})  # the redirect not followed
    finally:
        host.close()
