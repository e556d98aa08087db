"""Waiting for a server to answer /ready: HTTP only, so a process that only waits (`up`'s ready
check on the head, `serve.remote wait`) starts at once and does not import Ray or vLLM."""

from __future__ import annotations

import time
from typing import Any

from cluster.errors import NotReadyError
from serve.config import MODEL_ROUTE_ROOT


def wait_until_ready(
    url: str,
    *,
    timeout_s: float = 600.0,
    poll_s: float = 1.0,
    api_key: str | None = None,
    ca_file: str | None = None,
) -> None:
    """Poll GET {url}/ready until 200; fail early when the engine failed to start.

    With ``api_key`` the failure says why (the probes tell reasons to key holders only);
    ``ca_file`` is a certificate to trust over HTTPS (the server's own, self-signed).
    """
    import ssl

    import httpx

    verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=ca_file) if ca_file else True
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    deadline = time.monotonic() + timeout_s
    last = "no answer yet"
    while time.monotonic() < deadline:
        try:
            ready = httpx.get(f"{url}/ready", timeout=5.0, headers=headers, verify=verify)
            if ready.status_code == 200:
                return
            last = _reason(ready)
            health = httpx.get(f"{url}/health", timeout=5.0, headers=headers, verify=verify)
            if health.status_code == 404 and MODEL_ROUTE_ROOT + "/" in url:
                # Another model's route before HAProxy knows its app (the first app answers
                # 404 for a path it does not have): not there yet.
                last = "not routed yet"
            elif health.status_code != 200 and not _restarting(health):
                raise NotReadyError(
                    f"server at {url} is not healthy: {_reason(health)}",
                    hint="see the replica log in the Ray dashboard (Serve view) or "
                    "`ray logs` on the head",
                )
        except httpx.HTTPError as exc:
            last = f"{type(exc).__name__}: {exc}"
        time.sleep(poll_s)
    raise NotReadyError(
        f"server at {url} not ready after {timeout_s:g}s (last: {last})",
        hint="check the replica log in the Ray dashboard (Serve view); a large model may "
        "need a longer --ready-timeout",
    )


def _restarting(response: Any) -> bool:
    """Does /health say the engine is being restarted, or HAProxy that no replica is up yet
    (so waiting makes sense)?"""
    from serve.haproxy_hooks import NO_REPLICA_MESSAGE

    try:
        body = response.json()
        message = str((body.get("error") or {}).get("message", ""))
        return body.get("status") == "restarting" or message.startswith(NO_REPLICA_MESSAGE)
    except (ValueError, AttributeError):
        return False


def _reason(response: Any) -> str:
    try:
        body = response.json()
        return body.get("error", {}).get("message") or body.get("status") or response.text
    except ValueError:
        return f"HTTP {response.status_code}"
