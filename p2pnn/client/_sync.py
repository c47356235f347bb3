"""Client: the node's REST API from plain (blocking) Python code."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from p2pnn.client import _calls
from p2pnn.client._calls import Call
from p2pnn.client._errors import ClientError, ConnectError, TaskTimeout
from p2pnn.client._http import EVENT_STREAM_HEADERS, STREAM_BROKEN, TRANSPORT_ERRORS
from p2pnn.client._wire import SyncPool
from p2pnn.client._settings import endpoint
from p2pnn.client._sse import EventParser, LineSplitter

OnUpdate = Callable[[dict[str, Any]], Any]


class Client:
    """A node's REST API, blocking; the same methods as ``AsyncClient``.

    Without ``url``, the node URL and the token come from ``$P2PNN_URL`` /
    ``$P2PNN_TOKEN``, else the client config file; with one, exactly the ``url``
    and ``token`` given are used (None: no token).

    Resource handling: use as ``with Client(url, token) as c``; the connection
    pool closes on exit (or call ``close``).

    Error handling: an error answer raises an ``ApiError`` subclass
    (``NotFound``, ``Forbidden``, ...); no answer at all raises ``ConnectError``.
    """

    def __init__(self, url: str | None = None, token: str | None = None, *, timeout: float = 30.0) -> None:
        self._node = endpoint(url, token, timeout)
        self.url = self._node.url
        self._http = SyncPool(self._node.route())

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _send(self, call: Call) -> Any:
        try:
            resp = self._http.request(**self._node.request(call))
        except TRANSPORT_ERRORS as exc:
            raise ConnectError(f"{self.url}: {exc or type(exc).__name__}") from exc
        return _calls.parse(resp, call)

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        """Any route, for what has no method of its own; errors as for the methods."""
        return self._send(Call(method, path, **kwargs))

    # --- tasks ---

    def submit(self, spec: dict[str, Any], *, idempotency_key: str | None = None, wait: float | None = None) -> dict[str, Any]:
        """Submit one task spec; returns the task (state ``pending`` or later). With ``wait``
        (seconds, at most 60) the node answers once the task is terminal or the wait is over:
        a submit and a long poll in one request."""
        return self._send(_calls.submit(spec, idempotency_key, wait))

    def submit_many(
        self, specs: list[dict[str, Any]], *, idempotency_key: str | None = None, wait: float | None = None
    ) -> list[dict[str, Any]]:
        """Submit several specs in one request: all are stored, or none. ``wait`` as for ``submit``,
        until every task is terminal."""
        return self._send(_calls.submit_many(specs, idempotency_key, wait))

    def get(self, task_id: str, *, wait: float | None = None) -> dict[str, Any]:
        """The task; with ``wait`` (seconds, at most 60) a long poll: the node answers once the
        task is terminal or the wait is over."""
        return self._send(_calls.get(task_id, wait))

    def list(self, **params: Any) -> dict[str, Any]:
        """One page: ``{"tasks": [...], "next_cursor": ...}``; params ``state``, ``kind``, ``limit``, ``cursor``."""
        return self._send(_calls.list_tasks(params))

    def cancel(self, task_id: str) -> dict[str, Any]:
        return self._send(_calls.cancel(task_id))

    def artifact(self, task_id: str, name: str) -> bytes:
        """An artifact's bytes, e.g. ``model.safetensors`` of a train task."""
        return self._send(_calls.artifact(task_id, name))

    def progress(self, task_id: str) -> dict[str, Any]:
        """The per-epoch series of a task so far."""
        return self._send(_calls.progress(task_id))

    # --- the swarm ---

    def nodes(self) -> list[dict[str, Any]]:
        return self._send(_calls.nodes())

    def cluster(self) -> dict[str, Any]:
        return self._send(_calls.cluster())

    # --- waiting ---

    def wait(self, task_id: str, *, timeout: float | None = 600.0, on_update: OnUpdate | None = None) -> dict[str, Any]:
        """Until the task is terminal; returns it (succeeded, failed or cancelled alike).

        ``on_update(task)`` is called with the first snapshot and then only when
        the state, attempt, progress or error changed; it follows the node's
        event stream as ``AsyncClient.wait`` does.

        Error handling: raises TaskTimeout past ``timeout`` (None: no limit; the
        task keeps running), NotFound for an unknown id, ConnectError if the node is gone.
        """
        deadline = _Deadline(task_id, timeout, time.monotonic() + (math.inf if timeout is None else timeout))
        changed = _calls.ChangeFilter(on_update)

        try:
            return self._follow(task_id, changed, deadline)
        except ClientError as exc:
            if not _calls.route_missing(exc):
                raise
        return self._poll(task_id, changed, deadline)

    def _follow(self, task_id: str, changed: _calls.ChangeFilter, deadline: _Deadline) -> dict[str, Any]:
        node = self._node
        url = node.target(_calls.task_events_path(task_id))
        headers = node.headers + EVENT_STREAM_HEADERS
        while True:
            # A blocking read cannot be cancelled: bound each read by the time left instead.
            timeouts = node.timeouts(read=min(deadline.left(), _calls.STREAM_READ_TIMEOUT))
            try:
                with self._http.stream("GET", url, headers, timeouts) as resp:
                    if resp.status >= 400:
                        resp.read()
                        raise _calls.error_of(resp)
                    lines, parser = LineSplitter(), EventParser()
                    for chunk in resp.iter_stream():
                        for line in lines.feed(chunk):
                            event = parser.feed(line)
                            if event is not None and event.name == "task":
                                task = json.loads(event.data)
                                changed(task)
                                if _calls.is_terminal(task):
                                    return task
                        deadline.left()
            except STREAM_BROKEN:
                pass  # the stream broke or stayed silent; open it again (or time out above)
            except TRANSPORT_ERRORS as exc:
                raise ConnectError(f"{self.url}: {exc or type(exc).__name__}") from exc
            time.sleep(min(_calls.RECONNECT_SECONDS, deadline.left()))

    def _poll(self, task_id: str, changed: _calls.ChangeFilter, deadline: _Deadline) -> dict[str, Any]:
        while True:
            task = self.get(task_id)
            changed(task)
            if _calls.is_terminal(task):
                return task
            time.sleep(min(_calls.POLL_SECONDS, deadline.left()))



@dataclass(frozen=True)
class _Deadline:
    task_id: str
    seconds: float | None
    at: float

    def left(self) -> float:
        """Seconds left. Error handling: raises TaskTimeout once none are."""
        left = self.at - time.monotonic()
        if left <= 0:
            raise TaskTimeout(self.task_id, self.seconds)
        return left
