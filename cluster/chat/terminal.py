"""The terminal a chat talks through: where it writes (Terminal: the answer to stdout, notes
to stderr) and how it reads one message (read_message: continued lines, triple-quote blocks)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


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
