"""The web UI: static files shipped in the package, served at ``/ui`` (no build step, no key needed).

The pages are plain HTML/CSS/JS modules that call the public REST API (the same routes the client uses),
so the API keys guard the data exactly as they do for curl. Responses carry a strict Content-Security-Policy:
scripts, styles and requests only from this server, no inline code, no framing.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles
from starlette.responses import Response
from starlette.types import Scope

UI_DIR = Path(__file__).resolve().parent.parent / "static" / "ui"
UI_PATH = "/ui"
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; "
                               "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # revalidate (ETag) so an upgraded server never runs stale modules
}


class UiFiles(StaticFiles):
    """``StaticFiles`` serving ``index.html`` for the folder, with the security headers on every answer."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers.update(SECURITY_HEADERS)
        return response


def mount(app: FastAPI) -> None:
    """Serve the UI at /ui/ (``/ui`` redirects there) and send ``/`` to it."""
    app.mount(UI_PATH, UiFiles(directory=UI_DIR, html=True), name="ui")

    @app.get("/", include_in_schema=False)
    async def root() -> RedirectResponse:
        return RedirectResponse(f"{UI_PATH}/")
