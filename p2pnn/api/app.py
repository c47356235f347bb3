"""The Quart-Trio application: route modules, error mapping, request metrics.

Every error a client can cause is a 4xx with ``{"error": ..., "detail": ...}``;
nothing a request carries can produce a 500 or a traceback. Handlers are
thin (api/routes/): the rules live in :mod:`p2pnn.service`.
"""

from __future__ import annotations

import time

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


def create_app(ctx: ApiContext) -> QuartTrio:
    app = QuartTrio("p2pnn")
    app.config["MAX_CONTENT_LENGTH"] = ctx.max_body_bytes
    app.config["PROPAGATE_EXCEPTIONS"] = False
    for make in BLUEPRINTS:
        app.register_blueprint(make(ctx))
    _map_errors(app)

    @app.before_request
    async def start_timer() -> None:
        g.started = time.perf_counter()

    @app.after_request
    async def count(response: Response) -> Response:
        rule = request.url_rule.rule if request.url_rule is not None else "unmatched"
        ctx.metrics.http_requests.labels(method=request.method, route=rule, status=str(response.status_code)).inc()
        return response

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
