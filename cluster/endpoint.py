"""Where an OpenAI-compatible API answers: a recorded cluster's endpoint or one given by flags."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

from cluster.errors import ConfigError


@dataclass(frozen=True)
class ApiTarget:
    """An OpenAI base URL (ending in /v1), its key, the model name and, when known, a local
    directory holding the model's tokenizer files and the certificate file an HTTPS endpoint is
    trusted by (None: the system's authorities, or SSL_CERT_FILE)."""

    base_url: str
    api_key: str | None
    model: str | None = None
    model_dir: Path | None = None
    ca_cert: Path | None = None


def client_ssl_context(ca_cert: Path | str | None) -> ssl.SSLContext | None:
    """An SSL context trusting the system's authorities and ``ca_cert`` (a PEM certificate or
    bundle, e.g. a cluster's self-signed ``api.crt``); None without a file. A file that is
    missing or holds no certificate is a ConfigError naming it."""
    if ca_cert is None:
        return None
    path = Path(ca_cert)
    context = ssl.create_default_context()
    try:
        context.load_verify_locations(cafile=str(path))
    except FileNotFoundError:
        raise ConfigError(
            f"--ca-cert {path}: no such file",
            hint="pass the server's certificate (PEM), e.g. ~/.llamacluster/clusters/NAME/tls/api.crt",
        ) from None
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise ConfigError(
            f"--ca-cert {path} holds no PEM certificate ({getattr(exc, 'reason', None) or exc})",
            hint="pass the server's certificate file (PEM, '-----BEGIN CERTIFICATE-----')",
        ) from None
    return context


def cluster_ca_cert(name: str, endpoint: str | None) -> Path | None:
    """The certificate `up --tls` kept for cluster ``name`` on this machine, when its recorded
    ``endpoint`` speaks HTTPS and the file is there."""
    if not endpoint or not endpoint.startswith("https://"):
        return None
    from cluster.stages.serve import controller_tls_files

    cert = controller_tls_files(name)[0]
    return cert if cert.is_file() else None


def target_of_cluster(name: str) -> ApiTarget:
    """The API of the recorded cluster ``name``: endpoint, key file and served model name."""
    from cluster.recorded import RecordedCluster

    recorded = RecordedCluster.load(name)
    state = recorded.state
    endpoint = recorded.require_endpoint()
    model_dir = Path(state.model.dir) if state.model.dir else None
    return ApiTarget(
        base_url=f"{endpoint}/v1",
        api_key=recorded.api_key(),
        model=state.server.served_name,
        model_dir=model_dir if model_dir is not None and model_dir.is_dir() else None,
        ca_cert=cluster_ca_cert(name, endpoint),
    )


def resolve_target(
    *,
    name: str | None = None,
    base_url: str | None = None,
    api_key: str | None = None,
    api_key_file: Path | None = None,
    model: str | None = None,
    model_dir: Path | None = None,
    ca_cert: Path | None = None,
) -> ApiTarget:
    """The API to talk to: ``--base-url`` (with ``--api-key``/``--api-key-file``/OPENAI_API_KEY)
    wins, else the recorded cluster ``name``; flags override what the state says (``ca_cert``
    too: a cluster's own certificate is used when none is given)."""
    from cluster.bench.config import default_api_key
    from cluster.keys import read_api_key

    key = read_api_key(api_key_file) if api_key_file else api_key
    if base_url:
        url = base_url.rstrip("/")
        target = ApiTarget(base_url=url if url.endswith("/v1") else f"{url}/v1", api_key=None)
    elif name:
        target = target_of_cluster(name)
    else:
        raise ConfigError(
            "no endpoint given",
            hint="pass --name CLUSTER (a cluster started with `llamacluster up`) or "
            "--base-url http://HOST:PORT/v1",
        )
    if model_dir is not None and not Path(model_dir).is_dir():
        raise ConfigError(f"--model-dir {model_dir} is not a directory")
    if ca_cert is not None:
        client_ssl_context(ca_cert)  # a bad file: one line now, not a failed request later
    return ApiTarget(
        base_url=target.base_url,
        api_key=key or target.api_key or default_api_key(),
        model=model or target.model,
        model_dir=Path(model_dir) if model_dir else target.model_dir,
        ca_cert=Path(ca_cert) if ca_cert else target.ca_cert,
    )
