"""``GET /v1/schemas``: the event contract's JSON Schemas, for apps that validate before posting.

Served without a key: the contract is public, like the OpenAPI spec (``/openapi.json``) that
refers to the same models.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException

from streams.contract import SCHEMAS, json_schema


def schemas_router() -> APIRouter:
    router = APIRouter()

    @router.get("/v1/schemas", summary="Names of the event contract's JSON Schemas")
    async def list_schemas() -> dict[str, list[str]]:
        return {"schemas": sorted(SCHEMAS)}

    @router.get("/v1/schemas/{name}.json", summary="One JSON Schema of the event contract")
    async def get_schema(name: str) -> dict[str, Any]:
        if name not in SCHEMAS:
            raise HTTPException(404, f"no schema '{name}'; see /v1/schemas")
        return json_schema(name)

    return router
