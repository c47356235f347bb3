"""The errors a client raises: one base class, one subclass per answer a caller handles differently."""

from __future__ import annotations

from typing import Any


class ClientError(Exception):
    """Anything the client could not do; ``str()`` is one line fit for a terminal."""


class ConnectError(ClientError):
    """No answer from the node at all: wrong URL, node down, network cut."""


class ApiError(ClientError):
    """The node answered with an error status; ``error``, ``detail`` and ``field`` come from its JSON body."""

    def __init__(self, status: int, body: Any) -> None:
        self.status = status
        self.body = body
        if isinstance(body, dict):
            self.error = str(body.get("error") or "")
            self.detail = str(body.get("detail") or "")
            self.field: str | None = body.get("field")
        else:
            self.error, self.detail, self.field = "", str(body or "").strip()[:200], None
        super().__init__(f"HTTP {status}: {self.error}: {self.detail}")


class Unauthorized(ApiError):
    """401: no token, an invalid or expired one."""


class Forbidden(ApiError):
    """403: the token's role may not do this (a viewer submitting, an operator cancelling another's task)."""


class NotFound(ApiError):
    """404: no such task, artifact or route."""


class Conflict(ApiError):
    """409: an Idempotency-Key reused with another body."""


class BadRequest(ApiError):
    """400, 413 or 422: the request was refused as it stands (an invalid spec: ``field`` names the field)."""


class TaskTimeout(ClientError, TimeoutError):
    """``wait`` gave up before the task finished; the task itself keeps running."""

    def __init__(self, task_id: str, seconds: float | None) -> None:
        super().__init__(f"task {task_id} not finished after {seconds:g} s")
        self.task_id = task_id
        self.seconds = seconds


_BY_STATUS: dict[int, type[ApiError]] = {
    400: BadRequest, 401: Unauthorized, 403: Forbidden, 404: NotFound, 409: Conflict, 413: BadRequest, 422: BadRequest,
}


def api_error(status: int, body: Any) -> ApiError:
    """The ApiError subclass for ``status``."""
    return _BY_STATUS.get(status, ApiError)(status, body)
