"""The replica's direct-ingress listener binds with SO_REUSEADDR, so a replacement can listen at once.

When a replica process dies (killed, OOM), the kernel closes its client connections from the
server's side, and each of them stays in TIME_WAIT on the endpoint port for 60 s. Ray Serve binds
a direct-ingress replica's socket without SO_REUSEADDR, and Linux refuses such a bind while any
TIME_WAIT connection holds the port (and lets a SO_REUSEADDR bind through only when the dead
socket had the option too). So the replica Serve starts in its place fails to bind for about a
minute. With SO_REUSEADDR on every replica's listener it binds at once; SO_REUSEPORT (two live
listeners on one port) stays off, as Serve has it.

Serve has no option for this, so the replica process swaps in a wrapper of Serve's own server
start that asks for Serve's socket-reuse path, with that path narrowed to SO_REUSEADDR.
"""

from __future__ import annotations

import inspect
import logging
import socket
from typing import Any

logger = logging.getLogger(__name__)

_MARK = "_llamacluster_reuse_address"


def _reuse_address_only(sock: socket.socket) -> bool:
    """Serve's ``set_socket_reuse_port`` narrowed: SO_REUSEADDR, never SO_REUSEPORT."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    return True


def listen_with_reuse_address() -> bool:
    """Make this process's Serve direct-ingress listener set SO_REUSEADDR (idempotent).

    Call it in the replica before Serve starts the listener (the deployment's constructor runs
    first). Returns False, changing nothing, when Ray's internals are not as expected; a
    replacement replica then waits for TIME_WAIT to pass, as without this.
    """
    try:
        from ray.serve._private import http_util, replica
    except ImportError:
        return False
    original = getattr(replica, "start_asgi_http_server", None)
    if original is None:
        return False
    if getattr(original, _MARK, False):
        return True
    try:
        expected = "enable_so_reuseport" in inspect.signature(original).parameters
    except (TypeError, ValueError):
        expected = False
    if not expected or not callable(getattr(http_util, "set_socket_reuse_port", None)):
        logger.warning(
            "Ray Serve's direct-ingress server start is not the expected one; a replacement "
            "replica may wait up to 60 s for the endpoint port"
        )
        return False

    async def start_asgi_http_server(*args: Any, **kwargs: Any) -> Any:
        kwargs["enable_so_reuseport"] = True
        return await original(*args, **kwargs)

    setattr(start_asgi_http_server, _MARK, True)
    http_util.set_socket_reuse_port = _reuse_address_only
    replica.start_asgi_http_server = start_asgi_http_server
    return True
