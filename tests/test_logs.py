"""Structured logs: whatever reaches the log, in JSON format every line is one JSON event."""

from __future__ import annotations

import contextvars
import io
import json
import logging
import threading
import warnings
from collections.abc import Iterator

import pytest

from p2pnn import logs


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    """logs.configure into a buffer; the logging and threading state it changes is put back afterwards."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, logging.getLogger("p2pnn").level, threading.excepthook)
    buf = io.StringIO()
    logs.configure("info", "json", buf)
    try:
        yield buf
    finally:
        logging.captureWarnings(False)
        root.handlers[:], root.level = saved[0], saved[1]
        logging.getLogger("p2pnn").setLevel(saved[2])
        threading.excepthook = saved[3]


def _events(buf: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in buf.getvalue().splitlines()]  # fails on any line that is not JSON


def test_a_threads_uncaught_exception_is_one_json_event(json_log):
    def crash() -> None:
        raise ValueError("two\nlines")

    thread = threading.Thread(target=crash, name="crasher")
    thread.start()
    thread.join()
    [event] = [e for e in _events(json_log) if e["event"] == "thread.crashed"]
    assert event["thread"] == "crasher" and event["level"] == "error"
    assert "Traceback" in event["exc"] and event["exc"].endswith("ValueError: two\nlines")


def test_python_warnings_are_json_events(json_log):
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("mind the gap", UserWarning)
    [event] = [e for e in _events(json_log) if e["logger"] == "py.warnings"]
    assert "UserWarning: mind the gap" in event["event"]


def test_events_carry_bound_fields_and_mask_secrets(json_log):
    def in_a_node() -> None:  # in a context of its own, so the bound field does not outlive the test
        logs.bind(node="abc")
        logs.get("p2pnn.test").info("thing.happened", api_token="t0ps3cret", count=2)

    contextvars.copy_context().run(in_a_node)
    [event] = [e for e in _events(json_log) if e["event"] == "thing.happened"]
    assert (event["node"], event["count"], event["api_token"]) == ("abc", 2, "***")


def test_a_workers_own_notice_is_info_and_anything_else_on_its_stderr_a_warning(json_log):
    from p2pnn.compute import pool

    pool._log_stderr(4242, bytearray(b"p2pnn worker 4242: torch 2.13.0 imported in 1.10 s in the background\n"))
    pool._log_stderr(4242, bytearray(b"p2pnn worker 999: not this worker's prefix\n"))
    pool._log_stderr(4242, bytearray(b"p2pnn worker 4242: first line\nTraceback (most recent call last):\n"))
    notice, foreign, traceback = _events(json_log)
    assert (notice["level"], notice["event"], notice["text"]) == (
        "info", "worker.notice", "torch 2.13.0 imported in 1.10 s in the background")
    assert (foreign["level"], foreign["event"]) == ("warning", "worker.stderr")
    assert (traceback["level"], traceback["event"]) == ("warning", "worker.stderr") and "Traceback" in traceback["text"]
