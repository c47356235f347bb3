"""Tasks: submit, list, get, cancel and artifacts under /api/v1, and the original /tasks routes."""

from __future__ import annotations

from typing import Any

from quart import Blueprint, Response, request

from p2pnn.api.http import ApiContext, ApiError, json_response
from p2pnn.callers import Caller
from p2pnn.service import Forbidden, request_hash
from p2pnn.tasks import State

MAX_PAGE = 500  # tasks in one page of GET /tasks
MAX_IDEMPOTENCY_KEY = 200  # characters; longer keys are refused rather than truncated
MAX_WAIT_SECONDS = 60.0  # longest long poll: under common proxies' idle timeouts; a client asks again


def page_args() -> dict[str, Any]:
    """The list filters of the current request. Error handling: ApiError 400 naming the bad argument."""
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
    if "parent" in args:
        out["parent"] = args["parent"]  # a sweep's trials
    try:
        out["limit"] = int(args.get("limit", "100"))
    except ValueError:
        raise ApiError(400, "invalid limit", "limit must be an integer") from None
    if not 1 <= out["limit"] <= MAX_PAGE:
        raise ApiError(400, "invalid limit", f"limit must be between 1 and {MAX_PAGE}")
    if "cursor" in args:
        out["cursor"] = args["cursor"]
    return out


def wait_seconds(value: str) -> float:
    """A ``wait`` argument (a long poll) in seconds. Error handling: ApiError 400."""
    try:
        wait = float(value)
    except ValueError:
        wait = -1.0
    if not 0 <= wait <= MAX_WAIT_SECONDS:  # also refuses nan
        raise ApiError(400, "invalid wait", f"wait must be a number of seconds from 0 to {MAX_WAIT_SECONDS:g}")
    return wait


# What the two calls of a task's round trip answer: shared by their Quart routes below and by the
# hot routes (api/hot.py), which answer them without Quart.


async def submit_answer(ctx: ApiContext, who: Caller, body: Any, key: str | None, wait: str | None) -> tuple[int, Any]:
    """POST /api/v1/tasks: (status, JSON body). ``body`` is the parsed request body; ``key`` the
    Idempotency-Key header; ``wait`` the ``wait`` argument (with it the answer comes once the tasks
    are terminal, or after that many seconds: a submit and a long poll in one).
    Error handling: ApiError 400 for a bad key or wait; what TaskService.submit raises."""
    if key is not None and not 0 < len(key) <= MAX_IDEMPOTENCY_KEY:
        raise ApiError(400, "invalid Idempotency-Key", f"must be 1 to {MAX_IDEMPOTENCY_KEY} characters")
    specs = body if isinstance(body, list) else [body]
    seconds = 0.0 if wait is None else wait_seconds(wait)
    tasks, created = await ctx.service.submit(
        specs, who, idempotency_key=key, body_hash=None if key is None else request_hash(body), wait=seconds
    )
    status = 201 if created else 200
    if isinstance(body, list):
        return status, {"tasks": [t.to_json() for t in tasks]}
    return status, tasks[0].to_json()


async def task_answer(ctx: ApiContext, task_id: str, wait: str | None) -> Any:
    """GET /api/v1/tasks/{id}: the task; with ``wait`` (seconds) a long poll, answered once the task is
    terminal or with the task as it is after that long. Error handling: ApiError 404, 400 for a bad wait."""
    if wait is None:
        return (await ctx.task_or_404(task_id)).to_json()
    task = await ctx.service.wait(task_id, wait_seconds(wait))
    if task is None:
        raise ApiError(404, "no such task", task_id)
    return task.to_json()


def blueprint(ctx: ApiContext) -> Blueprint:
    bp = Blueprint("tasks", __name__)
    service = ctx.service

    async def list_page() -> dict[str, Any]:
        try:
            page = await service.store.list(**page_args())
        except ValueError as exc:  # a cursor this store did not make
            raise ApiError(400, "invalid cursor", str(exc)) from None
        return {"tasks": [t.to_json() for t in page.tasks], "next_cursor": page.next_cursor}

    # --- the original routes ---

    @bp.get("/tasks")
    async def legacy_list() -> Response:
        ctx.caller("viewer")
        return json_response((await list_page())["tasks"])

    @bp.post("/tasks")
    async def legacy_submit() -> Response:
        who = ctx.caller("operator")
        body = await ctx.json_body()
        if not isinstance(body, dict) or "task_data" not in body:
            raise ApiError(400, "invalid body", 'expected {"task_data": <spec object or string>}')
        data = body["task_data"]
        if isinstance(data, str):
            data = {"kind": "echo", "payload": data}
        elif not isinstance(data, dict):
            raise ApiError(400, "invalid task_data", "task_data must be a task spec object or a string")
        tasks, _ = await service.submit([data], who)
        return json_response(tasks[0].to_json(), 201)

    @bp.delete("/tasks/<task_id>")
    async def legacy_delete(task_id: str) -> Response:
        return await cancel(task_id)

    # --- /api/v1 ---

    @bp.post("/api/v1/tasks")
    async def submit() -> Response:
        who = ctx.caller("operator")
        body = await ctx.json_body()
        status, answer = await submit_answer(ctx, who, body, request.headers.get("Idempotency-Key"), request.args.get("wait"))
        return json_response(answer, status)

    @bp.get("/api/v1/tasks")
    async def list_tasks() -> Response:
        ctx.caller("viewer")
        return json_response(await list_page())

    @bp.get("/api/v1/tasks/<task_id>")
    async def get_task(task_id: str) -> Response:
        ctx.caller("viewer")
        return json_response(await task_answer(ctx, task_id, request.args.get("wait")))

    @bp.delete("/api/v1/tasks/<task_id>")
    async def cancel(task_id: str) -> Response:
        who = ctx.caller("operator")
        try:
            task = await service.cancel(task_id, who)
        except Forbidden as exc:
            raise ApiError(403, "forbidden", str(exc)) from None
        if task is None:
            raise ApiError(404, "no such task", task_id)
        return json_response(task.to_json())

    @bp.get("/api/v1/tasks/<task_id>/artifacts/<name>")
    async def artifact(task_id: str, name: str) -> Response:
        ctx.caller("viewer")
        await ctx.task_or_404(task_id)
        data = await service.store.get_artifact(task_id, name)
        if data is None:
            raise ApiError(404, "no such artifact", f"task {task_id} has no artifact {name!r}")
        return Response(
            data, content_type="application/octet-stream",
            headers={"Content-Disposition": f'attachment; filename="{name}"'},
        )

    return bp
