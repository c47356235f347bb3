"""Server-Sent Events: the parser both clients read event streams with (the wire format of the WHATWG spec)."""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass

_LINE_END = re.compile(r"\r\n|\r|\n")  # the three line endings the spec allows


@dataclass(frozen=True)
class Event:
    name: str  # "message" when the stream named none
    data: str
    id: str | None = None


class EventParser:
    """Feed lines (without their line ending); ``feed`` returns the event a blank line completes, else None.

    Comment lines (``: keep-alive``) and unknown fields are skipped, as the
    spec says; multi-line ``data`` is joined with newlines.
    """

    def __init__(self) -> None:
        self._name = ""
        self._data: list[str] = []
        self._id: str | None = None

    def feed(self, line: str) -> Event | None:
        if line == "":
            if not self._data:
                self._name = ""
                return None
            event = Event(self._name or "message", "\n".join(self._data), self._id)
            self._name, self._data = "", []
            return event
        if line.startswith(":"):
            return None
        field, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if field == "event":
            self._name = value
        elif field == "data":
            self._data.append(value)
        elif field == "id":
            self._id = value
        return None


class LineSplitter:
    """Feed the stream's bytes as they arrive; ``feed`` returns the lines they complete, without their endings.

    A line may end in CR LF, LF or CR; a CR that ends a chunk is held back, as
    the LF that would make it one ending may start the next chunk. UTF-8 (the
    spec's only encoding) may also split across chunks. An unfinished last line
    is never returned: the spec drops an event the stream did not complete.
    """

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._rest = ""

    def feed(self, chunk: bytes) -> list[str]:
        text = self._rest + self._decoder.decode(chunk)
        held = "\r" if text.endswith("\r") else ""
        lines = _LINE_END.split(text[:-1] if held else text)
        self._rest = lines.pop() + held
        return lines
