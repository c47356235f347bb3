"""The two calls of a task's round trip, answered in ASGI, before Quart.

``POST /api/v1/tasks`` (a submit, or with ``?wait=`` a submit that waits) and
``GET /api/v1/tasks/{id}`` (a read, or with ``?wait=`` a long poll) are what a
client sends for every task. Quart's machinery around a handler (its request
context, the tasks it runs for each request, the request and response objects,
the hooks) took about 1 ms of each such round trip on the 2-core development
machine: a sixth of a short task's submit-to-result. Here the handlers Quart's
routes run too (``routes.tasks.submit_answer`` / ``task_answer``) run straight
from the ASGI scope. These paths with any other method (HEAD, PUT, ...), and
every other path, go on to Quart.

What Quart and the app's hooks do for a request is done here the same way, in
the same order: the Host check of an --insecure node, the caller's token, the
body (at most ``max_body_bytes``: 413, the connection then closed as its rest
was not read; BODY_TIMEOUT_SECONDS to arrive: 408), the error answers
(``http.error_answer``, which Quart's error handlers use too) and the request
counter of /metrics. A waiting call whose client went away is cancelled, as
quart-trio cancels a request's handler.
"""

from __future__ import annotations

import urllib.parse
from functools import partial
from typing import Any, Awaitable, Callable

import trio

from p2pnn.api.http import ApiContext, ApiError, error_answer, json_text
from p2pnn.api.routes.tasks import submit_answer, task_answer

ASGIApp = Callable[[dict, Callable[[], Awaitable[dict]], Callable[[dict], Awaitable[None]]], Awaitable[None]]

TASKS = "/api/v1/tasks"
TASK_RULE = "/api/v1/tasks/<task_id>"  # as /metrics names the route (Quart's rule)
BODY_TIMEOUT_SECONDS = 60.0  # Quart's BODY_TIMEOUT: the time a request's body has to arrive


def hot_routes(ctx: ApiContext, app: ASGIApp) -> ASGIApp:
    """``app`` (Quart's), with the two hot routes answered before it."""

    async def hot(scope: dict, receive: Callable[[], Awaitable[dict]], send: Callable[[dict], Awaitable[None]]) -> None:
        if scope["type"] == "http":
            method, path = scope["method"], scope["path"]
            if method == "POST" and path == TASKS:
                await _Call(ctx, scope, receive, send, TASKS).answer(_submit)
                return
            task_id = path[len(TASKS) + 1:] if path.startswith(TASKS + "/") else ""
            if method == "GET" and task_id and "/" not in task_id:  # as Quart's <task_id> matches
                await _Call(ctx, scope, receive, send, TASK_RULE).answer(partial(_get, task_id=task_id))
                return
        await app(scope, receive, send)

    return hot


async def _submit(call: _Call) -> tuple[int, Any]:
    who = call.ctx.authorized(call.header(b"authorization"), "operator")
    body = call.ctx.json_of(await call.body())
    return await call.waiting(partial(submit_answer, call.ctx, who, body, call.header(b"idempotency-key"), call.arg("wait")))


async def _get(call: _Call, *, task_id: str) -> tuple[int, Any]:
    call.ctx.authorized(call.header(b"authorization"), "viewer")
    return 200, await call.waiting(partial(task_answer, call.ctx, task_id, call.arg("wait")))


class _Call:
    """One request to a hot route, and its answer."""

    def __init__(self, ctx: ApiContext, scope: dict, receive: Callable[[], Awaitable[dict]],
                 send: Callable[[dict], Awaitable[None]], rule: str) -> None:
        self.ctx, self.scope, self._receive, self._send, self._rule = ctx, scope, receive, send, rule
        self._headers: dict[bytes, str] = {}
        for name, value in scope["headers"]:
            self._headers.setdefault(name.lower(), value.decode("latin-1"))  # the first of a repeated header
        self._args: dict[str, list[str]] | None = None
        # Whether the request's body was all read (or it declared none).
        self._body_read = self.header(b"content-length", "0").strip() in ("", "0") and b"transfer-encoding" not in self._headers

    def header(self, name: bytes, default: str | None = None) -> str | None:
        return self._headers.get(name, default)

    def arg(self, name: str) -> str | None:
        """The first value of a query argument (a blank one is ''), None when absent."""
        if self._args is None:
            self._args = urllib.parse.parse_qs(self.scope["query_string"].decode("latin-1"), keep_blank_values=True)
        values = self._args.get(name)
        return values[0] if values else None

    async def body(self) -> bytes:
        """The request's body. Error handling: ApiError 413 past max_body_bytes (declared or sent),
        408 when it does not arrive within BODY_TIMEOUT_SECONDS."""
        limit = self.ctx.max_body_bytes
        declared = self.header(b"content-length")
        if declared is not None and declared.strip().isdigit() and int(declared) > limit:
            raise ApiError(413, "body too large", f"at most {limit} bytes")
        chunks: list[bytes] = []
        size = 0
        with trio.move_on_after(BODY_TIMEOUT_SECONDS) as timer:
            while True:
                message = await self._receive()
                if message["type"] == "http.disconnect":
                    raise _Gone()
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > limit:
                    raise ApiError(413, "body too large", f"at most {limit} bytes")
                chunks.append(chunk)
                if not message.get("more_body", False):
                    break
        if timer.cancelled_caught:
            raise ApiError(408, "request timeout", f"the body did not arrive within {BODY_TIMEOUT_SECONDS:g} s")
        self._body_read = True
        return b"".join(chunks)

    async def waiting(self, answer: Callable[[], Awaitable[Any]]) -> Any:
        """``await answer()`` while the client is watched: a client that goes away cancels it (a long
        poll or a submit that waits would otherwise hold its waiter until the wait is over)."""
        if self.arg("wait") is None or not self._body_read:
            return await answer()
        waited = trio.CancelScope()
        watching = trio.CancelScope()

        async def watch() -> None:
            # A task of its own that nobody joins: the answer goes out as soon as it is ready,
            # not one scheduler pass later, once this task has seen its cancel.
            with watching:
                try:
                    while (await self._receive())["type"] != "http.disconnect":
                        pass
                except Exception:  # the server closed the request's channel: nobody to watch
                    return
                waited.cancel()

        trio.lowlevel.spawn_system_task(watch)
        try:
            with waited:
                return await answer()
            raise _Gone()  # cancelled by ``watch``: the client went away
        finally:
            watching.cancel()

    async def answer(self, handler: Callable[[_Call], Awaitable[tuple[int, Any]]]) -> None:
        headers: dict[str, str] = {}
        try:
            if self.ctx.authenticator is None:
                self.ctx.check_host(self.header(b"host"))
            status, body = await handler(self)
        except _Gone:
            return  # nobody to answer
        except Exception as exc:  # every error becomes its JSON answer, as Quart's handlers make it
            status, body, headers = error_answer(exc, self.scope["path"])
            if status >= 400 and not self._body_read:
                # Refused before its body was read: the rest of it may still be on the wire, so this
                # connection cannot carry another request; say so, and the server closes it.
                headers["Connection"] = "close"
        self.ctx.metrics.http_requests.labels(method=self.scope["method"], route=self._rule, status=str(status)).inc()
        data = json_text(body).encode()
        raw = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(data))]
        raw += [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in headers.items()]
        await self._send({"type": "http.response.start", "status": status, "headers": raw})
        with trio.CancelScope(shield=True):  # see app._finish_responses_shielded
            await self._send({"type": "http.response.body", "body": data})


class _Gone(Exception):
    """The client went away before its answer was ready."""
