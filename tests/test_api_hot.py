"""The hot routes (p2pnn/api/hot.py): POST /api/v1/tasks and GET /api/v1/tasks/{id} answered in ASGI.

What the rest of the API suite checks over HTTP (errors, refusals before the body,
Host checks, metrics) runs through them too; here, what only they do: the
body's timeout and limit as it arrives, a client that goes away while its call
waits, and the requests they leave to Quart. The ASGI app is driven directly,
over a real SQLite store and the in-process bus.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

import p2pnn.api.hot as hot
from p2pnn.api.app import create_app
from p2pnn.api.http import ApiContext
from p2pnn.bus.local import LocalBus
from p2pnn.callers import ANONYMOUS_ADMIN
from p2pnn.metrics import Metrics
from p2pnn.service import TaskService
from p2pnn.store import open_store
from p2pnn.tasks import Limits

MAX_BODY = 4096


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[tuple[Any, TaskService, Metrics]]:
    store = open_store("sqlite", sqlite_path=tmp_path / "tasks.sqlite3")
    await store.open()
    service = TaskService(store, LocalBus(), limits=Limits(), max_attempts=3)
    metrics = Metrics()
    ctx = ApiContext(service=service, metrics=metrics, authenticator=None, node_id="n", max_body_bytes=MAX_BODY,
                     ready=None)  # type: ignore[arg-type]
    try:
        yield create_app(ctx), service, metrics
    finally:
        await store.close()


class Exchange:
    """One request to the ASGI app: the messages it is given, and what it answers."""

    def __init__(self, method: str, path: str, query: bytes = b"", headers: list[tuple[bytes, bytes]] | None = None) -> None:
        self.scope = {"type": "http", "method": method, "path": path, "raw_path": path.encode(), "query_string": query,
                      "headers": [(b"host", b"127.0.0.1"), *(headers or [])], "http_version": "1.1", "scheme": "http",
                      "root_path": "", "server": ("127.0.0.1", 3030), "client": ("127.0.0.1", 5000)}
        self.inbox_send, self.inbox = trio.open_memory_channel[dict](100)
        self.sent: list[dict] = []

    async def receive(self) -> dict:
        return await self.inbox.receive()

    async def send(self, message: dict) -> None:
        self.sent.append(message)

    @property
    def status(self) -> int | None:
        return next((m["status"] for m in self.sent if m["type"] == "http.response.start"), None)

    @property
    def headers(self) -> dict[bytes, bytes]:
        return dict(next(m["headers"] for m in self.sent if m["type"] == "http.response.start"))

    @property
    def json(self) -> Any:
        return json.loads(b"".join(m.get("body", b"") for m in self.sent if m["type"] == "http.response.body"))


async def test_a_long_poll_whose_client_went_away_ends_and_answers_nothing(api):
    app, service, _ = api
    (task,), _ = await service.submit([{"kind": "echo", "sleep": 30}], ANONYMOUS_ADMIN)  # no Ki here: it stays queued
    call = Exchange("GET", f"/api/v1/tasks/{task.id}", b"wait=30")
    await call.inbox_send.send({"type": "http.request", "body": b"", "more_body": False})
    async with trio.open_nursery() as nursery:
        nursery.start_soon(app, call.scope, call.receive, call.send)
        await trio.sleep(0.3)
        assert service._finished, "the long poll waits"
        await call.inbox_send.send({"type": "http.disconnect"})
        with trio.fail_after(5):
            while service._finished:
                await trio.sleep(0.01)
    assert call.sent == []


async def test_a_submit_that_waits_answers_once_its_wait_is_over(api):
    app, _, metrics = api
    body = json.dumps({"kind": "echo", "sleep": 30}).encode()
    call = Exchange("POST", "/api/v1/tasks", b"wait=0.2", [(b"content-length", str(len(body)).encode())])
    await call.inbox_send.send({"type": "http.request", "body": body, "more_body": False})
    with trio.fail_after(10):
        await app(call.scope, call.receive, call.send)
    assert call.status == 201 and call.json["state"] in ("pending", "queued")
    assert call.headers[b"content-type"] == b"application/json"
    counted = metrics.http_requests.labels(method="POST", route="/api/v1/tasks", status="201")._value.get()
    assert counted == 1


async def test_a_body_that_does_not_arrive_in_time_is_a_408(api, monkeypatch):
    app, service, _ = api
    monkeypatch.setattr(hot, "BODY_TIMEOUT_SECONDS", 0.3)
    call = Exchange("POST", "/api/v1/tasks", headers=[(b"content-length", b"100")])
    await call.inbox_send.send({"type": "http.request", "body": b'{"kind":', "more_body": True})  # and no more
    with trio.fail_after(10):
        await app(call.scope, call.receive, call.send)
    assert (call.status, call.json["error"]) == (408, "request timeout")
    assert call.headers[b"connection"] == b"close"  # the rest may still come: the connection cannot go on
    assert (await service.store.list()).tasks == []


async def test_a_body_over_the_limit_is_refused_as_it_arrives(api):
    app, service, _ = api
    call = Exchange("POST", "/api/v1/tasks", headers=[(b"transfer-encoding", b"chunked")])  # no length declared
    for _ in range(3):
        await call.inbox_send.send({"type": "http.request", "body": b" " * (MAX_BODY // 2), "more_body": True})
    with trio.fail_after(10):
        await app(call.scope, call.receive, call.send)
    assert (call.status, call.json["error"]) == (413, "body too large")
    assert call.headers[b"connection"] == b"close"
    assert (await service.store.list()).tasks == []


async def test_other_methods_and_paths_of_the_hot_routes_are_quarts(api):
    app, service, _ = api
    (task,), _ = await service.submit([{"kind": "echo", "payload": "p"}], ANONYMOUS_ADMIN)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1") as http:
        assert (await http.get(f"/api/v1/tasks/{task.id}")).json()["spec"]["payload"] == "p"  # hot
        head = await http.head(f"/api/v1/tasks/{task.id}")  # Quart's: HEAD of a GET route
        assert head.status_code == 200 and head.content == b""
        assert (await http.put("/api/v1/tasks")).status_code == 405
        assert (await http.get(f"/api/v1/tasks/{task.id}/progress")).status_code == 200
        assert (await http.get("/api/v1/tasks/nope", params={"wait": "abc"})).json()["error"] == "invalid wait"
        missing = await http.get("/api/v1/tasks/00000000-0000-0000-0000-000000000000")
        assert (missing.status_code, missing.json()["error"]) == (404, "no such task")
