"""Live key changes on a real server (Ray Serve + vLLM, demo model): published through the
`keys` verb that `up` and `llamacluster keys` run on the head, applied without a redeploy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import httpx
import pytest

from cluster import keys as k
from cluster.remote import parse_reply
from cluster.stages.serve import keys_call
from tests.support.server import ApiServer, seconds_until_status

pytestmark = [pytest.mark.engine, pytest.mark.timeout(900)]


def publish(api_server: ApiServer, cluster, path) -> dict:
    """``python -m serve.remote keys`` for the key file at ``path``, as the head runs it."""
    call = keys_call(sys.executable, api_server.ray_address, str(path), api_server.app_name)
    proc = subprocess.run(
        call.argv,
        input=call.stdin,
        env={**os.environ, **cluster.env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    reply = parse_reply(proc.stdout)
    assert proc.returncode == 0 and reply and reply["ok"], proc.stderr[-2000:]
    return reply


def read_stream(
    api_server: ApiServer,
    arrivals: list[float],
    events: list[bytes],
    resume: threading.Event,
) -> None:
    """Stream a 1900-token completion with the server's own key; note each event's arrival.

    After the first event the reader stops reading until ``resume`` is set: the response stays
    open on the server (its writes wait on the client) for however long the revoke takes, on
    a fast machine as on a slow one.
    """
    body = {
        "model": api_server.model,
        "prompt": "hello",
        "max_tokens": 1900,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with httpx.stream(
        "POST",
        f"{api_server.base_url}/completions",
        json=body,
        headers=api_server.auth,
        timeout=300,
    ) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(line.encode())
                arrivals.append(time.monotonic())
                if len(events) == 1 and not resume.wait(120):
                    return


def wait_for_status(api_server: ApiServer, key: str, status: int, *, limit_s: float) -> float:
    """Seconds until GET /v1/models with ``key`` answers ``status``."""
    return seconds_until_status(api_server.base_url, key, status, limit_s=limit_s)


def test_a_revoked_key_gets_401_within_seconds_while_a_stream_runs_on(
    api_server: ApiServer, ray_cluster_1node, tmp_path
) -> None:
    path = tmp_path / "api_key"
    path.write_text(api_server.api_key + "\n")
    path.chmod(0o600)
    extra = k.add_key(path, "extra").secret
    try:
        idle_start = time.monotonic()
        assert publish(api_server, ray_cluster_1node, path) == {
            "ok": True,
            "keys": 2,
            "changed": True,
        }
        idle_publish_s = time.monotonic() - idle_start
        added_s = wait_for_status(api_server, extra, 200, limit_s=10)
        assert publish(api_server, ray_cluster_1node, path)["changed"] is False

        # A long stream with the key that stays, read in a thread that notes when each event
        # arrives and holds after the first until the revoke has been applied.
        arrivals: list[float] = []
        events: list[bytes] = []
        resume = threading.Event()
        reader = threading.Thread(target=read_stream, args=(api_server, arrivals, events, resume))
        reader.start()
        deadline = time.monotonic() + 60
        while not arrivals:
            assert time.monotonic() < deadline and reader.is_alive(), "the stream did not start"
            time.sleep(0.01)

        edit_at = time.monotonic()
        k.revoke_key(path, "extra")
        revoke_at = time.monotonic()
        assert publish(api_server, ray_cluster_1node, path)["changed"] is True
        published_at = time.monotonic()
        refused_s = wait_for_status(api_server, extra, 401, limit_s=10)
        refused_at = time.monotonic()
        # The key that stays is accepted on the first request after the revoke (no timing
        # bound: the stream shares the two cores with this request).
        kept = httpx.get(f"{api_server.base_url}/models", headers=api_server.auth, timeout=60)
        assert kept.status_code == 200, kept.text
        # The stream opened before the revoke and is still open: only its first event is read.
        assert len(arrivals) == 1 and arrivals[0] < edit_at and reader.is_alive()
        resume.set()

        reader.join(300)
        assert not reader.is_alive()
        print(
            f"\nrevoke_key took {revoke_at - edit_at:.2f}s; publish took {idle_publish_s:.2f}s "
            f"idle, {published_at - revoke_at:.2f}s while streaming; key accepted "
            f"{added_s:.2f}s after the publish; revoked key refused {refused_at - revoke_at:.2f}s "
            f"after the file edit ({refused_s:.2f}s after the publish returned); the rest of the "
            f"stream arrived over {arrivals[-1] - refused_at:.2f}s after the refusal"
        )
        # The stream that was open across the revoke ends whole, with the key that stayed.
        assert events[-1] == b"data: [DONE]"
        assert json.loads(events[-2][6:])["usage"]["completion_tokens"] == 1900
        assert arrivals[-1] > refused_at
    finally:
        # The shared server keeps exactly its own key for the other tests.
        path.write_text(api_server.api_key + "\n")
        k.meta_path(path).unlink(missing_ok=True)
        publish(api_server, ray_cluster_1node, path)
    assert wait_for_status(api_server, extra, 401, limit_s=10) >= 0
