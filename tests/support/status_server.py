"""A loopback HTTP server answering fixed statuses and JSON bodies per path (for /ready probes)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@contextmanager
def status_server(
    routes: Mapping[str, tuple[int, Any] | list[tuple[int, Any]]],
) -> Iterator[tuple[str, list[str]]]:
    """Serve ``routes`` (path -> (status, JSON body), or a list of them answered in turn, the
    last one from then on) on 127.0.0.1; any other path is a 404. Yields the base URL and the
    list of paths requested so far (in order)."""
    seen: list[str] = []
    turns = {path: list(a) for path, a in routes.items() if isinstance(a, list)}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.path)
            if self.path in turns:
                queue = turns[self.path]
                status, body = queue.pop(0) if len(queue) > 1 else queue[0]
            else:
                answer = routes.get(self.path, (404, {"error": {"message": "no such path"}}))
                status, body = answer
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: object) -> None:  # quiet
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
