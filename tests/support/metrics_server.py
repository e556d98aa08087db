"""A loopback HTTP server with a Prometheus text `/metrics`, optionally behind a bearer token:
a stand-in for the llamacluster server (its key) or a Ray node's metrics port (no key)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class MetricsServer:
    """Where it listens, and what it saw: every Authorization header and the status answered."""

    host: str
    port: int
    seen: list[tuple[str | None, int]] = field(default_factory=list)
    #: Seconds each answer waits before it is sent (a server saturated by its load); settable.
    delay_s: float = 0.0

    @property
    def target(self) -> str:
        """``host:port`` as a Prometheus target."""
        return f"{self.host}:{self.port}"


@contextmanager
def metrics_server(text: str, *, token: str | None = None) -> Iterator[MetricsServer]:
    """Serve ``text`` at /metrics on 127.0.0.1 (a free port); with ``token``, only to requests
    carrying ``Authorization: Bearer <token>`` (else 401). Anything else is a 404."""
    body = text.encode()
    server_box: list[MetricsServer] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            auth = self.headers.get("Authorization")
            if self.path.split("?")[0] != "/metrics":
                status, data = 404, b"not found\n"
            elif token is not None and auth != f"Bearer {token}":
                status, data = 401, b"unauthorized\n"
            else:
                status, data = 200, body
            server_box[0].seen.append((auth, status))
            time.sleep(server_box[0].delay_s)
            self.send_response(status)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: object) -> None:  # quiet
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server_box.append(MetricsServer("127.0.0.1", httpd.server_address[1]))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield server_box[0]
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)
