"""``GET /healthz``: liveness, for load balancers and container health checks.

It answers from the process alone (no broker, no store, no key), so a gateway is taken out of
rotation only when it cannot serve at all; a broker outage is the 503 of ``/v1/events``.
"""

from __future__ import annotations

from fastapi import APIRouter


def health_router() -> APIRouter:
    router = APIRouter()

    @router.get("/healthz", summary="Liveness")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return router
