"""What each API call sends and how its answer reads: shared by the sync and the async client."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from p2pnn.client._errors import ApiError, api_error
from p2pnn.client._wire import Response
from p2pnn.tasks import TERMINAL, State

# How long a stream may stay silent before the client reconnects: the node sends a
# keep-alive comment far more often than this, so silence means a dead connection.
STREAM_READ_TIMEOUT = 60.0
POLL_SECONDS = 0.5  # wait() against a node without the event stream asks this often
RECONNECT_SECONDS = 0.5  # pause before re-opening a stream the node or network closed


@dataclass(frozen=True)
class Call:
    method: str
    path: str
    params: dict[str, Any] | None = None
    json: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    raw: bool = False  # the answer is bytes (an artifact), not JSON
    pick: str | None = None  # return only this key of the JSON answer
    wait: float | None = None  # a long poll of this many seconds: the read timeout is widened to match


def submit(spec: dict[str, Any], idempotency_key: str | None, wait: float | None = None) -> Call:
    return Call("POST", "/api/v1/tasks", json=spec, headers=_idempotency(idempotency_key), params=_wait(wait), wait=wait)


def submit_many(specs: list[dict[str, Any]], idempotency_key: str | None, wait: float | None = None) -> Call:
    return Call("POST", "/api/v1/tasks", json=specs, headers=_idempotency(idempotency_key), pick="tasks",
                params=_wait(wait), wait=wait)


def get(task_id: str, wait: float | None = None) -> Call:
    return Call("GET", f"/api/v1/tasks/{task_id}", params=_wait(wait), wait=wait)


def _wait(wait: float | None) -> dict[str, str] | None:
    return None if wait is None else {"wait": f"{wait:.3f}"}


def list_tasks(params: dict[str, Any]) -> Call:
    return Call("GET", "/api/v1/tasks", params={k: v for k, v in params.items() if v is not None})


def cancel(task_id: str) -> Call:
    return Call("DELETE", f"/api/v1/tasks/{task_id}")


def artifact(task_id: str, name: str) -> Call:
    return Call("GET", f"/api/v1/tasks/{task_id}/artifacts/{name}", raw=True)


def nodes() -> Call:
    return Call("GET", "/api/v1/nodes", pick="nodes")


def cluster() -> Call:
    return Call("GET", "/api/v1/cluster")


def progress(task_id: str) -> Call:
    return Call("GET", f"/api/v1/tasks/{task_id}/progress")


def task_events_path(task_id: str) -> str:
    return f"/api/v1/tasks/{task_id}/events"


def _idempotency(key: str | None) -> dict[str, str]:
    return {"Idempotency-Key": key} if key else {}


def error_of(resp: Response) -> ApiError:
    """The ApiError for an error answer: its JSON body, else its text."""
    try:
        body: Any = json.loads(resp.content)
    except ValueError:
        body = resp.content.decode("utf-8", "replace")
    return api_error(resp.status, body)


def parse(resp: Response, call: Call) -> Any:
    """The answer of ``call``. Error handling: an error status raises the matching ApiError subclass."""
    if resp.status >= 400:
        raise error_of(resp)
    if call.raw or not _content_type(resp).startswith(b"application/json"):
        return resp.content
    data = json.loads(resp.content)
    return data[call.pick] if call.pick else data


def _content_type(resp: Response) -> bytes:
    # h11 gives the names in lower case.
    return next((v for k, v in resp.headers if k.lower() == b"content-type"), b"")


def is_terminal(task: dict[str, Any]) -> bool:
    return State(task["state"]) in TERMINAL


class ChangeFilter:
    """Calls ``on_update`` with a task snapshot only when it differs, for a person, from the one before.

    Event streams and polls may repeat a snapshot (a reconnect starts with the
    current one); the callback should print a line per real change.
    """

    def __init__(self, on_update: Callable[[dict[str, Any]], Any] | None) -> None:
        self._on_update = on_update
        self._last: tuple | None = None

    def __call__(self, task: dict[str, Any]) -> None:
        key = (task.get("state"), task.get("attempts"), json.dumps(task.get("progress"), sort_keys=True), task.get("error"))
        if key != self._last:
            self._last = key
            if self._on_update is not None:
                self._on_update(task)


def route_missing(exc: Exception) -> bool:
    """A 404 that means 'this node has no such route' (an older node), not 'no such task'."""
    return getattr(exc, "status", None) == 404 and getattr(exc, "error", "") != "no such task"
