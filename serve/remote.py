"""The server's programs that `up`, `down` and `status` run on the head with the shared env's python.

``python -m serve.remote VERB`` with one JSON request on stdin; one JSON object on the last
line of stdout; on failure a non-zero exit and the reason as one line on stderr (the contract:
cluster/remote.py, docs/CLUSTER.md "Remote programs").

========== ================= =============================================================
verb       request           reply (``"ok": true`` and ...)
========== ================= =============================================================
deploy     DeployRequest     ``url``, ``model``: the app deployed (detached) on the cluster
stop       StopRequest       ``stopped``: whether the app ran (exit 0 either way)
wait       WaitRequest       ``url``: /ready answered 200 within ``timeout_s``
ready      ReadyRequest      ``status``: /ready answers 200 now (else exit 1)
health     ReadyRequest      ``status``, ``health``: /health's JSON (engine state, restarts)
port-free  PortFreeRequest   ``port``: nothing holds it (else exit 1 after ``wait_s``)
keys       KeysRequest       ``keys``, ``changed``: the app accepts exactly the file's keys
========== ================= =============================================================

Ray drivers (deploy, stop) and ``keys`` (a GCS client, no driver) take the cluster's token from ``RAY_AUTH_MODE`` and
``RAY_AUTH_TOKEN_PATH`` in their environment (cluster.stages.serve.ray_driver_env).
"""

from __future__ import annotations

import socket
import sys
import time
from typing import Any

from pydantic import Field

from cluster.remote import Request, Verb, VerbFailed, main

MODULE = "serve.remote"
"""What ``python -m`` runs."""

_ADDRESS = r"^\S+:\d+$"
_URL = r"^https?://\S+$"


class DeployRequest(Request):
    """Deploy the server: the Ray GCS address (``host:port``, the head's private IP) and the
    ServeConfig's fields (serve.config.load_config)."""

    ray_address: str = Field(pattern=_ADDRESS)
    config: dict[str, Any]
    more: list[dict[str, Any]] = Field(
        default_factory=list,
        description="The endpoint's other models: each its own fields (serve.models."
        "MODEL_FIELDS); every other setting is ``config``'s.",
    )
    versions: dict[str, str] = Field(
        default_factory=dict,
        description="App name -> the version an earlier deploy returned: deployed as that "
        "version, the app keeps its replicas that still run it (a rollback).",
    )


class StopRequest(Request):
    """Stop one Serve application (drained), and Serve with it when it was the last."""

    ray_address: str = Field(pattern=_ADDRESS)
    app_name: str = Field(min_length=1)


class WaitRequest(Request):
    """Wait until ``{url}/ready`` answers 200 (serve.readiness.wait_until_ready)."""

    url: str = Field(pattern=_URL)
    timeout_s: float = Field(gt=0)
    api_key_file: str | None = Field(
        default=None, description="The head's API key file: a failure then says why."
    )


class ReadyRequest(Request):
    """Does ``{url}/ready`` answer 200 now? One GET, ``timeout_s`` at most."""

    url: str = Field(pattern=_URL)
    timeout_s: float = Field(default=5.0, gt=0)


class PortFreeRequest(Request):
    """Wait until nothing holds TCP ``port`` (the old server's processes can outlive its app)."""

    port: int = Field(ge=1, le=65535)
    wait_s: float = Field(ge=0)


class KeysRequest(Request):
    """Publish the digests of the keys in ``api_key_file`` (on the head) as the keys app
    ``app_name`` accepts: its gateway applies them within seconds, without a redeploy."""

    ray_address: str = Field(pattern=_ADDRESS)
    app_name: str = Field(min_length=1)
    api_key_file: str = Field(min_length=1)


def _join_ray(address: str) -> None:
    """Join the cluster at ``address`` as a driver on the head (its private IP)."""
    import ray

    ray.init(
        address=address,
        _node_ip_address=address.rsplit(":", 1)[0],
        log_to_driver=False,
        logging_level="ERROR",
    )


def deploy(req: DeployRequest) -> dict[str, Any]:
    """Deploy the app (detached: it outlives this program); where it answers."""
    _join_ray(req.ray_address)
    from serve.app import deploy as deploy_app
    from serve.config import load_config
    from serve.models import with_shared_fields

    try:
        more = [load_config(**with_shared_fields(req.config, m)) for m in req.more]
        endpoint = deploy_app(
            load_config(**req.config), ray_address=req.ray_address, more=more, versions=req.versions
        )
    except RuntimeError as exc:
        # Serve's "Deploying application ... failed"; the deployment's own status message
        # carries the replicas' start failure (the whole text is in the controller's log).
        from serve.rollout import failure_reason

        raise VerbFailed(
            "the replicas did not start: "
            + failure_reason(exc, None if req.more else req.config.get("app_name"))
        ) from exc
    return {
        "url": endpoint.url,
        "model": endpoint.model,
        "routes": list(endpoint.routes),
        "versions": endpoint.versions,
    }


def stop(req: StopRequest) -> dict[str, Any]:
    """Stop the app; ``stopped`` is False when no such app ran (not a failure)."""
    _join_ray(req.ray_address)
    from serve.app import shutdown

    return {"stopped": shutdown(req.app_name, ray_address=req.ray_address)}


def wait(req: WaitRequest) -> dict[str, Any]:
    """Wait for /ready; NotReadyError (not healthy, or the timeout) is the failure line."""
    from serve.readiness import wait_until_ready

    api_key = None
    if req.api_key_file:
        from cluster.keys import read_api_key

        api_key = read_api_key(req.api_key_file)
    wait_until_ready(req.url, timeout_s=req.timeout_s, api_key=api_key)
    return {"url": req.url}


def ready(req: ReadyRequest) -> dict[str, Any]:
    """One GET of /ready: 200 is ok, anything else (or no answer) exits 1."""
    import urllib.error
    import urllib.request

    url = req.url.rstrip("/") + "/ready"
    try:
        with urllib.request.urlopen(url, timeout=req.timeout_s) as response:
            status = response.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    except Exception as exc:
        raise VerbFailed(f"{url} did not answer: {type(exc).__name__}: {exc}", status=None) from exc
    if status != 200:
        raise VerbFailed(f"{url} answered HTTP {status}", status=status)
    return {"status": status}


def health(req: ReadyRequest) -> dict[str, Any]:
    """One GET of /health: its HTTP status and JSON body (the engine's state and restart
    history), whatever the status; no answer at all exits 1."""
    import json
    import urllib.error
    import urllib.request

    url = req.url.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=req.timeout_s) as response:
            status, text = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, text = exc.code, exc.read()
    except Exception as exc:
        raise VerbFailed(f"{url} did not answer: {type(exc).__name__}: {exc}", status=None) from exc
    try:
        body = json.loads(text or b"{}")
    except ValueError:
        body = {}
    return {"status": status, "health": body if isinstance(body, dict) else {}}


def keys(req: KeysRequest) -> dict[str, Any]:
    """Read the key file (0600, at least one key), publish its digests; how many, and whether
    the set changed."""
    from cluster.keys import read_api_keys
    from serve.api import key_digest
    from serve.keystore import publish_key_digests

    digests = [key_digest(k) for k in read_api_keys(req.api_key_file)]
    changed = publish_key_digests(req.app_name, digests, gcs_address=req.ray_address)
    return {"keys": len(set(digests)), "changed": changed}


def port_free(req: PortFreeRequest) -> dict[str, Any]:
    """Bind the port (SO_REUSEADDR, as the server will) every 0.5 s until it works or
    ``wait_s`` has passed."""
    deadline = time.monotonic() + req.wait_s
    while True:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", req.port))
            return {"port": req.port}
        except OSError as exc:
            if time.monotonic() > deadline:
                raise VerbFailed(
                    f"port {req.port} is still taken after {req.wait_s:g} s ({exc.strerror})",
                    port=req.port,
                ) from None
            time.sleep(0.5)
        finally:
            s.close()


VERBS: dict[str, Verb] = {
    "deploy": Verb(DeployRequest, deploy),
    "stop": Verb(StopRequest, stop),
    "wait": Verb(WaitRequest, wait),
    "ready": Verb(ReadyRequest, ready),
    "health": Verb(ReadyRequest, health),
    "port-free": Verb(PortFreeRequest, port_free),
    "keys": Verb(KeysRequest, keys),
}

if __name__ == "__main__":
    sys.exit(main(VERBS, prog=MODULE))
