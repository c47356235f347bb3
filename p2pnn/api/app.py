"""The Quart-Trio application: route modules, error mapping, request metrics.

Every error a client can cause is a 4xx with ``{"error": ..., "detail": ...}``;
nothing a request carries can produce a 500 or a traceback. Handlers are
thin (api/routes/): the rules live in :mod:`p2pnn.service`.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable

import trio
from quart import Response, g, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from p2pnn.api.auth import AuthError
from p2pnn.api.hot import hot_routes
from p2pnn.api.http import ApiContext, ApiError, error_answer, error_response, json_response
from p2pnn.api.routes import BLUEPRINTS
from p2pnn.store import IdempotencyConflict, StoreError
from p2pnn.tasks import SpecError

__all__ = ["ApiContext", "create_app"]

# Methods counted under their own name in /metrics; any other is "other", so a client
# cannot mint a new series per request (``curl -X XYZ1``).
METRIC_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def create_app(ctx: ApiContext) -> QuartTrio:
    app = QuartTrio("p2pnn")
    app.config["MAX_CONTENT_LENGTH"] = ctx.max_body_bytes
    app.config["PROPAGATE_EXCEPTIONS"] = False
    for make in BLUEPRINTS:
        app.register_blueprint(make(ctx))
    _map_errors(app)
    app.asgi_app = hot_routes(ctx, _finish_responses_shielded(app.asgi_app))  # type: ignore[method-assign]

    if ctx.authenticator is None:

        @app.before_request
        async def check_host() -> None:
            ctx.check_host(request.headers.get("Host"))

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
    """Errors: always JSON, never a traceback (http.error_answer, as the hot routes answer them)."""

    async def answer(exc: Exception) -> Response:
        status, body, headers = error_answer(exc, request.path)
        resp = json_response(body, status)
        resp.headers.update(headers)
        return resp

    for kind in (ApiError, AuthError, SpecError, IdempotencyConflict, StoreError):
        app.register_error_handler(kind, answer)

    @app.errorhandler(HTTPException)
    async def on_http_error(exc: HTTPException) -> Response:
        return error_response(exc.code or 500, (exc.name or "error").lower(), exc.description or "")

    app.register_error_handler(Exception, answer)
