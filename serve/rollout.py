"""Changing what a running app serves without stopping it: Ray Serve's rolling update, watched.

A new config whose *front* (what the Serve controller and HAProxy were started with: endpoint
and proxy ports, bind address, TLS files, the replica port range, the balancing policy) is the
same as the running one is deployed over the running app. Serve then replaces the replicas one
at a time: it stops an old replica (which drains), starts a new one, and stops the next old one
only when the new one runs. With several replicas a new replica runs only once its engine is
ready (serve/app.py), so the others serve meanwhile; with one, the endpoint answers 503 +
Retry-After while the new engine loads. A different front needs Serve restarted: the app is
stopped and deployed again (a downtime, said by `up`).

``serve.run`` returns once Serve reached the new target and raises when the new replicas fail
to start (``DEPLOY_FAILED``: Serve then keeps the old replicas that still run); ``up`` deploys
the previous config again (a rollback) when the update fails or never becomes ready.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from serve.config import ServeConfig


def front_of(config: ServeConfig) -> dict[str, Any]:
    """What the Serve controller (and its HAProxy) take only when Serve starts: the controller's
    environment and the HTTP options. Replicas and engines are not in it."""
    from serve.app import controller_env
    from serve.balancer import private_dir_path

    directory = str(private_dir_path(config.app_name, config.port)) if config.balanced else None
    return {
        "env": controller_env(config, directory),
        "host": config.host,
        "port": config.port,
        "proxy_port": config.proxy_port,
        "tls": [str(config.tls_certfile or ""), str(config.tls_keyfile or "")],
        "balanced": config.balanced,
    }


def front_digest(config: ServeConfig, *, tls_fingerprint: str | None = None) -> str:
    """A short hash of :func:`front_of` (and of the served certificate, ``tls_fingerprint``,
    where HAProxy holds it: it reads it only when it starts): equal digests mean a rolling
    update can apply."""
    front = front_of(config)
    if tls_fingerprint:
        front["tls_fingerprint"] = tls_fingerprint
    text = json.dumps(front, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def first_line(text: str, limit: int = 300) -> str:
    """The telling line of ``text`` (Serve's messages carry tracebacks), shortened: the last
    one naming an error (a traceback's exception line), else the first non-empty one."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    # A replica's start failure ends with the exception's own line: the most telling one.
    line = next((ln for ln in reversed(lines) if "Error" in ln), lines[0] if lines else "")
    return line if len(line) <= limit else line[: limit - 1] + "…"


def failure_reason(exc: BaseException, app_name: str | None = None) -> str:
    """Why Serve's deploy failed, in one line: the failing deployment's status message (a
    replica's start failure, traceback included) rather than the bare "failed to update"."""
    messages = [str(exc)]
    try:
        import ray
        from ray import serve

        # Only as a driver already joined (serve.status would start a local Ray otherwise).
        apps = serve.status().applications if ray.is_initialized() else {}
        for name, app in apps.items():
            if app_name is not None and name != app_name:
                continue
            messages += [d.message for d in app.deployments.values() if d.message]
    except Exception:  # the controller is away: Serve's own sentence is all there is
        pass
    # The most specific line: an exception's from a deployment's message, else Serve's sentence.
    for text in reversed(messages):
        line = first_line(text)
        if "Error" in line:
            return line
    return first_line(messages[0])
