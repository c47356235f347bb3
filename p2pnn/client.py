"""A small async client for a node's REST API (httpx; works under trio).

Used by ``p2pnn-node demo``, the benchmarks and the tests, exactly as any
other client would talk to a node.
"""

from __future__ import annotations

from typing import Any, Callable

import httpx
import trio

from p2pnn.tasks import TERMINAL, State

LONG_POLL_SECONDS = 30.0  # one GET ?wait= waits this long at most (the node allows up to 60), then asks again


class ApiError(Exception):
    def __init__(self, status: int, body: Any) -> None:
        detail = body.get("detail") if isinstance(body, dict) else body
        error = body.get("error") if isinstance(body, dict) else ""
        super().__init__(f"HTTP {status}: {error}: {detail}")
        self.status = status
        self.body = body


class Client:
    """Resource handling: use as ``async with Client(url, token) as c``; the connection pool closes on exit."""

    def __init__(self, base_url: str, token: str | None = None, *, timeout: float = 30.0) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._timeout = timeout
        self._http = httpx.AsyncClient(base_url=base_url, headers=headers, timeout=timeout)

    async def __aenter__(self) -> "Client":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._http.aclose()

    async def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        resp = await self._http.request(method, path, **kwargs)
        if resp.status_code >= 400:
            try:
                body = resp.json()
            except ValueError:
                body = resp.text
            raise ApiError(resp.status_code, body)
        if resp.headers.get("content-type", "").startswith("application/json"):
            return resp.json()
        return resp.content

    async def submit(self, spec: dict[str, Any], *, idempotency_key: str | None = None) -> dict[str, Any]:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return await self._call("POST", "/api/v1/tasks", json=spec, headers=headers)

    async def submit_many(self, specs: list[dict[str, Any]], *, idempotency_key: str | None = None) -> list[dict[str, Any]]:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return (await self._call("POST", "/api/v1/tasks", json=specs, headers=headers))["tasks"]

    async def get(self, task_id: str, *, wait: float | None = None) -> dict[str, Any]:
        """The task; with ``wait``, the node answers once it is terminal or ``wait`` seconds have passed."""
        if wait is None:
            return await self._call("GET", f"/api/v1/tasks/{task_id}")
        return await self._call(
            "GET", f"/api/v1/tasks/{task_id}", params={"wait": f"{wait:.3f}"}, timeout=self._timeout + wait
        )

    async def _wait_one(self, task_id: str) -> dict[str, Any]:
        """One long poll, as long as the time left allows (the caller's fail_after bounds it)."""
        left = trio.current_effective_deadline() - trio.current_time()
        return await self.get(task_id, wait=max(0.0, min(LONG_POLL_SECONDS, left)))

    async def list(self, **params: Any) -> dict[str, Any]:
        return await self._call("GET", "/api/v1/tasks", params=params)

    async def cancel(self, task_id: str) -> dict[str, Any]:
        return await self._call("DELETE", f"/api/v1/tasks/{task_id}")

    async def artifact(self, task_id: str, name: str) -> bytes:
        return await self._call("GET", f"/api/v1/tasks/{task_id}/artifacts/{name}")

    async def wait(
        self,
        task_id: str,
        *,
        timeout: float = 600.0,
        on_update: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Long-poll until the task is terminal; raises TimeoutError past ``timeout``."""
        with trio.fail_after(timeout):
            while True:
                task = await self._wait_one(task_id)
                if on_update is not None:
                    on_update(task)
                if State(task["state"]) in TERMINAL:
                    return task

    async def wait_all(self, task_ids: list[str], *, timeout: float = 600.0) -> dict[str, dict[str, Any]]:
        """Wait for many tasks; returns id -> terminal task. Raises TimeoutError past ``timeout``.

        Tasks are waited for in the order given, one long poll at a time: tasks
        run roughly first-in first-out, so the cost is about one request per task.
        """
        done: dict[str, dict[str, Any]] = {}
        with trio.fail_after(timeout):
            for task_id in task_ids:
                while True:
                    task = await self._wait_one(task_id)
                    if State(task["state"]) in TERMINAL:
                        done[task_id] = task
                        break
        return done
