"""A node whose database is really unreachable answers 503, not 500, and /ready says so.

The node reaches PostgreSQL through a TCP proxy this test owns; stopping the
proxy closes every connection and the port, as a database host that went away
would. The machine's PostgreSQL itself is never touched.
"""

from __future__ import annotations

import httpx
import pytest
import trio

from p2pnn.node import run_node
from tests.nodeutil import node_config, token

pytestmark = pytest.mark.postgres

OUTAGE_WAIT = 120.0  # seconds for a request to give up on the database (the pool waits up to 30 s) on a loaded machine


class TcpProxy:
    """Forwards 127.0.0.1:<port> to a target; ``stop`` closes the port and every connection through it."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self._scope: trio.CancelScope | None = None

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        with trio.CancelScope() as self._scope:
            listeners = await trio.open_tcp_listeners(self.port, host="127.0.0.1")
            self.port = listeners[0].socket.getsockname()[1]
            async with trio.open_nursery() as nursery:
                nursery.start_soon(trio.serve_listeners, self._pipe, listeners)
                task_status.started(self.port)

    def stop(self) -> None:
        assert self._scope is not None
        self._scope.cancel()

    async def _pipe(self, client: trio.SocketStream) -> None:
        async with client, await trio.open_tcp_stream("127.0.0.1", self.target_port) as server:
            async with trio.open_nursery() as nursery:

                async def copy(src: trio.SocketStream, dst: trio.SocketStream) -> None:
                    try:
                        async for chunk in src:
                            await dst.send_all(chunk)
                    except trio.BrokenResourceError:
                        pass
                    nursery.cancel_scope.cancel()

                nursery.start_soon(copy, client, server)
                nursery.start_soon(copy, server, client)


async def _until_status(http: httpx.AsyncClient, path: str, status: int, timeout: float) -> httpx.Response:
    with trio.fail_after(timeout):
        while True:
            resp = await http.get(path)
            if resp.status_code == status:
                return resp
            assert resp.status_code in (200, 503), resp.text  # anything else (a 500) is the bug
            await trio.sleep(0.2)


async def test_unreachable_store_is_503_and_not_ready_then_recovers(nursery, tmp_path, postgres_url, pg_schema):
    proxy = TcpProxy(int(httpx.URL(postgres_url).port or 5432))
    port = await nursery.start(proxy.run)
    url = str(httpx.URL(postgres_url).copy_with(port=port))
    data_dir = tmp_path / "node"
    cfg = node_config(data_dir, store={"backend": "postgres", "url": url, "schema": pg_schema})
    handle = await nursery.start(run_node, cfg)
    async with httpx.AsyncClient(base_url=handle.api_url, timeout=OUTAGE_WAIT) as http:
        http.headers["Authorization"] = f"Bearer {token(data_dir, 'admin')}"
        assert (await http.post("/api/v1/tasks", json={"kind": "echo"})).status_code == 201
        assert (await http.get("/ready")).status_code == 200

        proxy.stop()
        async with trio.open_nursery() as during:  # both wait out the pool's timeout at once
            answers: dict[str, httpx.Response] = {}

            async def ask(name: str, method: str, path: str, body: object = None) -> None:
                answers[name] = await http.request(method, path, json=body)

            during.start_soon(ask, "list", "GET", "/api/v1/tasks")
            during.start_soon(ask, "legacy", "GET", "/tasks")
            during.start_soon(ask, "submit", "POST", "/api/v1/tasks", {"kind": "echo"})
            during.start_soon(ask, "ready", "GET", "/ready")
        for name in ("list", "legacy", "submit"):
            resp = answers[name]
            assert resp.status_code == 503, (name, resp.text)
            assert resp.json()["error"] == "store unavailable" and "Traceback" not in resp.text
        ready = answers["ready"]
        assert ready.status_code == 503 and ready.json()["ready"] is False
        assert ready.json()["store"].startswith("unreachable")
        assert (await http.get("/health")).status_code == 200  # alive, just not ready

        # The database comes back on the same address: the node is ready again without a restart.
        nursery.start_soon(proxy.run)
        await _until_status(http, "/ready", 200, OUTAGE_WAIT)
        assert (await http.get("/api/v1/tasks")).status_code == 200
