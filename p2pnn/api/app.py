"""The Quart-Trio application: route modules, error mapping, request metrics.

Every error a client can cause is a 4xx with ``{"error": ..., "detail": ...}``;
nothing a request carries can produce a 500 or a traceback. Handlers are
thin (api/routes/): the rules live in :mod:`p2pnn.service`.
"""

from __future__ import annotations

import ipaddress
import time
from typing import Any, Awaitable, Callable

import trio
from quart import Response, g, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from p2pnn import logs
from p2pnn.api.auth import AuthError
from p2pnn.api.http import ApiContext, ApiError, error_response, json_response
from p2pnn.api.routes import BLUEPRINTS
from p2pnn.store import IdempotencyConflict, StoreError
from p2pnn.tasks import SpecError

log = logs.get(__name__)

__all__ = ["ApiContext", "create_app"]

# Methods counted under their own name in /metrics; any other is "other", so a client
# cannot mint a new series per request (``curl -X XYZ1``).
METRIC_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# Host names an --insecure node answers to. A web page that rebinds its own name to
# 127.0.0.1 still sends that name, so checking Host stops it driving an unauthenticated API.
LOOPBACK_NAMES = frozenset({"localhost", "localhost."})


def create_app(ctx: ApiContext) -> QuartTrio:
    app = QuartTrio("p2pnn")
    app.config["MAX_CONTENT_LENGTH"] = ctx.max_body_bytes
    app.config["PROPAGATE_EXCEPTIONS"] = False
    for make in BLUEPRINTS:
        app.register_blueprint(make(ctx))
    _map_errors(app)
    app.asgi_app = _finish_responses_shielded(app.asgi_app)  # type: ignore[method-assign]

    @app.before_request
    async def start_timer() -> None:
        g.started = time.perf_counter()

    if ctx.authenticator is None:

        @app.before_request
        async def check_host() -> None:
            if not is_loopback_host(request.headers.get("Host")):
                raise ApiError(403, "host not allowed", "an --insecure node answers only to localhost, 127.0.0.1 or [::1]")

    @app.after_request
    async def count(response: Response) -> Response:
        rule = request.url_rule.rule if request.url_rule is not None else "unmatched"
        method = request.method if request.method in METRIC_METHODS else "other"
        ctx.metrics.http_requests.labels(method=method, route=rule, status=str(response.status_code)).inc()
        if response.status_code >= 400 and not _body_consumed():
            # Refused before its body was read: the rest of it may still be on the wire, so this
            # connection cannot carry another request; say so, and the server closes it.
            response.headers["Connection"] = "close"
        return response

    return app


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


def _body_consumed() -> bool:
    """Whether the current request declared no body, or its handler read it (ApiContext.json_body)."""
    declared = request.headers.get("Content-Length", "0").strip() not in ("", "0") or "Transfer-Encoding" in request.headers
    return not declared or bool(g.get("body_read", False))


ASGIApp = Callable[[dict, Callable[[], Awaitable[dict]], Callable[[dict], Awaitable[None]]], Awaitable[None]]


def _finish_responses_shielded(asgi_app: ASGIApp) -> ASGIApp:
    """Send each response's last body message under a shield.

    quart-trio cancels a request's tasks as soon as the request ends. When the
    response went out before the request body was read (a 401 or 413 refusal),
    hypercorn learns of the end only inside that last send, and then has to
    close the connection; cancelled there, it never did, and the connection
    hung: the client's next request on it was never answered.
    """

    async def app(scope: dict, receive: Callable[[], Awaitable[dict]], send: Callable[[dict], Awaitable[None]]) -> None:
        if scope.get("type") != "http":
            await asgi_app(scope, receive, send)
            return

        async def send_last_shielded(message: dict[str, Any]) -> None:
            if message.get("type") == "http.response.body" and not message.get("more_body", False):
                with trio.CancelScope(shield=True):
                    await send(message)
            else:
                await send(message)

        await asgi_app(scope, receive, send_last_shielded)

    return app


def _map_errors(app: QuartTrio) -> None:
    """Errors: always JSON, never a traceback."""

    @app.errorhandler(ApiError)
    async def on_api_error(exc: ApiError) -> Response:
        return error_response(exc.status, exc.error, exc.detail)

    @app.errorhandler(AuthError)
    async def on_auth_error(exc: AuthError) -> Response:
        resp = error_response(exc.status, "unauthorized" if exc.status == 401 else "forbidden", exc.message)
        if exc.status == 401:
            resp.headers["WWW-Authenticate"] = 'Bearer realm="p2pnn"'
        return resp

    @app.errorhandler(SpecError)
    async def on_spec_error(exc: SpecError) -> Response:
        return json_response({"error": "invalid spec", "detail": str(exc), "field": exc.path}, 400)

    @app.errorhandler(IdempotencyConflict)
    async def on_conflict(exc: IdempotencyConflict) -> Response:
        return error_response(409, "idempotency key reused", str(exc))

    @app.errorhandler(StoreError)
    async def on_store_error(exc: StoreError) -> Response:
        log.error("store.unavailable", error=str(exc))
        return error_response(503, "store unavailable", "the task store did not answer; try again")

    @app.errorhandler(HTTPException)
    async def on_http_error(exc: HTTPException) -> Response:
        return error_response(exc.code or 500, (exc.name or "error").lower(), exc.description or "")

    @app.errorhandler(Exception)
    async def on_unexpected(exc: Exception) -> Response:
        log.error("api.unexpected_error", error=repr(exc), path=request.path)
        return error_response(500, "internal error", "the node hit an unexpected error; see its log")
