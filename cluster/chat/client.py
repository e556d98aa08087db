"""The endpoint side of a chat: the ``openai`` client and the model to ask for, one streamed
answer with its stats (AnswerStats, format_stats), and API errors turned into ours."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cluster.chat.eos import eos_logit_bias, lookup_eos_token_ids
from cluster.chat.session import ChatSettings, SamplingOptions
from cluster.endpoint import ApiTarget
from cluster.errors import ConfigError, LlamaclusterError, NotReadyError, RemoteError


@dataclass
class AnswerStats:
    """How one answer went: tokens, time to first token, total time, why it ended."""

    tokens: int
    ttft_s: float | None
    total_s: float
    finish_reason: str | None
    interrupted: bool = False
    prompt_tokens: int | None = None

    @property
    def tokens_per_s(self) -> float | None:
        """Generation speed after the first token (None with fewer than two tokens)."""
        if self.ttft_s is None or self.tokens < 2 or self.total_s <= self.ttft_s:
            return None
        return (self.tokens - 1) / (self.total_s - self.ttft_s)


def format_stats(stats: AnswerStats) -> str:
    """The one line shown after an answer."""
    parts = [f"{stats.tokens} tokens"]
    parts.append(f"TTFT {stats.ttft_s * 1000:.0f} ms" if stats.ttft_s is not None else "TTFT -")
    rate = stats.tokens_per_s
    parts.append(f"{rate:.1f} tok/s" if rate is not None else "- tok/s")
    if stats.prompt_tokens is not None:
        parts.append(f"prompt {stats.prompt_tokens} tokens")
    if stats.interrupted:
        parts.append("stopped")
    elif stats.finish_reason:
        parts.append(f"finish {stats.finish_reason}")
    return " · ".join(parts)


def _api_error(exc: Exception, base_url: str) -> LlamaclusterError:
    import openai

    if isinstance(exc, openai.AuthenticationError):
        return ConfigError(
            f"{base_url} refused the API key",
            hint="pass --api-key-file (or --name CLUSTER to use the cluster's key)",
        )
    if isinstance(exc, openai.APIConnectionError):
        return NotReadyError(
            f"cannot reach {base_url}",
            hint="check the URL and that the server runs (`llamacluster status`)",
        )
    if isinstance(exc, openai.APIStatusError):
        message = str(exc.message or exc).splitlines()[0]
        return RemoteError(f"the server answered {exc.status_code}: {message}")
    return RemoteError(f"request to {base_url} failed: {exc}")


def make_client(target: ApiTarget, *, timeout_s: float = 600.0):
    """An official ``openai`` client for the target (no retries: a person is waiting)."""
    import openai

    from cluster.endpoint import client_ssl_context

    context = client_ssl_context(target.ca_cert)
    return openai.OpenAI(
        base_url=target.base_url,
        api_key=target.api_key or "none",
        timeout=timeout_s,
        max_retries=0,
        # A certificate to trust (--ca-cert, a cluster's own): openai's client, that context.
        http_client=openai.DefaultHttpxClient(verify=context) if context else None,
    )


def resolve_model(client: Any, target: ApiTarget) -> str:
    """The model to ask for: the target's, else the first one the endpoint lists."""
    if target.model:
        return target.model
    try:
        models = [m.id for m in client.models.list()]
    except Exception as exc:
        raise _api_error(exc, target.base_url) from None
    if not models:
        raise RemoteError(f"{target.base_url}/models lists no model", hint="pass --model")
    return models[0]


def stream_answer(
    client: Any,
    *,
    model: str,
    messages: list[dict[str, str]],
    options: SamplingOptions,
    write: Callable[[str], None],
) -> tuple[str, AnswerStats]:
    """Ask for a streamed answer, ``write`` each piece as it arrives, return text and stats.

    Ctrl-C (KeyboardInterrupt) stops the answer: the stream is closed, so the server sees the
    client leave and aborts the request; what arrived so far is returned, marked interrupted.
    """
    start = time.perf_counter()
    first: float | None = None
    pieces: list[str] = []
    chunks = 0
    finish: str | None = None
    usage = None
    interrupted = False
    stream = None
    try:
        stream = client.chat.completions.create(
            model=model,
            messages=messages,
            stream=True,
            stream_options={"include_usage": True},
            **options.request_fields(),
        )
        for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                text = choice.delta.content if choice.delta else None
                if text is not None:
                    chunks += 1
                    if first is None:
                        first = time.perf_counter() - start
                    pieces.append(text)
                    write(text)
                if choice.finish_reason:
                    finish = choice.finish_reason
    except KeyboardInterrupt:
        interrupted = True
    except LlamaclusterError:
        raise
    except Exception as exc:
        raise _api_error(exc, str(client.base_url).rstrip("/")) from None
    finally:
        if stream is not None:
            stream.close()
    total = time.perf_counter() - start
    tokens = usage.completion_tokens if usage is not None else chunks
    stats = AnswerStats(
        tokens=tokens,
        ttft_s=first,
        total_s=total,
        finish_reason=finish,
        interrupted=interrupted,
        prompt_tokens=usage.prompt_tokens if usage is not None else None,
    )
    return "".join(pieces), stats


def prepare(settings: ChatSettings) -> tuple[Any, str]:
    """Client and model name; with an EOS bias, the ``logit_bias`` set on the options."""
    client = make_client(settings.target)
    model = resolve_model(client, settings.target)
    if settings.eos_bias is not None and settings.eos_bias != 0:
        ids = lookup_eos_token_ids(settings.target, model)
        bias = eos_logit_bias(ids, settings.eos_bias)
        settings.options.logit_bias = {**(settings.options.logit_bias or {}), **bias}
    return client, model
