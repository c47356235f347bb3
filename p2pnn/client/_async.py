"""AsyncClient: the node's REST API from asyncio or trio (anyio)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import anyio
from p2pnn.client import _calls
from p2pnn.client._calls import Call
from p2pnn.client._errors import ClientError, ConnectError, TaskTimeout
from p2pnn.client._http import EVENT_STREAM_HEADERS, STREAM_BROKEN, TRANSPORT_ERRORS
from p2pnn.client._wire import AsyncPool
from p2pnn.client._settings import endpoint
from p2pnn.client._sse import EventParser, LineSplitter

WAIT_ALL_POLL_SECONDS = 0.05  # pause after a non-terminal answer (a node without ?wait answers at once)
LONG_POLL_SECONDS = 20.0  # one GET ?wait= of wait_all; the node allows up to 60, and the read timeout is widened to match

OnUpdate = Callable[[dict[str, Any]], Any]


class AsyncClient:
    """A node's REST API under any event loop anyio supports (asyncio, trio).

    Without ``url``, the node URL and the token come from ``$P2PNN_URL`` /
    ``$P2PNN_TOKEN``, else the client config file (``p2pnn.client._settings``);
    with one, exactly the ``url`` and ``token`` given are used (None: no token).

    Resource handling: use as ``async with AsyncClient(url, token) as c``; the
    connection pool closes on exit (or call ``aclose``).

    Error handling: an error answer raises an ``ApiError`` subclass
    (``NotFound``, ``Forbidden``, ...); no answer at all raises ``ConnectError``.
    """

    def __init__(self, url: str | None = None, token: str | None = None, *, timeout: float = 30.0) -> None:
        self._node = endpoint(url, token, timeout)
        self.url = self._node.url
        self._http = AsyncPool(self._node.route())

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _send(self, call: Call) -> Any:
        try:
            resp = await self._http.request(**self._node.request(call))
        except TRANSPORT_ERRORS as exc:
            raise ConnectError(f"{self.url}: {exc or type(exc).__name__}") from exc
        return _calls.parse(resp, call)

    async def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        """Any route, for what has no method of its own; errors as for the methods."""
        return await self._send(Call(method, path, **kwargs))

    # --- tasks ---

    async def submit(
        self, spec: dict[str, Any], *, idempotency_key: str | None = None, wait: float | None = None
    ) -> dict[str, Any]:
        """Submit one task spec; returns the task (state ``pending`` or later). With ``wait``
        (seconds, at most 60) the node answers once the task is terminal or the wait is over:
        a submit and a long poll in one request."""
        return await self._send(_calls.submit(spec, idempotency_key, wait))

    async def submit_many(
        self, specs: list[dict[str, Any]], *, idempotency_key: str | None = None, wait: float | None = None
    ) -> list[dict[str, Any]]:
        """Submit several specs in one request: all are stored, or none. ``wait`` as for ``submit``,
        until every task is terminal."""
        return await self._send(_calls.submit_many(specs, idempotency_key, wait))

    async def get(self, task_id: str, *, wait: float | None = None) -> dict[str, Any]:
        """The task; with ``wait`` (seconds, at most 60) a long poll: the node answers once the
        task is terminal or the wait is over."""
        return await self._send(_calls.get(task_id, wait))

    async def list(self, **params: Any) -> dict[str, Any]:
        """One page: ``{"tasks": [...], "next_cursor": ...}``; params ``state``, ``kind``, ``owner``, ``parent``, ``limit``, ``cursor``."""
        return await self._send(_calls.list_tasks(params))

    async def cancel(self, task_id: str) -> dict[str, Any]:
        return await self._send(_calls.cancel(task_id))

    async def artifact(self, task_id: str, name: str) -> bytes:
        """An artifact's bytes, e.g. ``model.safetensors`` of a train task."""
        return await self._send(_calls.artifact(task_id, name))

    async def progress(self, task_id: str) -> dict[str, Any]:
        """The per-epoch series of a task so far."""
        return await self._send(_calls.progress(task_id))

    # --- the swarm ---

    async def nodes(self) -> list[dict[str, Any]]:
        return await self._send(_calls.nodes())

    async def cluster(self) -> dict[str, Any]:
        return await self._send(_calls.cluster())

    # --- waiting ---

    async def wait(self, task_id: str, *, timeout: float | None = 600.0, on_update: OnUpdate | None = None) -> dict[str, Any]:
        """Until the task is terminal; returns it (succeeded, failed or cancelled alike).

        ``on_update(task)`` is called with the first snapshot and then only when
        the state, attempt, progress or error changed. It follows the node's
        event stream (``GET /api/v1/tasks/{id}/events``), re-opening it if the
        connection drops; against a node without that route it polls.

        Error handling: raises TaskTimeout past ``timeout`` (None: no limit; the
        task keeps running), NotFound for an unknown id, ConnectError if the node is gone.
        """
        changed = _calls.ChangeFilter(on_update)

        try:
            with anyio.fail_after(timeout):
                try:
                    return await self._follow(task_id, changed)
                except ClientError as exc:
                    if not _calls.route_missing(exc):
                        raise
                return await self._poll(task_id, changed)
        except TimeoutError as exc:
            if isinstance(exc, TaskTimeout):
                raise
            raise TaskTimeout(task_id, timeout) from None

    async def wait_all(self, task_ids: list[str], *, timeout: float = 600.0) -> dict[str, dict[str, Any]]:
        """Wait for many tasks; returns id -> terminal task. Raises TaskTimeout past ``timeout``.

        Tasks are waited for in the order given, one long poll (GET ?wait=) at a
        time: tasks run roughly first-in first-out, so the cost is about one
        request per task, answered as soon as the task ends.
        """
        done: dict[str, dict[str, Any]] = {}
        try:
            with anyio.fail_after(timeout):
                for task_id in task_ids:
                    while not _calls.is_terminal(task := await self.get(task_id, wait=LONG_POLL_SECONDS)):
                        await anyio.sleep(WAIT_ALL_POLL_SECONDS)
                    done[task_id] = task
        except TimeoutError:
            pending = next(t for t in task_ids if t not in done)
            raise TaskTimeout(pending, timeout) from None
        return done

    async def _follow(self, task_id: str, changed: _calls.ChangeFilter) -> dict[str, Any]:
        node = self._node
        url = node.target(_calls.task_events_path(task_id))
        headers = node.headers + EVENT_STREAM_HEADERS
        timeouts = node.timeouts(read=_calls.STREAM_READ_TIMEOUT)
        while True:
            try:
                async with self._http.stream("GET", url, headers, timeouts) as resp:
                    if resp.status >= 400:
                        await resp.aread()
                        raise _calls.error_of(resp)
                    lines, parser = LineSplitter(), EventParser()
                    async for chunk in resp.aiter_stream():
                        for line in lines.feed(chunk):
                            event = parser.feed(line)
                            if event is None or event.name != "task":
                                continue
                            task = json.loads(event.data)
                            changed(task)
                            if _calls.is_terminal(task):
                                return task
            except STREAM_BROKEN:
                pass  # the stream broke; open it again
            except TRANSPORT_ERRORS as exc:
                raise ConnectError(f"{self.url}: {exc or type(exc).__name__}") from exc
            await anyio.sleep(_calls.RECONNECT_SECONDS)

    async def _poll(self, task_id: str, changed: _calls.ChangeFilter) -> dict[str, Any]:
        while True:
            task = await self.get(task_id)
            changed(task)
            if _calls.is_terminal(task):
                return task
            await anyio.sleep(_calls.POLL_SECONDS)

