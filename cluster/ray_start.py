"""Ray's own CLI (``python -m cluster.ray_start start ...``), with the raylet told where its
dashboard agent listens.

Ray 2.60's raylet waits, inside its constructor, for its dashboard agent (a Python process it
starts) to write the agent's ports into the session directory, unless the port is on its command
line. ``ray start`` puts the agent's gRPC and metrics ports and the runtime-env agent's port there,
but not the agent's HTTP listen port, even when ``--dashboard-agent-listen-port`` gives it. The
wait is fixed at 15 s; an agent that takes longer to import and start (a busy node, a cold page
cache, the head's dozen dashboard processes starting at the same moment on two cores) makes the
raylet abort (``Check failed`` in ``node_manager.cc``, in its ``raylet.err``) and ``ray start``
fail with "The current node timed out during startup". Starting again on a busy node fails the
same way. With the port given, the raylet does not wait for that file: the agent binds the same
port when it is up (docs/CLUSTER.md, "Ray start"). The node then registers before its agent
listens, and an agent that never comes up (its port taken in between, say) takes the raylet down
with it later: so a start returns once the agent accepts connections on its port, and fails
saying so (``AGENT_NOT_LISTENING``, which the caller retries like Ray's own startup timeout) when
it does not within ``AGENT_WAIT_S``.

Runs on the nodes with the shared env's Python; imports nothing of this project but itself.
"""

from __future__ import annotations

import socket
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

#: The raylet's own flag for the agent's HTTP port (gflags; ``ray start`` does not pass it).
LISTEN_FLAG = "--dashboard_agent_listen_port"
#: How long a started node's dashboard agent gets to listen on its port.
AGENT_WAIT_S = 90.0
#: What a start prints when the agent did not listen in time (start_ray_node retries it).
AGENT_NOT_LISTENING = "dashboard agent is not listening"


def with_listen_port(command: list[str], port: Any) -> list[str]:
    """The raylet ``command`` with the agent's listen port added: only a fixed port (a free
    one chosen by the agent, 0 or None, can only come from its file) and only once."""
    if not isinstance(port, int) or port <= 0:
        return command
    if any(arg.startswith(LISTEN_FLAG + "=") for arg in command[1:]):
        return command
    return [*command, f"{LISTEN_FLAG}={port}"]


def install() -> None:
    """Have Ray's node start pass the listen port to the raylet it starts."""
    from ray._private import ray_constants, services

    start_raylet = services.start_raylet
    start_ray_process = services.start_ray_process
    listen: dict[str, Any] = {}

    def raylet_with_port(*args: Any, **kwargs: Any) -> Any:
        listen["port"] = kwargs.get("dashboard_agent_listen_port")
        try:
            return start_raylet(*args, **kwargs)
        finally:
            listen.clear()

    def process_with_port(command: list[str], process_type: str, *args: Any, **kwargs: Any):
        if process_type == ray_constants.PROCESS_TYPE_RAYLET and "port" in listen:
            command = with_listen_port(command, listen["port"])
        return start_ray_process(command, process_type, *args, **kwargs)

    services.start_raylet = raylet_with_port
    services.start_ray_process = process_with_port


def flag_value(argv: list[str], flag: str) -> str | None:
    """The value of ``flag`` in ``argv`` (``--flag value`` or ``--flag=value``), else None."""
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def agent_listens(host: str, port: int, wait_s: float) -> bool:
    """True once ``host:port`` accepts a connection, False when ``wait_s`` passed first."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            with socket.create_connection((host, port), timeout=2):
                return True
        except OSError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.5)


def _agent_log_tail(argv: list[str], lines: int = 5) -> str:
    temp = flag_value(argv, "--temp-dir")
    log = Path(temp or "/tmp/ray") / "session_latest" / "logs" / "dashboard_agent.log"
    try:
        with log.open(errors="replace") as f:
            return "".join(deque(f, maxlen=lines)).strip()
    except OSError:
        return f"(no {log})"


def exit_code(code: object) -> int:
    """The process exit status of what Ray's CLI returned or exited with (None: success; a
    message: failure, as ``sys.exit`` treats it)."""
    if code is None:
        return 0
    return code if isinstance(code, int) else 1


def main() -> int:
    install()
    from ray.scripts.scripts import main as ray_main

    argv = sys.argv[1:]
    sys.argv[0] = "ray"
    try:
        code = exit_code(ray_main())
    except SystemExit as done:
        code = exit_code(done.code)
    if code != 0 or argv[:1] != ["start"]:
        return code
    host = flag_value(argv, "--node-ip-address")
    port = flag_value(argv, "--dashboard-agent-listen-port") or ""
    if (
        host
        and port.isdigit()
        and int(port) > 0
        and not agent_listens(host, int(port), AGENT_WAIT_S)
    ):
        print(
            f"llamacluster: the node registered but its {AGENT_NOT_LISTENING} on "
            f"{host}:{port} after {AGENT_WAIT_S:g} s; its log ends:\n{_agent_log_tail(argv)}",
            flush=True,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
