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
from tests.brokers import StallingProxy
from tests.nodeutil import node_config, token

pytestmark = pytest.mark.postgres

OUTAGE_WAIT = 120.0  # seconds for a request to give up on the database (the pool's own timeout, then ours) on a loaded machine


async def _until_status(http: httpx.AsyncClient, path: str, status: int, timeout: float) -> httpx.Response:
    with trio.fail_after(timeout):
        while True:
            resp = await http.get(path)
            if resp.status_code == status:
                return resp
            assert resp.status_code in (200, 503), resp.text  # anything else (a 500) is the bug
            await trio.sleep(0.2)


async def _serve_in(scope: trio.CancelScope, proxy: StallingProxy, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """Run ``proxy`` until ``scope`` is cancelled, which closes its port and every link through it."""
    with scope:
        await proxy.run(task_status=task_status)


async def test_unreachable_store_is_503_and_not_ready_then_recovers(nursery, tmp_path, postgres_url, pg_schema):
    target = httpx.URL(postgres_url)
    proxy_scope = trio.CancelScope()
    port = await nursery.start(_serve_in, proxy_scope, StallingProxy(target.host, target.port or 5432))
    url = str(target.copy_with(port=port))
    data_dir = tmp_path / "node"
    cfg = node_config(data_dir, store={"backend": "postgres", "url": url, "schema": pg_schema})
    handle = await nursery.start(run_node, cfg)
    async with httpx.AsyncClient(base_url=handle.api_url, timeout=OUTAGE_WAIT) as http:
        http.headers["Authorization"] = f"Bearer {token(data_dir, 'admin')}"
        assert (await http.post("/api/v1/tasks", json={"kind": "echo"})).status_code == 201
        assert (await http.get("/ready")).status_code == 200

        proxy_scope.cancel()
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
        await nursery.start(_serve_in, trio.CancelScope(), StallingProxy(target.host, target.port or 5432, port=port))
        await _until_status(http, "/ready", 200, OUTAGE_WAIT)
        assert (await http.get("/api/v1/tasks")).status_code == 200
