"""One streamed OpenAI request timed at the chunk level: TTFT, token chunk times, usage, errors."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import aiohttp

from cluster.bench.config import ApiKind, Endpoint
from cluster.bench.sse import SseParser
from cluster.bench.workload import BenchRequest

# Error kinds (the keys of the errors-by-kind table).
TIMEOUT = "timeout"
CONNECT = "connect"
DISCONNECT = "disconnect"
STREAM_ERROR = "stream_error"
EMPTY = "empty_response"
BAD_RESPONSE = "bad_response"


@dataclass
class RequestRecord:
    """What one request did; times are seconds, relative to its own start unless named *_at."""

    index: int
    endpoint: str
    point: str
    round: int
    started_at: float = 0.0
    finished_at: float = 0.0
    scheduled_at: float | None = None
    ok: bool = False
    error_kind: str | None = None
    error_detail: str | None = None
    status: int | None = None
    ttft_s: float | None = None
    e2e_s: float | None = None
    token_chunk_times: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int | None = None
    token_source: str | None = None  # usage | tokenizer | chunks
    prompt_source: str | None = None  # usage | tokenizer | approx
    max_tokens: int = 0
    finish_reason: str | None = None
    output_chars: int = 0
    # Seconds the server asked the client to wait (a 429/503's Retry-After), if it did.
    retry_after_s: float | None = None

    @property
    def token_chunks(self) -> int:
        """Number of chunks that carried output text."""
        return len(self.token_chunk_times)

    @property
    def itls(self) -> list[float]:
        """Gaps between consecutive token-carrying chunks (seconds)."""
        t = self.token_chunk_times
        return [b - a for a, b in itertools.pairwise(t)]

    @property
    def tpot_s(self) -> float | None:
        """(E2E − TTFT) / (output tokens − 1); None with fewer than two tokens."""
        if not self.ok or self.output_tokens < 2 or self.ttft_s is None or self.e2e_s is None:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)

    def to_json(self) -> dict[str, Any]:
        """The record with derived figures, for the per-request JSONL."""
        data = asdict(self)
        data["token_chunks"] = self.token_chunks
        data["tpot_s"] = self.tpot_s
        return data


def build_payload(
    request: BenchRequest,
    *,
    api: ApiKind,
    model: str,
    ignore_eos: bool,
    include_usage: bool,
    temperature: float | None,
    extra_body: dict,
) -> dict[str, Any]:
    """The JSON body of a streamed chat or completions request."""
    body: dict[str, Any] = {"model": model, "max_tokens": request.max_tokens, "stream": True}
    if api == "chat":
        body["messages"] = request.as_messages()
    else:
        body["prompt"] = request.as_prompt()
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    if ignore_eos:
        body["ignore_eos"] = True
    if temperature is not None:
        body["temperature"] = temperature
    body.update(extra_body)
    return body


def chunk_output(data: dict[str, Any]) -> tuple[bool, str]:
    """Whether a chunk carries generated tokens, and its text.

    A chunk carries tokens when a choice has text, or has an empty text/content field while the
    generation is still running: vLLM sends such chunks for tokens whose bytes do not yet form a
    whole character. Not tokens: a chat stream's role-only first chunk, an empty closing chunk
    that only brings the finish reason, and usage-only chunks (no choices).
    """
    carries, parts = False, []
    for choice in data.get("choices") or ():
        finished = bool(choice.get("finish_reason"))
        if "delta" in choice:
            delta = choice.get("delta") or {}
            text = "".join(
                v
                for k in ("content", "reasoning_content", "reasoning")
                if isinstance(v := delta.get(k), str)
            )
            if delta.get("tool_calls"):
                text += json.dumps(delta["tool_calls"])
            has_field = any(
                isinstance(delta.get(k), str) for k in ("content", "reasoning_content", "reasoning")
            )
            empty_token = has_field and "role" not in delta and not finished
        else:
            text = choice.get("text") if isinstance(choice.get("text"), str) else ""
            empty_token = isinstance(choice.get("text"), str) and not finished
        if text or empty_token or choice.get("token_ids"):
            carries = True
        parts.append(text)
    return carries, "".join(parts)


def _finish_reason(data: dict[str, Any]) -> str | None:
    for choice in data.get("choices") or ():
        if choice.get("finish_reason"):
            return choice["finish_reason"]
    return None


def retry_after_seconds(value: str | None) -> float | None:
    """A Retry-After header's delay in seconds (its number-of-seconds form; an HTTP date or
    anything else is ignored), at most a minute."""
    try:
        seconds = float(value) if value is not None else None
    except ValueError:
        return None
    if seconds is None or not seconds >= 0:
        return None
    return min(seconds, 60.0)


def _error_message(body: bytes) -> str:
    text = body.decode("utf-8", "replace")
    try:
        data = json.loads(text)
        err = data.get("error", data)
        msg = err.get("message") if isinstance(err, dict) else err
        return str(msg or text)[:300]
    except (ValueError, AttributeError):
        return text[:300]


async def send_request(
    client: aiohttp.ClientSession,
    endpoint: Endpoint,
    request: BenchRequest,
    record: RequestRecord,
    *,
    api: ApiKind,
    model: str,
    ignore_eos: bool,
    include_usage: bool = True,
    temperature: float | None = None,
    extra_body: dict | None = None,
    timeout_s: float = 300.0,
) -> tuple[RequestRecord, str]:
    """Send one streamed request and fill ``record``; never raises for server or network faults.

    Returns the record and the generated text (needed only when usage is missing).
    """
    path = "/chat/completions" if api == "chat" else "/completions"
    body = build_payload(
        request,
        api=api,
        model=model,
        ignore_eos=ignore_eos,
        include_usage=include_usage,
        temperature=temperature,
        extra_body=extra_body or {},
    )
    headers = {"Accept": "text/event-stream"}
    if endpoint.api_key is not None:
        headers["Authorization"] = f"Bearer {endpoint.api_key.get_secret_value()}"
    record.max_tokens = request.max_tokens
    text_parts: list[str] = []
    start = time.perf_counter()
    record.started_at = start
    try:
        await asyncio.wait_for(
            _stream(client, endpoint.base_url + path, body, headers, record, text_parts, start),
            timeout=timeout_s,
        )
    except asyncio.TimeoutError:
        record.error_kind, record.error_detail = TIMEOUT, f"no complete answer in {timeout_s:g}s"
    except aiohttp.ClientConnectorError as exc:
        record.error_kind, record.error_detail = CONNECT, str(exc)[:300] or "connection refused"
    except (
        aiohttp.ServerDisconnectedError,
        aiohttp.ClientPayloadError,
        aiohttp.ClientOSError,
    ) as exc:
        record.error_kind = DISCONNECT
        record.error_detail = str(exc)[:300] or type(exc).__name__
    except aiohttp.ClientError as exc:
        record.error_kind, record.error_detail = DISCONNECT, f"{type(exc).__name__}: {exc}"[:300]
    record.finished_at = time.perf_counter()
    record.ok = record.error_kind is None
    if record.ok:
        record.output_chars = sum(len(p) for p in text_parts)
    return record, "".join(text_parts)


async def _stream(
    client: aiohttp.ClientSession,
    url: str,
    body: dict[str, Any],
    headers: dict[str, str],
    record: RequestRecord,
    text_parts: list[str],
    start: float,
) -> None:
    parser = SseParser()
    done = False
    async with client.post(url, json=body, headers=headers) as response:
        record.status = response.status
        if response.status >= 400:
            record.retry_after_s = retry_after_seconds(response.headers.get("Retry-After"))
            raw = await response.read()
            record.error_kind = f"http_{response.status}"
            record.error_detail = _error_message(raw)
            return
        async for chunk in response.content.iter_any():
            now = time.perf_counter() - start
            for event in parser.feed(chunk):
                done = _handle_event(event.event, event.data, now, record, text_parts) or done
                if record.error_kind:
                    return
        end = time.perf_counter() - start
        for event in parser.close():
            done = _handle_event(event.event, event.data, end, record, text_parts) or done
        if record.error_kind:
            return
    record.e2e_s = end
    if not record.token_chunk_times:
        record.error_kind = EMPTY
        record.error_detail = "the stream ended without any generated token"
    elif not done and record.finish_reason is None:
        record.error_kind = DISCONNECT
        record.error_detail = "the stream ended without [DONE] or a finish reason"


def _handle_event(
    event: str, data: str, now: float, record: RequestRecord, text_parts: list[str]
) -> bool:
    """Apply one SSE event to the record; True when it is the [DONE] marker."""
    if data.strip() == "[DONE]":
        return True
    try:
        payload = json.loads(data)
    except ValueError:
        record.error_kind, record.error_detail = BAD_RESPONSE, f"not JSON: {data[:120]!r}"
        return False
    if event == "error" or (isinstance(payload, dict) and "error" in payload):
        err = payload.get("error", payload) if isinstance(payload, dict) else payload
        msg = err.get("message") if isinstance(err, dict) else err
        record.error_kind, record.error_detail = STREAM_ERROR, str(msg)[:300]
        return False
    if not isinstance(payload, dict):
        return False
    carries, text = chunk_output(payload)
    if carries:
        if record.ttft_s is None:
            record.ttft_s = now
        record.token_chunk_times.append(now)
        text_parts.append(text)
    reason = _finish_reason(payload)
    if reason:
        record.finish_reason = reason
    usage = payload.get("usage")
    if isinstance(usage, dict) and usage.get("completion_tokens") is not None:
        record.output_tokens = int(usage["completion_tokens"])
        record.token_source = "usage"
        if usage.get("prompt_tokens") is not None:
            record.prompt_tokens = int(usage["prompt_tokens"])
            record.prompt_source = "usage"
    return False
