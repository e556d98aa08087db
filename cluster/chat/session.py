"""A chat session's state and commands: its settings and sampling options, the history
(Conversation, saved as JSON), and the slash commands (/reset /system /save /help /quit)."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cluster.chat.terminal import Terminal
from cluster.endpoint import ApiTarget
from cluster.errors import ConfigError, LlamaclusterError

HELP_TEXT = """\
commands:
  /reset          forget the conversation (keeps the system prompt)
  /system TEXT    set the system prompt (empty TEXT removes it) and start over
  /save FILE      write the conversation as JSON
  /help           this text
  /quit           leave (Ctrl-D too)
input: end a line with \\ to continue it; a line \"\"\" starts and ends a multi-line block.
Ctrl-C stops the current answer and keeps the chat open."""


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
class ChatSettings:
    """What one chat run uses: where, which model, how to sample, how to show stats."""

    target: ApiTarget
    options: SamplingOptions
    system: str | None = None
    eos_bias: float | None = None
    show_stats: bool = True


def parse_command(text: str) -> tuple[str, str] | None:
    """``("/save", "FILE")`` for a slash command, None for a message."""
    stripped = text.strip()
    if not stripped.startswith("/") or "\n" in stripped:
        return None
    word, _, rest = stripped.partition(" ")
    return word.lower(), rest.strip()


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
