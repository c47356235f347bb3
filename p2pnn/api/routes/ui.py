"""The dashboard: static files from p2pnn/ui/static served at /ui/ (no build step, no token needed to load them).

The page itself holds no data: it asks the API with the token a person pastes in,
exactly as any client does. Only files that ship in that directory are served,
by exact name, so no path can reach anything else.
"""

from __future__ import annotations

from importlib import resources

from quart import Blueprint, Response, redirect

from p2pnn.api.http import ApiError

CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml", ".txt": "text/plain; charset=utf-8", ".png": "image/png",
}
# Everything from this origin, nothing inline: a token in session storage is only as safe as the page's scripts.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


def _files() -> dict[str, bytes]:
    root = resources.files("p2pnn.ui") / "static"
    out: dict[str, bytes] = {}
    for entry in root.iterdir():
        if entry.is_file() and any(entry.name.endswith(ext) for ext in CONTENT_TYPES):
            out[entry.name] = entry.read_bytes()
    return out


def blueprint(ctx: object) -> Blueprint:
    bp = Blueprint("ui", __name__)
    files = _files()  # read once: a few hundred KiB

    def serve(name: str) -> Response:
        data = files.get(name)
        if data is None:
            raise ApiError(404, "no such file", name)
        ext = name[name.rfind("."):]
        return Response(data, content_type=CONTENT_TYPES[ext], headers={
            "Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache",
            "Referrer-Policy": "no-referrer",
        })

    @bp.get("/ui")
    async def ui_root() -> Response:
        return redirect("/ui/", 308)

    @bp.get("/ui/")
    async def ui_index() -> Response:
        return serve("index.html")

    @bp.get("/ui/<name>")
    async def ui_file(name: str) -> Response:
        return serve(name)

    return bp
