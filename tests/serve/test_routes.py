"""Every route of vLLM's real OpenAI app (as serve/vllm_glue.py builds it) is either on the
gateway's allowlist or reachable with an admin key only, so a route a new vLLM adds stays shut."""

from __future__ import annotations

import re
import time
from pathlib import Path

import httpx
import pytest
from starlette.routing import Mount, Route, WebSocketRoute

from serve import vllm_glue
from serve.api import PUBLIC_PATHS, Gateway, ServerState, is_public_route, key_digest
from serve.config import ServeConfig

pytestmark = pytest.mark.anyio

KEY = "sk-user-key"
ADMIN = "sk-admin-key"
# What vLLM offers a generating model that a user key must reach (the rest of PUBLIC_PATHS
# is the gateway's own probes and the pooling models' /v1/embeddings).
GENERATE_PUBLIC = {
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/models",
    "/tokenize",
    "/detokenize",
    "/metrics",
}
# Operational routes that must never be public (some only exist with vLLM's dev/LoRA env).
MUST_BE_ADMIN = {
    "/scale_elastic_ep",
    "/is_scaling_elastic_ep",
    "/v1/responses",
    "/invocations",
    "/inference/v1/generate",
    "/v1/chat/completions/batch",
    "/docs",
    "/openapi.json",
    "/sleep",
    "/wake_up",
    "/collective_rpc",
    "/reset_prefix_cache",
    "/v1/load_lora_adapter",
    "/v1/unload_lora_adapter",
}
# (tasks, extra env) combinations whose route sets together cover what vLLM can expose.
VARIANTS = [
    (("generate",), {}),
    (
        ("generate", "render"),
        {"VLLM_SERVER_DEV_MODE": "1", "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1"},
    ),
    (("embed",), {}),
    (("transcription",), {}),
]


def routes_of(app) -> list[tuple[str, str]]:
    """(method, concrete path) for every HTTP route of the app; path parameters filled in."""
    found = []
    for route in app.router.routes:
        if isinstance(route, WebSocketRoute):
            continue  # the gateway closes every websocket
        assert isinstance(route, (Route, Mount)), f"unknown route kind {route!r}"
        path = re.sub(r"\{[^}]+\}", "x", route.path)
        methods = sorted(getattr(route, "methods", None) or {"GET"})
        found += [(m, path) for m in methods if m != "HEAD"]
    return found


@pytest.fixture(scope="module")
def vllm_routes(demo_model_dir: Path) -> dict[tuple[str, ...], tuple[object, list]]:
    """vLLM's app and its routes for each variant, built the way the server builds them."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    mp = pytest.MonkeyPatch()
    config = ServeConfig(model=str(demo_model_dir), no_auth=True, device="cpu")
    args = vllm_glue.parse_vllm_args(config)
    model_config = AsyncEngineArgs.from_cli_args(args).create_model_config()
    built = {}
    try:
        for tasks, env in VARIANTS:
            for name, value in env.items():
                mp.setenv(name, value)
            app = vllm_glue.make_openai_app(args, tasks, model_config)
            built[tasks] = (app, routes_of(app))
            mp.undo()
    finally:
        mp.undo()
    return built


def gateway_over(app) -> Gateway:
    state = ServerState(app=app, last_probe_ok=time.monotonic())
    return Gateway(state, api_keys=[KEY], admin_key_digests=[key_digest(ADMIN)])


def is_gateway_404(response: httpx.Response) -> bool:
    return response.status_code == 404 and response.json()["error"]["message"].startswith(
        "no route "
    )


def test_every_vllm_route_is_public_or_admin_only(vllm_routes) -> None:
    paths = {path for _, routes in vllm_routes.values() for _, path in routes}
    public = {p for p in paths if is_public_route(p)}
    admin = paths - public
    # The allowlist matches what vLLM really offers, and the enumeration is not vacuous.
    assert GENERATE_PUBLIC <= public <= PUBLIC_PATHS
    assert "/v1/embeddings" in public
    assert admin >= MUST_BE_ADMIN, MUST_BE_ADMIN - admin
    assert len(admin) >= 30, sorted(admin)


async def test_user_key_gets_404_on_every_operational_route(vllm_routes) -> None:
    checked = 0
    for app, routes in vllm_routes.values():
        transport = httpx.ASGITransport(app=gateway_over(app), raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            for method, path in routes:
                user = await c.request(
                    method, path, json={}, headers={"Authorization": f"Bearer {KEY}"}
                )
                if is_public_route(path):
                    assert not is_gateway_404(user), (method, path)
                    continue
                assert is_gateway_404(user), (method, path, user.status_code, user.text)
                assert set(user.json()["error"]) == {"message", "type", "param", "code"}
                admin = await c.request(
                    method, path, json={}, headers={"Authorization": f"Bearer {ADMIN}"}
                )
                assert not is_gateway_404(admin), (method, path)
                checked += 1
    assert checked >= 30


# --- how the admin keys and limits reach the replica -------------------------------------------


def key_file(path: Path, *keys: str) -> Path:
    path.write_text("".join(f"{k}\n" for k in keys))
    path.chmod(0o600)
    return path


def test_admin_keys_reach_the_replica_as_digests_only(tmp_path: Path) -> None:
    import pickle

    from serve.app import build_application
    from serve.config import load_config

    admin_file = key_file(tmp_path / "admin", "sk-admin-secret")
    config = load_config(model="org/m", api_keys=["sk-user-secret"], admin_key_file=admin_file)
    bound = build_application(config, config.resolved_api_keys())._bound_deployment
    blob = pickle.dumps((bound.init_args, bound.init_kwargs))
    assert b"sk-admin-secret" not in blob and str(admin_file).encode() not in blob
    assert bound.init_args[2] == [key_digest("sk-admin-secret")]
    assert bound.init_args[0].admin_key_file is None
    # Without the file no admin key exists: operational routes stay 404.
    plain = load_config(model="org/m", api_keys=["sk-user-secret"])
    assert build_application(plain, ["sk-user-secret"])._bound_deployment.init_args[2] == []


def test_admin_key_file_is_checked(tmp_path: Path) -> None:
    from cluster.errors import ConfigError
    from serve.config import load_config

    shared = key_file(tmp_path / "admin", "sk-same")
    with pytest.raises(ConfigError, match="admin key is also an API key"):
        load_config(model="org/m", api_keys=["sk-same"], admin_key_file=shared)
    loose = key_file(tmp_path / "loose", "sk-admin")
    loose.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        load_config(model="org/m", api_keys=["sk-user"], admin_key_file=loose)
    with pytest.raises(ConfigError, match="bare host names"):
        load_config(model="org/m", api_keys=["k"], allowed_media_domains=["https://a.example/"])


def test_limits_have_defaults_and_reach_vllm(demo_model_dir: Path) -> None:
    from serve.app import MEDIA_REDIRECTS_ENV, USER_CODE_THREAD_ENV, replica_env

    config = ServeConfig(model=str(demo_model_dir), api_keys=["k"], device="cpu")
    assert (config.request_timeout_s, config.stream_idle_timeout_s) == (600.0, 120.0)
    assert (config.max_n, config.max_tokens_limit) == (16, 32768)
    assert (config.header_timeout_s, config.max_connections) == (30.0, 2048)
    assert replica_env(config)[MEDIA_REDIRECTS_ENV] == "0"
    # The gateway and vLLM on the replica's own event loop (no per-token hop between threads).
    assert replica_env(config)[USER_CODE_THREAD_ENV] == "0"
    args = vllm_glue.parse_vllm_args(config)
    assert args.allowed_media_domains == [vllm_glue.NO_MEDIA_DOMAIN]
    allowed = config.model_copy(update={"allowed_media_domains": ["img.example.com"]})
    assert vllm_glue.parse_vllm_args(allowed).allowed_media_domains == ["img.example.com"]
