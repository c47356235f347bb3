"""Structured logging: one event per line, with the node id, term and task id where they apply.

``log = logs.get(__name__)`` then ``log.info("task.claimed", task_id=t.id)``.
Fields bound with :func:`bind` (the node id at start, the term when it
changes) ride along on every event of the current trio task and the tasks it
starts. Secrets are never passed as fields; values whose key names a secret
are masked anyway as a second line of defence.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import threading
import time
from typing import Any

_bound: contextvars.ContextVar[dict[str, Any]] = contextvars.ContextVar("p2pnn_log_fields", default={})
_SECRET_WORDS = ("token", "secret", "password", "authorization", "key")


def bind(**fields: Any) -> None:
    """Add fields to every later event of this context (and of trio tasks started from it)."""
    _bound.set({**_bound.get(), **fields})


def _masked(fields: dict[str, Any]) -> dict[str, Any]:
    return {k: ("***" if any(w in k.lower() for w in _SECRET_WORDS) else v) for k, v in fields.items()}


class EventLogger:
    def __init__(self, name: str) -> None:
        self._logger = logging.getLogger(name)

    def _log(self, level: int, event: str, fields: dict[str, Any]) -> None:
        if self._logger.isEnabledFor(level):
            self._logger.log(level, event, extra={"p2pnn_fields": _masked({**_bound.get(), **fields})})

    def debug(self, event: str, **fields: Any) -> None:
        self._log(logging.DEBUG, event, fields)

    def info(self, event: str, **fields: Any) -> None:
        self._log(logging.INFO, event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._log(logging.WARNING, event, fields)

    def error(self, event: str, **fields: Any) -> None:
        self._log(logging.ERROR, event, fields)


def get(name: str) -> EventLogger:
    return EventLogger(name)


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "event": record.getMessage(),
            "logger": record.name,
        }
        out.update(getattr(record, "p2pnn_fields", {}))
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "p2pnn_fields", {})
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        extra = " ".join(f"{k}={v}" for k, v in fields.items())
        line = f"{stamp} {record.levelname.lower():7} {record.getMessage()} {extra}".rstrip()
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def configure(level: str = "info", fmt: str = "json", stream: Any = None) -> None:
    """Send p2pnn's events (and the libraries' warnings) to stderr, one line each."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(_JsonFormatter() if fmt == "json" else _TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("p2pnn").setLevel(level.upper())
    # hypercorn logs every request at INFO through its own loggers; our API logs what matters.
    for noisy in ("hypercorn.access", "hypercorn.error", "quart.app", "quart.serving"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # Python's warnings and a thread's uncaught exception would otherwise be raw lines on stderr,
    # breaking a JSON log: they become events like any other.
    logging.captureWarnings(True)
    threading.excepthook = _log_thread_exception


def _log_thread_exception(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return
    thread = args.thread.name if args.thread is not None else "?"
    logging.getLogger("p2pnn.thread").error(
        "thread.crashed", exc_info=(args.exc_type, args.exc_value, args.exc_traceback),  # type: ignore[arg-type]
        extra={"p2pnn_fields": {"thread": thread}},
    )
