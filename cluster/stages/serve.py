"""Serve (the Ray Serve app with tp × pp, redeployed only when its config changed) and ready."""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path

from cluster.errors import ConfigError, NotReadyError, RemoteError
from cluster.stages.base import Stage, StageOutcome, UpContext
from cluster.stages.env import env_python
from cluster.state import API_KEY_FILE, NodeState, config_hash, remote_cluster_dir

# Runs on the head with the shared env: the ServeConfig comes as JSON on stdin, the Ray address
# as the argument; prints the endpoint as JSON. Serve is detached, so the app outlives this.
DEPLOY_SNIPPET = (
    "import json, sys, ray\n"
    "ray.init(address=sys.argv[1], _node_ip_address=sys.argv[1].rsplit(':', 1)[0], "
    "log_to_driver=False, logging_level='ERROR')\n"
    "from serve.app import deploy\n"
    "from serve.config import load_config\n"
    "endpoint = deploy(load_config(**json.loads(sys.stdin.read())), ray_address=sys.argv[1])\n"
    "print(json.dumps({'url': endpoint.url, 'model': endpoint.model}))\n"
)
SHUTDOWN_SNIPPET = (
    "import sys, ray\n"
    "ray.init(address=sys.argv[2], _node_ip_address=sys.argv[2].rsplit(':', 1)[0], "
    "log_to_driver=False, logging_level='ERROR')\n"
    "from serve.app import shutdown\n"
    "print(shutdown(sys.argv[1], ray_address=sys.argv[2]))\n"
)
# Exit 0 once nothing holds the port (argv[1]) any more, 1 after argv[2] seconds: the old
# server's processes (the replica, an engine process it forked) can outlive its app by seconds.
PORT_RELEASED_SNIPPET = (
    "import socket, sys, time\n"
    "port, deadline = int(sys.argv[1]), time.monotonic() + float(sys.argv[2])\n"
    "while True:\n"
    "    s = socket.socket()\n"
    "    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
    "    try:\n"
    "        s.bind(('', port))\n"
    "        sys.exit(0)\n"
    "    except OSError:\n"
    "        if time.monotonic() > deadline:\n"
    "            sys.exit(1)\n"
    "        time.sleep(0.5)\n"
    "    finally:\n"
    "        s.close()\n"
)
PORT_RELEASE_WAIT_S = 120
# Is the app deployed and ready? (exit 0 when /ready answers 200)
READY_PROBE_TEMPLATE = (
    "{python} -c 'import sys, urllib.request\n"
    "try: sys.exit(0 if urllib.request.urlopen(sys.argv[1], timeout=5).status == 200 else 1)\n"
    "except Exception: sys.exit(1)' {url}"
)
WAIT_READY_SNIPPET = (
    "import sys\n"
    "from serve.app import wait_until_ready\n"
    "wait_until_ready(sys.argv[1], timeout_s=float(sys.argv[2]))\n"
)


# RAY_ADDRESS-free env for drivers on the head: token auth with this cluster's token file.
def ray_driver_env(token_path: str) -> dict[str, str]:
    """Environment a Ray driver on the head needs to reach this cluster (token auth)."""
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": token_path}


def default_cpu_kvcache_gb() -> int:
    """KV cache GiB per CPU worker when --cpu-kvcache-gb is not given: the controller's
    VLLM_CPU_KVCACHE_SPACE if set (a shared machine keeps it small), else 4."""
    value = os.environ.get("VLLM_CPU_KVCACHE_SPACE", "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else 4


def python_snippet_command(python: str, snippet: str, *args: str) -> str:
    """``python -c SNIPPET ARGS`` quoted for the node's shell."""
    return " ".join([shlex.quote(python), "-c", shlex.quote(snippet), *map(shlex.quote, args)])


def local_url(ctx: UpContext) -> str:
    """The API as the head itself reaches it."""
    assert ctx.state.ports is not None
    return f"http://127.0.0.1:{ctx.state.ports.api}"


def plan_parallelism(
    model: str,
    nodes: list[NodeState],
    *,
    tp: int | None = None,
    pp: int | None = None,
    max_model_len: int | None = None,
    cpu_kvcache_gb: int | None = None,
) -> tuple[int, int]:
    """tp × pp for ``model`` on ``nodes``: the flags when both are given, else the planner's
    smallest layout that fits (tp inside a node first, pp across nodes; a given one is kept).

    Only memory decides the fit, so a GPU node is sized as an H100 with its measured memory.
    """
    if tp and pp:
        return tp, pp
    from cluster.device_specs import get_device
    from cluster.planner import ClusterShape, PlanOptions, choose_parallelism, load_model_shape

    shape = load_model_shape(model)
    head = nodes[0]
    if head.device_kind == "gpu":
        mem = min(int(x) for x in head.device_info.get("memory_mib", "0").split(",") if x)
        device = get_device("h100-sxm", memory_gib=mem / 1024 if mem else None)
    else:
        device = get_device("cpu", memory_gib=float(cpu_kvcache_gb) + 4 if cpu_kvcache_gb else None)
    cluster = ClusterShape(
        nodes=len(nodes), devices_per_node=max(1, min(n.devices for n in nodes)), device=device
    )
    options = PlanOptions(tp=tp, pp=pp, max_model_len=max_model_len)
    return choose_parallelism(shape, cluster, options=options)


def default_parallelism(ctx: UpContext) -> tuple[int, int]:
    """tp × pp for this `up` (see plan_parallelism) from the flags and the recorded nodes."""
    cfg = ctx.config
    return plan_parallelism(
        str(ctx.state.model_dir or ctx.state.model),
        ctx.state.nodes,
        tp=cfg.tp,
        pp=cfg.pp,
        max_model_len=cfg.max_model_len,
        cpu_kvcache_gb=cfg.cpu_kvcache_gb,
    )


def served_names(asked: list[str], model: str) -> list[str]:
    """The names the server answers to: the asked ones, else the repo id for a hub model (what
    every OpenAI client sends) or the directory's name for a local model."""
    from cluster.stages.download import is_local_model

    if asked:
        return list(dict.fromkeys(asked))
    return [Path(model).expanduser().absolute().name if is_local_model(model) else model]


def serve_values(ctx: UpContext, tp: int, pp: int) -> dict[str, object]:
    """The ServeConfig fields `up` deploys (also hashed to tell whether to redeploy)."""
    cfg = ctx.config
    assert ctx.state.ports is not None
    head = ctx.state.nodes[0]
    values: dict[str, object] = {
        "model": ctx.state.model_dir,
        "tp": tp,
        "pp": pp,
        "device": head.device_kind,
        "api_key_file": ctx.state.remote_api_key_file,
        "port": ctx.state.ports.api,
        "proxy_port": ctx.state.ports.serve_proxy or ctx.state.ports.api + 2,
        "engine_args": dict(cfg.engine_args),
    }
    values["served_model_name"] = served_names(cfg.served_model_name, str(ctx.state.model))
    if cfg.max_model_len:
        values["max_model_len"] = cfg.max_model_len
    if cfg.gpu_memory_utilization is not None:
        values["gpu_memory_utilization"] = cfg.gpu_memory_utilization
    if head.device_kind == "cpu":
        values["cpu_kvcache_space_gb"] = cfg.cpu_kvcache_gb or default_cpu_kvcache_gb()
    return values


class Serve(Stage):
    """Deploy the OpenAI server on the Ray cluster; a rerun with the same config changes nothing."""

    name = "serve"
    title = "OpenAI server (vLLM tp × pp on Ray Serve, direct ingress)"

    def plan(self, ctx: UpContext) -> dict[str, list[str]]:
        python = env_python(ctx.state.env_dir or "<env>")
        tp = ctx.config.tp or "<planner>"
        pp = ctx.config.pp or "<planner>"
        return {
            ctx.head.label: [
                f"copy {ctx.state.api_key_file or '<api key>'} -> {remote_cluster_dir(ctx.state)}/{API_KEY_FILE} (0600)",
                python_snippet_command(
                    python, "from serve.app import deploy; ...", "<head-ip>:<ray-port>"
                )
                + f"   # stdin: ServeConfig(model={ctx.state.model_dir or ctx.state.model}, tp={tp}, pp={pp})",
            ]
        }

    def run(self, ctx: UpContext) -> StageOutcome:
        tp, pp = default_parallelism(ctx)
        total = sum(n.devices for n in ctx.state.nodes)
        if tp * pp > total:
            raise ConfigError(
                f"tp={tp} × pp={pp} needs {tp * pp} devices, the cluster has {total}",
                hint="lower --tp/--pp or add nodes (or --cpu-slots on CPU nodes)",
            )
        self._copy_api_key(ctx)
        values = serve_values(ctx, tp, pp)
        wanted = config_hash(values)
        python = env_python(str(ctx.state.env_dir))
        probe = READY_PROBE_TEMPLATE.format(
            python=shlex.quote(python), url=shlex.quote(local_url(ctx) + "/ready")
        )
        leftover = total - tp * pp
        note = f"; {leftover} device slot(s) left idle" if leftover else ""
        if (
            ctx.state.serve_config_hash == wanted
            and ctx.run_head(probe, what="ready probe", check=False).ok
        ):
            return StageOutcome("unchanged", f"already serving tp={tp} × pp={pp}{note}")
        head = ctx.node_state(ctx.head)
        assert ctx.state.ports is not None and ctx.state.remote_token_path
        if ctx.state.serve_config_hash is not None:
            # A changed config: stop the old app first (its devices are needed by the new one).
            ctx.run_head(
                python_snippet_command(
                    python,
                    SHUTDOWN_SNIPPET,
                    "llamacluster",
                    f"{head.private_ip}:{ctx.state.ports.ray_gcs}",
                ),
                what="stopping the old server",
                env=ray_driver_env(ctx.state.remote_token_path),
                timeout=300,
            )
            self._wait_port_released(ctx, python, ctx.state.ports.api)
        out = ctx.run_head(
            python_snippet_command(
                python, DEPLOY_SNIPPET, f"{head.private_ip}:{ctx.state.ports.ray_gcs}"
            ),
            what="deploying the server",
            stdin=json.dumps(values),
            env=ray_driver_env(ctx.state.remote_token_path),
            timeout=600,
        ).stdout
        endpoint = json.loads(out.strip().splitlines()[-1])
        redeploy = ctx.state.serve_config_hash is not None
        ctx.state.serve_config_hash = wanted
        ctx.state.tp, ctx.state.pp = tp, pp
        names = values["served_model_name"]
        assert isinstance(names, list)
        ctx.state.served_model_name, ctx.state.served_aliases = endpoint["model"], names[1:]
        ctx.state.endpoint = endpoint["url"]
        if leftover:
            ctx.reporter.info(
                f"{leftover} device slot(s) stay idle (one tp × pp group per cluster)"
            )
        return StageOutcome(
            "done",
            f"{'re' if redeploy else ''}deployed {endpoint['model']} with tp={tp} × pp={pp}{note}",
        )

    @staticmethod
    def _wait_port_released(ctx: UpContext, python: str, port: int) -> None:
        """Wait until the old server let go of the API port (the new one must bind it)."""
        wait = python_snippet_command(
            python, PORT_RELEASED_SNIPPET, str(port), str(PORT_RELEASE_WAIT_S)
        )
        holders = f"ss -ltnp 'sport = :{int(port)}' 2>/dev/null | tail -n +2"
        res = ctx.run_head(
            f"{wait} || {{ {holders}; exit 1; }}",
            what=f"waiting for port {port} to be free",
            timeout=PORT_RELEASE_WAIT_S + 30,
            check=False,
        )
        if not res.ok:
            held_by = res.stdout.strip().splitlines()[-1:] or ["(ss shows no listener)"]
            raise RemoteError(
                f"port {port} on {ctx.head.label} is still taken {PORT_RELEASE_WAIT_S} s after "
                f"the old server stopped: {held_by[0][:200]}",
                hint="stop the process that holds it, or pass another --api-port",
            )

    @staticmethod
    def _copy_api_key(ctx: UpContext) -> None:
        src = Path(str(ctx.state.api_key_file))
        dest = f"{remote_cluster_dir(ctx.state)}/{API_KEY_FILE}"
        ctx.head_runner.copy_to(src, dest, mode=0o600, timeout=60)
        ctx.state.remote_api_key_file = dest


class Ready(Stage):
    """Wait for /ready on the head, then say how to reach the endpoint."""

    name = "ready"
    title = "server answers /ready"

    def plan(self, ctx: UpContext) -> dict[str, list[str]]:
        python = env_python(ctx.state.env_dir or "<env>")
        port = ctx.state.ports.api if ctx.state.ports else "<api-port>"
        return {
            ctx.head.label: [
                python_snippet_command(
                    python,
                    WAIT_READY_SNIPPET,
                    f"http://127.0.0.1:{port}",
                    str(ctx.config.ready_timeout_s),
                )
            ]
        }

    def run(self, ctx: UpContext) -> StageOutcome:
        python = env_python(str(ctx.state.env_dir))
        res = ctx.run_head(
            python_snippet_command(
                python, WAIT_READY_SNIPPET, local_url(ctx), str(ctx.config.ready_timeout_s)
            ),
            what="waiting for /ready",
            timeout=ctx.config.ready_timeout_s + 30,
            check=False,
        )
        if not res.ok:
            why = res.tail(1) or res.tail(1, stream="stdout")
            cause = self._root_cause(ctx)
            if cause and cause not in why:
                why += f"; root cause in the head's logs: {cause}"
            raise NotReadyError(
                f"the server on {ctx.head.label} did not become ready: {why}",
                hint=f"see `llamacluster logs --name {ctx.state.name}`",
            )
        return StageOutcome(
            "unchanged"
            if ctx.state.stages.get("serve", None)
            and ctx.state.stages["serve"].status == "unchanged"
            else "done",
            f"{ctx.state.endpoint}/v1 is ready",
        )

    @staticmethod
    def _root_cause(ctx: UpContext) -> str:
        """The engine's last exception line from the head's Ray logs, or "" (best effort)."""
        from cluster.stages.ray import root_cause_command  # ray.py imports this module

        head = ctx.state.node(ctx.head.name)
        if head is None or not head.ray_temp_dir:
            return ""
        res = ctx.run_head(
            root_cause_command(head.ray_temp_dir),
            what="reading the engine's last error",
            timeout=30,
            check=False,
        )
        return res.stdout.strip() if res.ok else ""
