"""The terminal loop: one answer for ``--prompt`` (ask_once), or the interactive chat that
reads messages and commands and streams answers until /quit or end of input (run_chat)."""

from __future__ import annotations

from collections.abc import Callable

from cluster.chat.client import AnswerStats, format_stats, prepare, stream_answer
from cluster.chat.session import ChatSettings, Conversation, _run_command, parse_command
from cluster.chat.terminal import Terminal, read_message
from cluster.errors import LlamaclusterError


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
