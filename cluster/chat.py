"""Terminal chat against an OpenAI-compatible endpoint: streaming, history, slash commands."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cluster.endpoint import ApiTarget
from cluster.errors import ConfigError, LlamaclusterError, NotReadyError, RemoteError

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

HELP_TEXT = """\
commands:
  /reset          forget the conversation (keeps the system prompt)
  /system TEXT    set the system prompt (empty TEXT removes it) and start over
  /save FILE      write the conversation as JSON
  /help           this text
  /quit           leave (Ctrl-D too)
input: end a line with \\ to continue it; a line \"\"\" starts and ends a multi-line block.
Ctrl-C stops the current answer and keeps the chat open."""


# ---------------------------------------------------------------- the EOS token id


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


# ---------------------------------------------------------------- conversation and stats


@dataclass
class SamplingOptions:
    """Sampling parameters as the OpenAI API names them (None: the server's default)."""

    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    seed: int | None = None
    logit_bias: dict[str, float] | None = None

    def request_fields(self) -> dict[str, Any]:
        """The fields to send, without the unset ones."""
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass
class Conversation:
    """The chat so far: an optional system prompt and the user/assistant turns."""

    system: str | None = None
    turns: list[dict[str, str]] = field(default_factory=list)

    def messages(self) -> list[dict[str, str]]:
        """The messages to send: the system prompt first, then every turn."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + list(self.turns)

    def reset(self) -> None:
        """Forget the turns, keep the system prompt."""
        self.turns.clear()

    def set_system(self, text: str) -> None:
        """Set (or with empty text remove) the system prompt and start over."""
        self.system = text.strip() or None
        self.reset()

    def save(self, path: Path, *, model: str, options: SamplingOptions) -> Path:
        """Write the conversation as JSON (atomic: a temp file renamed into place)."""
        from cluster.state import write_private

        path = Path(path).expanduser()
        if not path.parent.is_dir():
            raise ConfigError(f"cannot save to {path}: no directory {path.parent}")
        data = {
            "model": model,
            "sampling": options.request_fields(),
            "messages": self.messages(),
            "saved_at": time.time(),
        }
        write_private(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")
        return path


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

    return openai.OpenAI(
        base_url=target.base_url,
        api_key=target.api_key or "none",
        timeout=timeout_s,
        max_retries=0,
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


# ---------------------------------------------------------------- input


def read_message(read_line: Callable[[str], str], *, prompt: str, more: str) -> str:
    """One user message from ``read_line`` (``input``-like; EOFError ends the chat).

    A line ending in a backslash continues on the next line; a line of three double quotes
    opens a block that the next such line closes.
    """
    line = read_line(prompt)
    if line.strip() == '"""':
        lines: list[str] = []
        while (line := read_line(more)).strip() != '"""':
            lines.append(line)
        return "\n".join(lines)
    lines = []
    while line.endswith("\\"):
        lines.append(line[:-1])
        line = read_line(more)
    lines.append(line)
    return "\n".join(lines)


def parse_command(text: str) -> tuple[str, str] | None:
    """``("/save", "FILE")`` for a slash command, None for a message."""
    stripped = text.strip()
    if not stripped.startswith("/") or "\n" in stripped:
        return None
    word, _, rest = stripped.partition(" ")
    return word.lower(), rest.strip()


# ---------------------------------------------------------------- the sessions


@dataclass
class ChatSettings:
    """What one chat run uses: where, which model, how to sample, how to show stats."""

    target: ApiTarget
    options: SamplingOptions
    system: str | None = None
    eos_bias: float | None = None
    show_stats: bool = True


def prepare(settings: ChatSettings) -> tuple[Any, str]:
    """Client and model name; with an EOS bias, the ``logit_bias`` set on the options."""
    client = make_client(settings.target)
    model = resolve_model(client, settings.target)
    if settings.eos_bias is not None and settings.eos_bias != 0:
        ids = lookup_eos_token_ids(settings.target, model)
        bias = eos_logit_bias(ids, settings.eos_bias)
        settings.options.logit_bias = {**(settings.options.logit_bias or {}), **bias}
    return client, model


class Terminal:
    """Where a chat writes: the answer to ``out``, everything else to ``err``."""

    def __init__(self, out: Any, err: Any) -> None:
        self.out = out
        self.err = err
        self._dim = bool(getattr(err, "isatty", lambda: False)())

    def answer(self, text: str) -> None:
        """Write a piece of the answer at once."""
        self.out.write(text)
        self.out.flush()

    def note(self, text: str, *, dim: bool = False) -> None:
        """A line for the person (stats, help, errors), never mixed into the answer stream."""
        if dim and self._dim:
            text = f"\x1b[2m{text}\x1b[0m"
        self.err.write(text + "\n")
        self.err.flush()


def ask_once(settings: ChatSettings, prompt: str, *, terminal: Terminal) -> AnswerStats:
    """Non-interactive use: one answer to ``prompt`` on stdout, stats on stderr."""
    client, model = prepare(settings)
    convo = Conversation(system=settings.system)
    convo.turns.append({"role": "user", "content": prompt})
    _, stats = stream_answer(
        client, model=model, messages=convo.messages(), options=settings.options,
        write=terminal.answer,
    )  # fmt: skip
    terminal.answer("\n")
    if settings.show_stats:
        terminal.note(format_stats(stats), dim=True)
    if stats.interrupted:
        raise KeyboardInterrupt
    return stats


def run_chat(
    settings: ChatSettings,
    *,
    terminal: Terminal,
    read_line: Callable[[str], str] = input,
) -> Conversation:
    """The interactive loop: read a message or a command, stream the answer, repeat until
    /quit or end of input. Errors of one request are shown and the chat goes on."""
    client, model = prepare(settings)
    convo = Conversation(system=settings.system)
    terminal.note(
        f"chat with {model} at {settings.target.base_url} (/help for commands, /quit to leave)",
        dim=True,
    )
    while True:
        try:
            text = read_message(read_line, prompt="you> ", more="... ")
        except EOFError:
            terminal.note("")
            return convo
        except KeyboardInterrupt:
            terminal.note("\n(input dropped; /quit or Ctrl-D to leave)", dim=True)
            continue
        command = parse_command(text)
        if command is not None:
            if _run_command(command, convo, settings=settings, model=model, terminal=terminal):
                return convo
            continue
        if not text.strip():
            continue
        convo.turns.append({"role": "user", "content": text})
        try:
            answer, stats = stream_answer(
                client, model=model, messages=convo.messages(), options=settings.options,
                write=terminal.answer,
            )  # fmt: skip
        except LlamaclusterError as exc:
            convo.turns.pop()
            terminal.note(f"error: {exc.one_line()}")
            continue
        terminal.answer("\n")
        # A stopped answer stays in the history as far as it got, as the person saw it.
        convo.turns.append({"role": "assistant", "content": answer})
        if settings.show_stats:
            terminal.note(format_stats(stats), dim=True)


def _run_command(
    command: tuple[str, str],
    convo: Conversation,
    *,
    settings: ChatSettings,
    model: str,
    terminal: Terminal,
) -> bool:
    """Carry out one slash command; True when the chat should end."""
    word, arg = command
    if word in ("/quit", "/exit"):
        return True
    if word == "/reset":
        convo.reset()
        terminal.note("(conversation reset)", dim=True)
    elif word == "/system":
        convo.set_system(arg)
        terminal.note(
            "(system prompt set; conversation reset)" if arg else "(system prompt removed)",
            dim=True,
        )
    elif word == "/save":
        if not arg:
            terminal.note("usage: /save FILE")
            return False
        try:
            path = convo.save(Path(arg), model=model, options=settings.options)
        except (LlamaclusterError, OSError) as exc:
            message = exc.one_line() if isinstance(exc, LlamaclusterError) else str(exc)
            terminal.note(f"error: {message}")
        else:
            terminal.note(f"(saved {len(convo.turns)} messages to {path})", dim=True)
    elif word == "/help":
        terminal.note(HELP_TEXT)
    else:
        terminal.note(f"unknown command {word}; /help lists them")
    return False
