"""The API keys in force for a served app: their SHA-256 digests in Ray's internal KV.

`deploy` writes them before the replica starts, serve.remote's ``keys`` verb rewrites them
(`llamacluster keys`, `up`), and each replica's gateway reads them every KEY_POLL_INTERVAL_S, so
a key change applies within seconds without a redeploy. Only Ray's GCS client is imported here
(not Ray Serve): the verb on the head stays quick.
"""

from __future__ import annotations

import json
from typing import Any

from cluster.errors import ConfigError

NAMESPACE = "llamacluster"
"""Ray internal-KV namespace (the one the restart history uses too)."""
KEY_POLL_INTERVAL_S = 1.0
"""How often a replica's gateway reads the keys in force."""
KV_TIMEOUT_S = 5.0


def keys_kv_key(app_name: str) -> str:
    """The internal-KV key of an app's accepted API key digests."""
    return f"keys/{app_name}"


def _gcs_client(gcs_address: str | None) -> Any:
    """A GCS client: a fresh one for ``gcs_address`` (no Ray driver needed, as `ray status`
    does it), else the one of the connected driver or replica."""
    if gcs_address:
        from ray._raylet import GcsClient

        return GcsClient(address=gcs_address)
    from ray.experimental import internal_kv

    return internal_kv.internal_kv_get_gcs_client()


def publish_key_digests(
    app_name: str, digests: list[bytes], *, gcs_address: str | None = None
) -> bool:
    """Make ``digests`` the keys the app's gateway accepts (a JSON list of hex, never a key);
    returns whether they differ from the ones stored before. An empty set is refused."""
    if not digests:
        raise ConfigError("refusing to publish an empty set of API keys")
    client = _gcs_client(gcs_address)
    key, namespace = keys_kv_key(app_name).encode(), NAMESPACE.encode()
    value = json.dumps(sorted({d.hex() for d in digests})).encode()
    old = client.internal_kv_get(key, namespace=namespace, timeout=KV_TIMEOUT_S)
    client.internal_kv_put(key, value, overwrite=True, namespace=namespace, timeout=KV_TIMEOUT_S)
    return old != value


def load_key_digests(app_name: str) -> list[bytes] | None:
    """The app's published key digests (None when none were published); raises when the KV
    cannot be read or holds something else."""
    raw = _gcs_client(None).internal_kv_get(
        keys_kv_key(app_name).encode(), namespace=NAMESPACE.encode(), timeout=KV_TIMEOUT_S
    )
    return None if raw is None else [bytes.fromhex(d) for d in json.loads(raw)]


def forget_key_digests(app_name: str) -> None:
    """Drop the app's published keys (its app was deleted)."""
    _gcs_client(None).internal_kv_del(
        keys_kv_key(app_name).encode(), False, namespace=NAMESPACE.encode(), timeout=KV_TIMEOUT_S
    )
