"""An incremental Server-Sent Events parser: bytes in as they arrive, whole events out."""

from __future__ import annotations

import codecs
from dataclasses import dataclass


@dataclass(frozen=True)
class SseEvent:
    """One dispatched event: its type ('message' unless the server named one) and data."""

    event: str
    data: str


class SseParser:
    """Feeds raw response bytes, returns events completed by each feed (WHATWG SSE rules).

    Events may span network chunks and one chunk may hold several events; line ends may be
    CRLF, LF or CR; comment lines (':' first) are skipped; several data lines join with '\\n'.
    """

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = ""
        self._data: list[str] = []
        self._event = ""

    def feed(self, chunk: bytes) -> list[SseEvent]:
        """Add bytes; return the events whose terminating blank line arrived."""
        text = self._pending + self._decoder.decode(chunk)
        # A CR at the very end may be the first half of a CRLF: keep it for the next feed.
        if text.endswith("\r"):
            self._pending, text = "\r", text[:-1]
        else:
            self._pending = ""
        text = text.replace("\r\n", "\n").replace("\r", "\n")
        *lines, rest = text.split("\n")
        self._pending = rest + self._pending
        events: list[SseEvent] = []
        for line in lines:
            self._line(line, events)
        return events

    def close(self) -> list[SseEvent]:
        """End of stream: a last event without its blank line is dispatched too."""
        events: list[SseEvent] = []
        tail = self._pending.rstrip("\r")
        self._pending = ""
        if tail:
            self._line(tail, events)
        self._line("", events)
        return events

    def _line(self, line: str, events: list[SseEvent]) -> None:
        if line == "":
            if self._data:
                events.append(SseEvent(self._event or "message", "\n".join(self._data)))
            self._data, self._event = [], ""
            return
        if line.startswith(":"):
            return
        field, sep, value = line.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        if field == "data":
            self._data.append(value)
        elif field == "event":
            self._event = value
        # 'id' and 'retry' do not matter to a benchmark client.
