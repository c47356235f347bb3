"""The swarm as this node sees it: /api/v1/nodes and /api/v1/cluster."""

from __future__ import annotations

from typing import Any

from quart import Blueprint, Response

from p2pnn.api.http import ApiContext, ApiError, json_response


def blueprint(ctx: ApiContext) -> Blueprint:
    bp = Blueprint("swarm", __name__)

    def view() -> tuple[dict[str, Any], list[dict[str, Any]]]:
        if ctx.cluster is None:
            raise ApiError(404, "no swarm view", "this node does not describe a swarm")
        return ctx.cluster()

    @bp.get("/api/v1/nodes")
    async def nodes() -> Response:
        ctx.caller("viewer")
        return json_response({"nodes": view()[1]})

    @bp.get("/api/v1/cluster")
    async def cluster() -> Response:
        ctx.caller("viewer")
        return json_response(view()[0])

    return bp
