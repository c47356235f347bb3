"""What every route module shares: the node's context, JSON answers, errors, the caller, the body.

Every error a client can cause is an ApiError (or an error the app maps, see
app.py) and becomes a 4xx with ``{"error": ..., "detail": ...}``.
"""

from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from quart import Response, g, request

from p2pnn import logs
from p2pnn.api.auth import Authenticator, AuthError, require
from p2pnn.callers import ANONYMOUS_ADMIN, Caller
from p2pnn.metrics import Metrics
from p2pnn.service import TaskService
from p2pnn.store import IdempotencyConflict, StoreError
from p2pnn.tasks import SpecError, Task

log = logs.get(__name__)

# Arrays and objects nested deeper than this in a request body are refused (400). Real specs
# nest four or five levels; the parser and the encoder recurse once or twice per level.
MAX_JSON_DEPTH = 64
# Longer integer literals are refused (400): Python's own cap (4,300) raises a ValueError
# deep in the parser; stating ours keeps the answer the same whatever the interpreter's setting.
MAX_INT_DIGITS = 4300
# Nesting shown in an answer; deeper parts of a stored value are replaced by TOO_DEEP.
MAX_RENDER_DEPTH = 100
TOO_DEEP = "<nested too deeply to show>"
# Host names an --insecure node answers to. A web page that rebinds its own name to
# 127.0.0.1 still sends that name, so checking Host stops it driving an unauthenticated API.
LOOPBACK_NAMES = frozenset({"localhost", "localhost."})
_STRUCTURE = re.compile(rb'\\.|["\[\]{}]', re.DOTALL)


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
        return self.authorized(request.headers.get("Authorization"), role)

    def authorized(self, authorization: str | None, role: str) -> Caller:
        """The caller an Authorization header names, if it holds ``role``. Error handling: AuthError (401/403)."""
        who = ANONYMOUS_ADMIN if self.authenticator is None else self.authenticator.verify(authorization)
        require(who, role)
        return who

    def check_host(self, host: str | None) -> None:
        """An --insecure node answers only to a loopback Host. Error handling: ApiError 403."""
        if self.authenticator is None and not is_loopback_host(host):
            raise ApiError(403, "host not allowed", "an --insecure node answers only to localhost, 127.0.0.1 or [::1]")

    async def json_body(self) -> Any:
        """The current request's body as JSON. Error handling: ApiError 400 or 413."""
        raw = await request.get_data()
        g.body_read = True
        return self.json_of(raw)

    def json_of(self, raw: bytes) -> Any:
        """A request body as JSON. Error handling: ApiError 413 past max_body_bytes, 400 (empty, malformed)."""
        if len(raw) > self.max_body_bytes:
            raise ApiError(413, "body too large", f"at most {self.max_body_bytes} bytes")
        if not raw:
            raise ApiError(400, "empty body", "expected a JSON document")
        return parse_json(raw)

    async def task_or_404(self, task_id: str) -> Task:
        task = await self.service.get(task_id)
        if task is None:
            raise ApiError(404, "no such task", task_id)
        return task


def parse_json(raw: bytes) -> Any:
    """A request body as JSON, refused when it is malformed or unreasonably shaped.

    Error handling: ApiError 400 for malformed JSON, nesting deeper than
    MAX_JSON_DEPTH, or an integer literal over MAX_INT_DIGITS digits; nothing
    else, whatever the bytes.
    """
    if _nesting_depth(raw) > MAX_JSON_DEPTH:
        raise ApiError(400, "JSON nested too deeply", f"at most {MAX_JSON_DEPTH} levels of arrays and objects")
    try:
        return json.loads(raw, parse_int=_bounded_int)
    except UnicodeDecodeError as exc:
        raise ApiError(400, "malformed JSON", f"not UTF-8: {exc.reason}") from None
    except ValueError as exc:  # JSONDecodeError, or an integer literal over the cap
        raise ApiError(400, "malformed JSON", str(exc)) from None
    except RecursionError:  # not reached below MAX_JSON_DEPTH; kept so no input can become a 500
        raise ApiError(400, "JSON nested too deeply", f"at most {MAX_JSON_DEPTH} levels of arrays and objects") from None


def _bounded_int(literal: str) -> int:
    if len(literal.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"integer literal of {len(literal)} digits (at most {MAX_INT_DIGITS})")
    return int(literal)


def _nesting_depth(raw: bytes) -> int:
    """How deep arrays and objects nest in a JSON text, brackets inside strings not counted.

    Measured on the bytes, before parsing: the parser recurses once per level
    and a deep enough document exhausts the stack of the request's handler.
    """
    depth = deepest = 0
    in_string = False
    # Only quotes, brackets and escapes matter; an escape is matched as a pair, so a
    # quote found on its own always opens or closes a string.
    for match in _STRUCTURE.finditer(raw):
        char = match.group()
        if char == b'"':
            in_string = not in_string
        elif in_string or char[0] == 0x5C:
            continue
        elif char in (b"[", b"{"):
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > MAX_JSON_DEPTH:
                    break
        else:
            depth -= 1
    return deepest


def clamp_depth(value: Any, levels: int = MAX_RENDER_DEPTH) -> Any:
    """``value`` with anything nested deeper than ``levels`` replaced by a note saying so.

    For answers only: a value stored before input depth was capped (or written
    to the store by other means) must still list, not fail the whole page.
    """
    if isinstance(value, dict):
        if levels <= 0:
            return TOO_DEEP
        return {k: clamp_depth(v, levels - 1) for k, v in value.items()}
    if isinstance(value, list):
        if levels <= 0:
            return TOO_DEEP
        return [clamp_depth(v, levels - 1) for v in value]
    return value


class ApiError(Exception):
    def __init__(self, status: int, error: str, detail: str = "") -> None:
        super().__init__(detail or error)
        self.status, self.error, self.detail = status, error, detail


def json_text(body: Any) -> str:
    """``body`` as JSON text, whatever a stored value holds: what nests deeper than the
    encoder's stack allows is shown as TOO_DEEP (see clamp_depth) rather than failing."""
    try:
        return json.dumps(body)
    except RecursionError:
        return json.dumps(clamp_depth(body))


def error_answer(exc: Exception, path: str) -> tuple[int, dict[str, Any], dict[str, str]]:
    """The answer to an error a handler of ``path`` raised: (status, JSON body, extra headers).
    What a client can cause is a 4xx; a store that does not answer a 503; anything else a 500, logged."""
    if isinstance(exc, ApiError):
        # The rest of a refused body may still be on the wire: this connection cannot carry
        # another request, so say so and let the server close it.
        return exc.status, {"error": exc.error, "detail": exc.detail}, {"Connection": "close"} if exc.status == 413 else {}
    if isinstance(exc, AuthError):
        body = {"error": "unauthorized" if exc.status == 401 else "forbidden", "detail": exc.message}
        return exc.status, body, {"WWW-Authenticate": 'Bearer realm="p2pnn"'} if exc.status == 401 else {}
    if isinstance(exc, SpecError):
        return 400, {"error": "invalid spec", "detail": str(exc), "field": exc.path}, {}
    if isinstance(exc, IdempotencyConflict):
        return 409, {"error": "idempotency key reused", "detail": str(exc)}, {}
    if isinstance(exc, StoreError):
        log.error("store.unavailable", error=str(exc))
        return 503, {"error": "store unavailable", "detail": "the task store did not answer; try again"}, {}
    log.error("api.unexpected_error", error=repr(exc), path=path)
    return 500, {"error": "internal error", "detail": "the node hit an unexpected error; see its log"}, {}


def is_loopback_host(header: str | None) -> bool:
    """Whether a Host header names this machine's loopback: a name or address, with or without a port.

    No header at all passes: every browser sends one, so its absence is no rebinding page.
    """
    if header is None:
        return True
    host = header.strip().lower()
    if host.startswith("["):  # [::1]:8080
        end = host.find("]")
        if end < 0 or (host[end + 1:] and not _is_port(host[end + 1:])):
            return False
        host = host[1:end]
    elif host.count(":") == 1:
        host, port = host.split(":")
        if not _is_port(":" + port):
            return False
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _is_port(text: str) -> bool:
    return text.startswith(":") and text[1:].isdigit() and 0 < int(text[1:]) < 65536


def json_response(body: Any, status: int = 200) -> Response:
    return Response(json_text(body), status=status, content_type="application/json")


def error_response(status: int, error: str, detail: str = "") -> Response:
    resp = json_response({"error": error, "detail": detail}, status)
    if status == 413:
        # The rest of the refused body may still be on the wire: this connection
        # cannot carry another request, so say so and let the server close it.
        resp.headers["Connection"] = "close"
    return resp
