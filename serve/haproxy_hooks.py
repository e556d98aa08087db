"""What HAProxy sees of the replicas: each one's engine readiness, and OpenAI-shaped answers of its own.

Two guarded changes to Ray Serve's HAProxy mode (Ray has no option for either):

* **In each replica**, Serve answers HAProxy's health check (``/-/healthz``) with 200 whenever
  the replica process is alive. :func:`report_engine_readiness` makes it answer 503 while the
  replica's engine loads, restarts in place or has failed, so HAProxy marks that replica DOWN
  and sends nothing to it until its engine is back.
* **In the HAProxyManager actor** (on the head; it writes HAProxy's config and reloads it),
  :func:`install` is run at process start as Ray's worker setup hook (the controller's
  environment names it, and the manager, its child, inherits that). It makes HAProxy's own
  answers (no replica up, a replica gone mid-request) OpenAI's error shape with
  ``Retry-After`` instead of Ray's plain-text 500, and keeps Serve's Python proxy out of the
  HTTP backend: as a backup server it held requests until some replica ran (minutes, while an
  engine loads), where a client should get a 503 at once.

When Ray's internals are not as expected, each change logs a warning and leaves Ray's
behaviour as it is.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.util
import inspect
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# Ray runs the function this names (module.function) in every worker process it starts with it
# in the environment (ray/_private/workers/default_worker.py); ray_constants names it
# WORKER_PROCESS_SETUP_HOOK_ENV_VAR.
SETUP_HOOK_ENV = "__RAY_WORKER_PROCESS_SETUP_HOOK_ENV_VAR"
SETUP_HOOK = "serve.haproxy_hooks.install"
# Retry-After seconds in HAProxy's own 503 (the replicas' --retry-after).
RETRY_AFTER_ENV = "LLAMACLUSTER_RETRY_AFTER_S"
HAPROXY_MODULE = "ray.serve._private.haproxy"
# The API's certificate and key (paths on the head) when the endpoint speaks HTTPS: HAProxy
# terminates TLS with them and speaks TLS to the replicas (which serve the same certificate).
TLS_CERT_ENV = "LLAMACLUSTER_HAPROXY_TLS_CERT"
TLS_KEY_ENV = "LLAMACLUSTER_HAPROXY_TLS_KEY"
# An endpoint of several models: JSON [[route prefix, [names...]], ...] of every model after the
# first; HAProxy sends a request whose body names one of them to its app's route.
MODEL_ROUTES_ENV = "LLAMACLUSTER_HAPROXY_MODEL_ROUTES"
# HAProxy's buffer with several models (Ray's default 16 KiB): bodies up to about this size are
# routed by HAProxy itself, larger ones by the first model's gateway (one more hop).
MODEL_ROUTING_BUFSIZE = 65536
# HAProxy wants certificate and key in one file: written (0600) beside the errorfiles, in the
# endpoint's private directory.
TLS_PEM_FILE = "api.pem"

# The start of HAProxy's own 503 message: `wait_until_ready` tells it from a failed replica.
NO_REPLICA_MESSAGE = "no replica of this endpoint can serve right now"
ERROR_FILES = {
    502: (
        "Bad Gateway",
        "the replica closed the connection before it answered (it stopped or was restarted); "
        "retry the request",
    ),
    503: (
        "Service Unavailable",
        f"{NO_REPLICA_MESSAGE}: every replica is loading its engine, restarting or stopped",
    ),
    504: ("Gateway Timeout", "the replica did not answer in time"),
}

_REPLICA_MARK = "_llamacluster_engine_readiness"
_MANAGER_MARK = "_llamacluster_openai_errors"
_engine_unavailable: Callable[[], str | None] = lambda: None  # noqa: E731


# --- the replica: /-/healthz follows the engine ------------------------------------------------


def report_engine_readiness(unavailable: Callable[[], str | None]) -> bool:
    """Make this replica's ``/-/healthz`` (HAProxy's health check) fail while
    ``unavailable()`` gives a reason (one word, e.g. ``loading``: the answer is public).

    Serve's own reasons (draining, an unhealthy replica) still come first. Call it in the
    replica process; returns False, changing nothing, when Ray's replica is not the expected
    one (HAProxy then checks only that the process is alive, as without this).
    """
    global _engine_unavailable
    try:
        from ray.serve._private import replica
    except ImportError:
        return False
    cls = getattr(replica, "Replica", None)
    original = getattr(cls, "_dataplane_health_check", None)
    if original is None or not inspect.iscoroutinefunction(original):
        logger.warning(
            "Ray Serve's replica health check is not the expected one; HAProxy may send "
            "requests to a replica whose engine is loading or restarting"
        )
        return False
    _engine_unavailable = unavailable
    if getattr(original, _REPLICA_MARK, False):
        return True

    async def _dataplane_health_check(self: Any) -> tuple[bool, str]:
        healthy, message = await original(self)
        if healthy and (reason := _engine_unavailable()) is not None:
            return False, reason.upper()
        return healthy, message

    setattr(_dataplane_health_check, _REPLICA_MARK, True)
    cls._dataplane_health_check = _dataplane_health_check
    return True


# --- the HAProxyManager: HAProxy's own answers and the backup server ----------------------------


def error_response(status: int, retry_after_s: int) -> bytes:
    """HAProxy's errorfile for ``status`` (a whole HTTP response): OpenAI's error JSON, with
    ``Retry-After`` on a 503."""
    from serve.api import error_payload

    reason, message = ERROR_FILES[status]
    if status == 503:
        message += f"; retry after {retry_after_s} s"
    body = json.dumps(error_payload(status, message)).encode()
    head = [
        f"HTTP/1.1 {status} {reason}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        "Cache-Control: no-cache",
        "Connection: close",
    ]
    if status == 503:
        head.append(f"Retry-After: {retry_after_s}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


# Ray's config template, each edit as (what is there, what replaces it). Every one must be
# found exactly once, or none is made.
_ERRORFILES = (
    "    errorfile 502 {{ config.error_file_path }}\n"
    "    errorfile 503 {{ config.error_file_path }}\n"
    "    errorfile 504 {{ config.error_file_path }}\n"
)
_TEMPLATE_EDITS = (
    # One file per status (Ray maps all three to one plain-text 500); error_file_path is ours,
    # the 503 one.
    (
        _ERRORFILES,
        "    errorfile 502 {{ config.error_file_path | replace('503.json.http', '502.json.http') }}\n"
        "    errorfile 503 {{ config.error_file_path }}\n"
        "    errorfile 504 {{ config.error_file_path | replace('503.json.http', '504.json.http') }}\n",
    ),
    # The HTTP backend keeps Serve's proxy as a server (Ray's bookkeeping counts it), but
    # disabled: with no replica up HAProxy answers its own 503 at once instead of holding the
    # request in the proxy until a replica runs.
    (
        "{{ backend.fallback_server.port }} check backup\n",
        "{{ backend.fallback_server.port }} backup disabled\n",
    ),
    # The ingress-request-router backend mirrored that server's state (`track`); it checks the
    # proxy itself instead, so a router's pin-miss still reaches the proxy.
    (
        "track {{ backend.name or 'unknown' }}/{{ backend.fallback_server.name }} backup",
        "check backup",
    ),
    # A prefix router that could not choose (no replica up, or it did not answer) is HAProxy's
    # own 503 too, the errorfile above (OpenAI's shape, Retry-After), not a plain-text line.
    (
        'http-request return status 503 content-type text/plain lf-string "Ingress request '
        'router failed: %[var(txn.ingress_request_router_failed)]" hdr X-Serve-Reason',
        "http-request deny deny_status 503 hdr X-Serve-Reason",
    ),
)


_FRONTEND_BIND = "    bind {{ config.frontend_host }}:{{ config.frontend_port }}\n"
# The HTTP backends' default-server line (the gRPC ones, which speak cleartext h2, have their
# own and are left alone).
_DEFAULT_SERVER = "    {{ hc.default_server_directive }}\n    # Servers in this backend\n"


def tls_edits(cert: str) -> tuple[tuple[str, str], ...]:
    """The template edits of an HTTPS endpoint: the frontend terminates TLS with the API's
    certificate (the combined PEM beside the errorfiles), and every server line (replicas,
    Serve's proxy) speaks TLS, since the replicas serve HTTPS themselves.

    HAProxy verifies a replica against ``cert`` when it is self-issued (the default
    ``--tls self-signed``, a CA of its own). A certificate issued by a CA cannot be checked
    that way (the file is no trust anchor), so that hop is encrypted but not verified: it
    runs on the cluster's network, which Ray's own traffic already trusts.
    """
    verify = f"verify required ca-file {cert}" if self_issued(cert) else "verify none"
    pem = "{{ config.error_file_path | replace('503.json.http', '" + TLS_PEM_FILE + "') }}"
    return (
        (_FRONTEND_BIND, _FRONTEND_BIND.rstrip("\n") + f" ssl crt {pem}\n"),
        (
            _DEFAULT_SERVER,
            _DEFAULT_SERVER.replace(
                "{{ hc.default_server_directive }}\n",
                f"{{{{ hc.default_server_directive }}}} ssl {verify}\n",
            ),
        ),
    )


# Where the frontend's routing rules begin (after the health checks and /-/routes): the model
# rules go first, so the path every later rule sees is the rewritten one.
_PATH_ACLS = "    # Per-backend path ACLs (used for both ingress-request-router dispatch\n"


def model_route_edits(routes: list[tuple[str, list[str]]]) -> tuple[tuple[str, str], ...]:
    """The template edit of an endpoint with several models: a POST under /v1/ whose JSON body
    names a model of another app gets that app's route prefix in front of its path (Serve's
    routing then sends it to that app's replicas, which see their own routes). HAProxy reads
    the body's `model` when the body fits its buffer; a request it cannot read goes to the
    first app unchanged, whose gateway forwards it (serve/models.py)."""
    if not routes:
        return ()
    rules = [
        "    # llamacluster: requests for another model go to its app's route\n",
        "    http-request wait-for-body time 1s if METH_POST { path_beg /v1/ }\n",
        "    http-request set-var(txn.lc_model) req.body,json_query('$.model') "
        "if METH_POST { path_beg /v1/ }\n",
    ]
    for prefix, names in routes:
        quoted = " ".join(_haproxy_quoted(n) for n in names)
        rules.append(
            f"    http-request set-path {prefix}%[path] if {{ path_beg /v1/ }} "
            f"{{ var(txn.lc_model) -m str {quoted} }}\n"
        )
    return ((_PATH_ACLS, "".join(rules) + _PATH_ACLS),)


def _haproxy_quoted(text: str) -> str:
    """``text`` as one double-quoted HAProxy word (Jinja-inert: names hold no braces)."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def self_issued(cert: str) -> bool:
    """Whether the PEM certificate at ``cert`` is its own issuer."""
    from cryptography import x509

    loaded = x509.load_pem_x509_certificate(Path(cert).read_bytes())
    return loaded.issuer == loaded.subject


def balancer_template(
    template: str,
    tls_cert: str | None = None,
    model_routes: list[tuple[str, list[str]]] | None = None,
) -> str | None:
    """Ray's HAProxy config template with our edits (and the HTTPS ones with ``tls_cert``, the
    model routing with ``model_routes``); None when it is not the expected one."""
    edits = (
        _TEMPLATE_EDITS
        + (tls_edits(tls_cert) if tls_cert else ())
        + model_route_edits(model_routes or [])
    )
    if any(template.count(old) != 1 for old, _ in edits):
        return None
    for old, new in edits:
        template = template.replace(old, new)
    return template


def write_tls_pem(directory: str, cert: str, key: str) -> str:
    """HAProxy's certificate file: the certificate then its key, one file (0600 from the start,
    written whole, then renamed) in the endpoint's private directory; returns its path."""
    path = Path(directory, TLS_PEM_FILE)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()  # a leftover of a killed writer: never reuse its mode
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(Path(cert).read_bytes().rstrip(b"\n") + b"\n" + Path(key).read_bytes())
    os.replace(tmp, path)
    return str(path)


def write_error_files(directory: str, retry_after_s: int) -> str:
    """Write the 502, 503 and 504 errorfiles into ``directory`` (each written whole, then
    renamed); returns the 503 one's path (the template derives the others from it)."""
    for status in ERROR_FILES:
        path = Path(directory, f"{status}.json.http")
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(error_response(status, retry_after_s))
        tmp.chmod(0o644)  # HAProxy reads it; it holds nothing secret
        os.replace(tmp, path)
    return str(Path(directory, "503.json.http"))


def use_openai_errors(
    haproxy: Any,
    retry_after_s: int,
    tls: tuple[str, str] | None = None,
    model_routes: list[tuple[str, list[str]]] | None = None,
) -> bool:
    """Patch Ray's HAProxy module (``ray.serve._private.haproxy``, loaded): our errorfiles and
    template; with ``tls`` (certificate, key), HTTPS at the endpoint and to the replicas; with
    ``model_routes``, requests routed to the app of the model they name.
    Returns False, changing nothing, when it is not the expected one."""
    api = getattr(haproxy, "HAProxyApi", None)
    init_files = getattr(api, "_initialize_directories_and_error_files", None)
    template = getattr(haproxy, "HAPROXY_CONFIG_TEMPLATE", None)
    if getattr(init_files, _MANAGER_MARK, False):
        return True
    cert = tls[0] if tls else None
    edited = balancer_template(template, cert, model_routes) if isinstance(template, str) else None
    if init_files is None or edited is None:
        if tls:
            # Plain HTTP where HTTPS was asked for must not happen silently: HAProxy gets no
            # config of ours, and Ray's cannot speak to the HTTPS replicas either.
            raise RuntimeError(
                "Ray Serve's HAProxy config is not the expected one: cannot serve HTTPS "
                "through it; serve one replica over TLS"
            )
        if model_routes:
            # Without the routing every request would reach the first model only.
            raise RuntimeError(
                "Ray Serve's HAProxy config is not the expected one: cannot route several "
                "models through it; serve one model per cluster"
            )
        logger.warning(
            "Ray Serve's HAProxy config is not the expected one: with no replica up clients "
            "get HAProxy's plain-text 500, or wait in Serve's proxy"
        )
        return False

    def _initialize_directories_and_error_files(self: Any) -> None:
        init_files(self)
        directory = os.path.dirname(self.cfg.error_file_path)
        self.cfg.error_file_path = write_error_files(directory, retry_after_s)
        if tls:
            write_tls_pem(directory, *tls)

    setattr(_initialize_directories_and_error_files, _MANAGER_MARK, True)
    api._initialize_directories_and_error_files = _initialize_directories_and_error_files
    haproxy.HAPROXY_CONFIG_TEMPLATE = edited
    return True


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Apply :func:`use_openai_errors` right after Ray's HAProxy module is first imported (so
    processes that never import it, such as engine workers, pay nothing)."""

    def __init__(
        self,
        retry_after_s: int,
        tls: tuple[str, str] | None = None,
        model_routes: list[tuple[str, list[str]]] | None = None,
    ) -> None:
        self.retry_after_s = retry_after_s
        self.tls = tls
        self.model_routes = model_routes

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name != HAPROXY_MODULE:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        loader, retry_after_s, tls, routes = (
            spec.loader,
            self.retry_after_s,
            self.tls,
            self.model_routes,
        )

        class _Loader(importlib.abc.Loader):
            def create_module(self, spec: Any) -> Any:
                return loader.create_module(spec)

            def exec_module(self, module: Any) -> None:
                loader.exec_module(module)
                use_openai_errors(module, retry_after_s, tls, routes)

        spec.loader = _Loader()
        return spec


def install() -> None:
    """Ray's worker setup hook (``SETUP_HOOK``): in a process of Serve's HAProxy mode, make
    HAProxy's own answers OpenAI-shaped; elsewhere, nothing."""
    # serve.balancer.HAPROXY_ENV (which imports this module): set for the controller, its
    # children and the replicas of a balanced app only.
    if os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") != "1":
        return
    try:
        retry_after_s = max(1, int(os.environ.get(RETRY_AFTER_ENV, "1")))
    except ValueError:
        retry_after_s = 1
    cert, key = os.environ.get(TLS_CERT_ENV), os.environ.get(TLS_KEY_ENV)
    tls = (cert, key) if cert and key else None
    routes = model_routes_from_env(os.environ.get(MODEL_ROUTES_ENV))
    module = sys.modules.get(HAPROXY_MODULE)
    if module is not None:
        use_openai_errors(module, retry_after_s, tls, routes)
    elif not any(isinstance(f, _PatchOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _PatchOnImport(retry_after_s, tls, routes))


def model_routes_env(routes: list[tuple[str, list[str]]]) -> str:
    """The value of MODEL_ROUTES_ENV for ``routes``."""
    return json.dumps([[prefix, list(names)] for prefix, names in routes])


def model_routes_from_env(value: str | None) -> list[tuple[str, list[str]]]:
    """MODEL_ROUTES_ENV read back (nothing when unset or unreadable)."""
    if not value:
        return []
    try:
        return [(str(prefix), [str(n) for n in names]) for prefix, names in json.loads(value)]
    except (ValueError, TypeError):
        logger.warning("ignoring an unreadable %s", MODEL_ROUTES_ENV)
        return []
