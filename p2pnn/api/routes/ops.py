"""Operations: /health (alive), /ready (able to work), /metrics (Prometheus), /openapi.json."""

from __future__ import annotations

from quart import Blueprint, Response

from p2pnn import logs
from p2pnn.api.http import ApiContext, json_response
from p2pnn.api.openapi import openapi
from p2pnn.metrics import CONTENT_TYPE
from p2pnn.store import StoreError

log = logs.get(__name__)


def blueprint(ctx: ApiContext) -> Blueprint:
    bp = Blueprint("ops", __name__)

    @bp.get("/health")
    async def health() -> Response:
        return json_response({"status": "ok", "node_id": ctx.node_id})

    @bp.get("/ready")
    async def ready() -> Response:
        ok, detail = await ctx.ready()
        return json_response({"ready": ok, **detail}, 200 if ok else 503)

    @bp.get("/metrics")
    async def metrics() -> Response:
        try:
            ctx.metrics.set_task_counts(await ctx.service.store.counts())
        except StoreError as exc:
            log.warning("metrics.store_unreachable", error=str(exc))
        return Response(ctx.metrics.render(), content_type=CONTENT_TYPE)

    @bp.get("/openapi.json")
    async def openapi_json() -> Response:
        return json_response(openapi())

    return bp
