"""What every route module shares: the node's context, JSON answers, errors, the caller, the body.

Every error a client can cause is an ApiError (or an error the app maps, see
app.py) and becomes a 4xx with ``{"error": ..., "detail": ...}``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from quart import Response, request

from p2pnn.api.auth import Authenticator, require
from p2pnn.callers import ANONYMOUS_ADMIN, Caller
from p2pnn.metrics import Metrics
from p2pnn.service import TaskService
from p2pnn.tasks import Task


@dataclass
class ApiContext:
    service: TaskService
    metrics: Metrics
    authenticator: Authenticator | None  # None: --insecure
    node_id: str
    max_body_bytes: int
    ready: Callable[[], Awaitable[tuple[bool, dict[str, Any]]]]
    # (GET /api/v1/cluster, GET /api/v1/nodes): the swarm as this node sees it, or the lone node itself.
    cluster: Callable[[], tuple[dict[str, Any], list[dict[str, Any]]]] | None = None

    def caller(self, role: str) -> Caller:
        """The authenticated caller of the current request. Error handling: AuthError (401/403)."""
        who = ANONYMOUS_ADMIN if self.authenticator is None else self.authenticator.verify(request.headers.get("Authorization"))
        require(who, role)
        return who

    async def json_body(self) -> Any:
        """The current request's body as JSON. Error handling: ApiError 400 or 413."""
        raw = await request.get_data()
        if len(raw) > self.max_body_bytes:
            raise ApiError(413, "body too large", f"at most {self.max_body_bytes} bytes")
        if not raw:
            raise ApiError(400, "empty body", "expected a JSON document")
        try:
            return json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ApiError(400, "malformed JSON", str(exc)) from None

    async def task_or_404(self, task_id: str) -> Task:
        task = await self.service.get(task_id)
        if task is None:
            raise ApiError(404, "no such task", task_id)
        return task


class ApiError(Exception):
    def __init__(self, status: int, error: str, detail: str = "") -> None:
        super().__init__(detail or error)
        self.status, self.error, self.detail = status, error, detail


def json_response(body: Any, status: int = 200) -> Response:
    return Response(json.dumps(body), status=status, content_type="application/json")


def error_response(status: int, error: str, detail: str = "") -> Response:
    resp = json_response({"error": error, "detail": detail}, status)
    if status == 413:
        # The rest of the refused body may still be on the wire: this connection
        # cannot carry another request, so say so and let the server close it.
        resp.headers["Connection"] = "close"
    return resp
