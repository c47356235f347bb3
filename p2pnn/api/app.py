"""Routes of the REST API, on Quart-Trio.

Every error a client can cause is a 4xx with ``{"error": ..., "detail": ...}``;
nothing a request carries can produce a 500 or a traceback. Handlers are
thin: the rules live in :mod:`p2pnn.service`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from quart import Response, g, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from p2pnn import logs
from p2pnn.api.auth import ANONYMOUS_ADMIN, Authenticator, AuthError, Caller, require
from p2pnn.api.openapi import openapi
from p2pnn.metrics import CONTENT_TYPE, Metrics
from p2pnn.service import Forbidden, TaskService, request_hash
from p2pnn.store import IdempotencyConflict, StoreError
from p2pnn.tasks import State, SpecError

log = logs.get(__name__)

MAX_PAGE = 500  # tasks in one page of GET /tasks
MAX_IDEMPOTENCY_KEY = 200  # characters; longer keys are refused rather than truncated


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


class ApiError(Exception):
    def __init__(self, status: int, error: str, detail: str = "") -> None:
        super().__init__(detail or error)
        self.status, self.error, self.detail = status, error, detail


def _json(body: Any, status: int = 200) -> Response:
    return Response(json.dumps(body), status=status, content_type="application/json")


def _error(status: int, error: str, detail: str = "") -> Response:
    resp = _json({"error": error, "detail": detail}, status)
    if status == 413:
        # The rest of the refused body may still be on the wire: this connection
        # cannot carry another request, so say so and let the server close it.
        resp.headers["Connection"] = "close"
    return resp


def create_app(ctx: ApiContext) -> QuartTrio:
    app = QuartTrio("p2pnn")
    app.config["MAX_CONTENT_LENGTH"] = ctx.max_body_bytes
    app.config["PROPAGATE_EXCEPTIONS"] = False
    service = ctx.service

    def caller(role: str) -> Caller:
        who = ANONYMOUS_ADMIN if ctx.authenticator is None else ctx.authenticator.verify(request.headers.get("Authorization"))
        require(who, role)
        return who

    async def json_body() -> Any:
        raw = await request.get_data()
        if len(raw) > ctx.max_body_bytes:
            raise ApiError(413, "body too large", f"at most {ctx.max_body_bytes} bytes")
        if not raw:
            raise ApiError(400, "empty body", "expected a JSON document")
        try:
            return json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ApiError(400, "malformed JSON", str(exc)) from None

    async def task_or_404(task_id: str):
        task = await service.get(task_id)
        if task is None:
            raise ApiError(404, "no such task", task_id)
        return task

    def page_args() -> dict[str, Any]:
        args = request.args
        out: dict[str, Any] = {}
        if "state" in args:
            try:
                out["state"] = State(args["state"])
            except ValueError:
                raise ApiError(400, "invalid state", f"state must be one of {', '.join(s.value for s in State)}") from None
        if "kind" in args:
            out["kind"] = args["kind"]
        if "owner" in args:
            out["owner"] = args["owner"]
        try:
            out["limit"] = int(args.get("limit", "100"))
        except ValueError:
            raise ApiError(400, "invalid limit", "limit must be an integer") from None
        if not 1 <= out["limit"] <= MAX_PAGE:
            raise ApiError(400, "invalid limit", f"limit must be between 1 and {MAX_PAGE}")
        if "cursor" in args:
            out["cursor"] = args["cursor"]
        return out

    async def list_page() -> dict[str, Any]:
        try:
            page = await service.store.list(**page_args())
        except ValueError as exc:  # a cursor this store did not make
            raise ApiError(400, "invalid cursor", str(exc)) from None
        return {"tasks": [t.to_json() for t in page.tasks], "next_cursor": page.next_cursor}

    # --- the original routes ---

    @app.get("/tasks")
    async def legacy_list() -> Response:
        caller("viewer")
        return _json((await list_page())["tasks"])

    @app.post("/tasks")
    async def legacy_submit() -> Response:
        who = caller("operator")
        body = await json_body()
        if not isinstance(body, dict) or "task_data" not in body:
            raise ApiError(400, "invalid body", 'expected {"task_data": <spec object or string>}')
        data = body["task_data"]
        if isinstance(data, str):
            data = {"kind": "echo", "payload": data}
        elif not isinstance(data, dict):
            raise ApiError(400, "invalid task_data", "task_data must be a task spec object or a string")
        tasks, _ = await service.submit([data], who)
        return _json(tasks[0].to_json(), 201)

    @app.delete("/tasks/<task_id>")
    async def legacy_delete(task_id: str) -> Response:
        return await cancel(task_id)

    # --- /api/v1 ---

    @app.post("/api/v1/tasks")
    async def submit() -> Response:
        who = caller("operator")
        body = await json_body()
        key = request.headers.get("Idempotency-Key")
        if key is not None and not 0 < len(key) <= MAX_IDEMPOTENCY_KEY:
            raise ApiError(400, "invalid Idempotency-Key", f"must be 1 to {MAX_IDEMPOTENCY_KEY} characters")
        specs = body if isinstance(body, list) else [body]
        tasks, created = await service.submit(specs, who, idempotency_key=key, body_hash=request_hash(body))
        status = 201 if created else 200
        if isinstance(body, list):
            return _json({"tasks": [t.to_json() for t in tasks]}, status)
        return _json(tasks[0].to_json(), status)

    @app.get("/api/v1/tasks")
    async def list_tasks() -> Response:
        caller("viewer")
        return _json(await list_page())

    @app.get("/api/v1/tasks/<task_id>")
    async def get_task(task_id: str) -> Response:
        caller("viewer")
        return _json((await task_or_404(task_id)).to_json())

    @app.delete("/api/v1/tasks/<task_id>")
    async def cancel(task_id: str) -> Response:
        who = caller("operator")
        try:
            task = await service.cancel(task_id, who)
        except Forbidden as exc:
            raise ApiError(403, "forbidden", str(exc)) from None
        if task is None:
            raise ApiError(404, "no such task", task_id)
        return _json(task.to_json())

    @app.get("/api/v1/tasks/<task_id>/artifacts/<name>")
    async def artifact(task_id: str, name: str) -> Response:
        caller("viewer")
        await task_or_404(task_id)
        data = await service.store.get_artifact(task_id, name)
        if data is None:
            raise ApiError(404, "no such artifact", f"task {task_id} has no artifact {name!r}")
        return Response(
            data, content_type="application/octet-stream",
            headers={"Content-Disposition": f'attachment; filename="{name}"'},
        )

    # --- the swarm ---

    @app.get("/api/v1/nodes")
    async def nodes() -> Response:
        caller("viewer")
        if ctx.cluster is None:
            raise ApiError(404, "no swarm view", "this node does not describe a swarm")
        return _json({"nodes": ctx.cluster()[1]})

    @app.get("/api/v1/cluster")
    async def cluster() -> Response:
        caller("viewer")
        if ctx.cluster is None:
            raise ApiError(404, "no swarm view", "this node does not describe a swarm")
        return _json(ctx.cluster()[0])

    # --- operations ---

    @app.get("/health")
    async def health() -> Response:
        return _json({"status": "ok", "node_id": ctx.node_id})

    @app.get("/ready")
    async def ready() -> Response:
        ok, detail = await ctx.ready()
        return _json({"ready": ok, **detail}, 200 if ok else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        try:
            ctx.metrics.set_task_counts(await service.store.counts())
        except StoreError as exc:
            log.warning("metrics.store_unreachable", error=str(exc))
        return Response(ctx.metrics.render(), content_type=CONTENT_TYPE)

    @app.get("/openapi.json")
    async def openapi_json() -> Response:
        return _json(openapi())

    # --- errors: always JSON, never a traceback ---

    @app.errorhandler(ApiError)
    async def on_api_error(exc: ApiError) -> Response:
        return _error(exc.status, exc.error, exc.detail)

    @app.errorhandler(AuthError)
    async def on_auth_error(exc: AuthError) -> Response:
        resp = _error(exc.status, "unauthorized" if exc.status == 401 else "forbidden", exc.message)
        if exc.status == 401:
            resp.headers["WWW-Authenticate"] = 'Bearer realm="p2pnn"'
        return resp

    @app.errorhandler(SpecError)
    async def on_spec_error(exc: SpecError) -> Response:
        return _json({"error": "invalid spec", "detail": str(exc), "field": exc.path}, 400)

    @app.errorhandler(IdempotencyConflict)
    async def on_conflict(exc: IdempotencyConflict) -> Response:
        return _error(409, "idempotency key reused", str(exc))

    @app.errorhandler(StoreError)
    async def on_store_error(exc: StoreError) -> Response:
        log.error("store.unavailable", error=str(exc))
        return _error(503, "store unavailable", "the task store did not answer; try again")

    @app.errorhandler(HTTPException)
    async def on_http_error(exc: HTTPException) -> Response:
        return _error(exc.code or 500, (exc.name or "error").lower(), exc.description or "")

    @app.errorhandler(Exception)
    async def on_unexpected(exc: Exception) -> Response:
        log.error("api.unexpected_error", error=repr(exc), path=request.path)
        return _error(500, "internal error", "the node hit an unexpected error; see its log")

    @app.before_request
    async def start_timer() -> None:
        g.started = time.perf_counter()

    @app.after_request
    async def count(response: Response) -> Response:
        rule = request.url_rule.rule if request.url_rule is not None else "unmatched"
        ctx.metrics.http_requests.labels(method=request.method, route=rule, status=str(response.status_code)).inc()
        return response

    return app
