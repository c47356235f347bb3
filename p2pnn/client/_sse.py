"""Server-Sent Events: the parser both clients read event streams with (the wire format of the WHATWG spec)."""

from __future__ import annotations

from dataclasses import dataclass


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
