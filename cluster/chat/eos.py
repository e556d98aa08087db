"""The EOS token id of the chat's model, for ``--eos-bias``: read from the model's files
(a local directory, or the one the server loaded when it exists here), else asked of the
server's ``/tokenize``; and the ``logit_bias`` map that shifts it."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from cluster.endpoint import ApiTarget
from cluster.errors import ConfigError, NotReadyError

# End-of-sequence markers of common tokenizer families; a server that maps one of them to a
# single token has it as a special token, which is what generation stops on.
EOS_CANDIDATES = (
    "<|eot_id|>",
    "<|end_of_text|>",
    "<|im_end|>",
    "<|endoftext|>",
    "<|end|>",
    "<end_of_turn>",
    "<eos>",
    "</s>",
)
# OpenAI documents logit_bias values between -100 and 100.
BIAS_LIMIT = 100.0


def _as_ids(value: Any) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, list) and all(isinstance(v, int) for v in value):
        return list(value)
    return []


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def eos_token_ids_from_dir(model_dir: Path) -> list[int]:
    """The ids a model stops on, from its files: ``generation_config.json`` (what vLLM uses),
    else ``config.json``, else the ``eos_token`` of ``tokenizer_config.json`` looked up in
    ``tokenizer.json``. Empty when none of them says."""
    model_dir = Path(model_dir)
    for name in ("generation_config.json", "config.json"):
        ids = _as_ids(_read_json(model_dir / name).get("eos_token_id"))
        if ids:
            return ids
    eos = _read_json(model_dir / "tokenizer_config.json").get("eos_token")
    if isinstance(eos, dict):
        eos = eos.get("content")
    if not isinstance(eos, str):
        return []
    tokenizer = _read_json(model_dir / "tokenizer.json")
    for added in tokenizer.get("added_tokens") or []:
        if isinstance(added, dict) and added.get("content") == eos and "id" in added:
            return [int(added["id"])]
    vocab = (tokenizer.get("model") or {}).get("vocab")
    if isinstance(vocab, dict) and isinstance(vocab.get(eos), int):
        return [vocab[eos]]
    return []


def _server_root(http: Any, target: ApiTarget, model: str) -> Path | None:
    """The model directory the server loaded (vLLM's ``root`` in /v1/models) when it is a
    directory here too (a local cluster, a shared directory)."""
    response = http.get(f"{target.base_url}/models")
    if response.status_code != 200:
        return None
    for card in response.json().get("data") or []:
        root = card.get("root")
        if card.get("id") == model and isinstance(root, str) and Path(root).is_dir():
            return Path(root)
    return None


def _server_eos_ids(http: Any, target: ApiTarget, model: str) -> list[int] | None:
    """EOS ids found through vLLM's ``/tokenize``: the first known end marker that the server's
    tokenizer maps to one token. None when the server has no /tokenize."""
    root = target.base_url.removesuffix("/v1")
    for candidate in EOS_CANDIDATES:
        response = http.post(
            f"{root}/tokenize",
            json={"model": model, "prompt": candidate, "add_special_tokens": False},
        )
        if response.status_code in (404, 405):
            return None
        if response.status_code != 200:
            continue
        tokens = response.json().get("tokens") or []
        if len(tokens) == 1:
            return [int(tokens[0])]
    return []


def lookup_eos_token_ids(target: ApiTarget, model: str, *, timeout_s: float = 30.0) -> list[int]:
    """The model's EOS token ids: from a local model directory (``--model-dir``, the cluster's
    shared model directory, or the server's own path when it exists here), else from the
    server's ``/tokenize``; ConfigError when neither can tell."""
    import httpx

    if target.model_dir is not None:
        ids = eos_token_ids_from_dir(target.model_dir)
        if ids:
            return ids
    headers = {"Authorization": f"Bearer {target.api_key}"} if target.api_key else {}
    try:
        with httpx.Client(headers=headers, timeout=timeout_s, trust_env=False) as http:
            root = _server_root(http, target, model)
            ids = eos_token_ids_from_dir(root) if root is not None else []
            if ids:
                return ids
            server_ids = _server_eos_ids(http, target, model)
    except httpx.HTTPError as exc:
        raise NotReadyError(f"cannot reach {target.base_url}: {exc}") from None
    if server_ids:
        return server_ids
    raise ConfigError(
        f"cannot find the EOS token id of {model!r} for --eos-bias",
        hint="pass --model-dir with the model's tokenizer files (generation_config.json, "
        "tokenizer.json)" + ("; the server has no /tokenize" if server_ids is None else ""),
    )


def eos_logit_bias(eos_ids: Iterable[int], bias: float) -> dict[str, float]:
    """The ``logit_bias`` map that adds ``bias`` (clamped to ±100) to every EOS token id."""
    value = max(-BIAS_LIMIT, min(BIAS_LIMIT, float(bias)))
    return {str(i): value for i in sorted(set(eos_ids))}
