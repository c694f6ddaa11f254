"""The dashboard: ``GET /dashboard`` and the JSON it polls, ``GET /v1/overview``; every app for
an operator, its own app for an app's key (``app.overview.OverviewSource.read``).

The page (``app/gateway/dashboard_static/``) fetches the overview every few seconds and draws
it with Plotly. plotly.js is served from the installed ``plotly`` Python package
(``plotly/package_data/plotly.min.js``), so nothing is vendored into this repository and the
page needs no network beyond the gateway. Authentication: ``app.gateway.auth``.
"""

from __future__ import annotations

import asyncio
import importlib.util
from functools import cache
from pathlib import Path
from typing import Any

import structlog
from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response

from app.gateway.auth import ApiKeys, set_session_cookie
from app.gateway.http import error
from app.overview import OverviewSource

log = structlog.get_logger(__name__)

STATIC = Path(__file__).parent / "dashboard_static"
OWN_ASSETS = ("dashboard.js", "dashboard.css", "review.js", "review.css")
PAGE_HEADERS = {
    # Plotly sets inline styles; everything else comes from the gateway itself.
    "Content-Security-Policy": "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:",
    "Referrer-Policy": "no-referrer",  # the first URL carries the key
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
}
SIGN_IN = """<!doctype html><meta charset="utf-8"><title>feedloop dashboard</title>
<p>{message}</p><p>Open <code>/dashboard?key=&lt;your key&gt;</code> once (an operator key shows every
app, an app's key its own app); the browser then keeps a session cookie (docs/operations.md).</p>"""


@cache
def plotly_js() -> Path | None:
    """plotly.min.js inside the installed plotly package, found without importing it."""
    spec = importlib.util.find_spec("plotly")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "package_data" / "plotly.min.js"
    return path if path.exists() else None


def dashboard_router(keys: ApiKeys, overview: OverviewSource) -> APIRouter:
    router = APIRouter()

    @router.get("/dashboard", include_in_schema=False)
    async def dashboard(request: Request, key: str | None = None) -> Response:
        if key is not None:
            operator, app = keys.operator_for_key(key), keys.app_for_key(key)
            if operator is None and app is None:
                return HTMLResponse(SIGN_IN.format(message="That key is not one of this gateway's keys."), 401)
            # Trade the key for the cookie and drop it from the address bar and history.
            response = RedirectResponse("/dashboard", status_code=303, headers={"Referrer-Policy": "no-referrer"})
            set_session_cookie(response, request, key, "app" if operator is None else "operator")
            log.info("dashboard.signed_in", operator=operator, app_id=app)
            return response
        if keys.viewer(request) is None:
            return HTMLResponse(SIGN_IN.format(message="Sign in with an operator key or your app's key."), 401)
        return FileResponse(STATIC / "dashboard.html", media_type="text/html", headers=PAGE_HEADERS)

    @router.get("/dashboard/static/{name}", include_in_schema=False)
    async def asset(name: str) -> Response:
        # Public code only (no data): served without a key, like any login page's scripts.
        if name in OWN_ASSETS:
            return FileResponse(STATIC / name, headers={"Cache-Control": "no-cache"})
        if name == "plotly.min.js" and (path := plotly_js()) is not None:
            return FileResponse(path, media_type="text/javascript", headers={"Cache-Control": "max-age=86400"})
        raise HTTPException(404, f"no asset '{name}'")

    @router.get("/v1/overview", summary="The loop at a glance: what the dashboard shows (docs/operations.md)")
    async def get_overview(request: Request) -> Any:
        if (viewer := keys.viewer(request)) is None:
            return error(401, "unauthenticated", "send an operator key or your app's key as 'Authorization: Bearer "
                         "<key>', or open /dashboard?key=<key>")  # fmt: skip
        # Store queries and segment reads block: keep them off the event loop.
        snapshot = await asyncio.to_thread(overview.read, viewer.app_id)
        return JSONResponse(snapshot.to_json(), headers={"Cache-Control": "no-store"})

    return router
