"""The OpenAPI spec of request bodies the routers read raw (``app.gateway.http``).

FastAPI documents a body only when it parses it, so each such route states its body's schema
(``raw_body``) with references into the spec's components, and ``with_components`` adds the
models those references name (the event types, ``Context``...) to the spec when it is built.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from pydantic import TypeAdapter

_REF = "#/components/schemas/{model}"


def body_schema(model: TypeAdapter) -> dict[str, Any]:
    """The model's JSON Schema, referring to the components instead of carrying its ``$defs``."""
    schema = model.json_schema(ref_template=_REF)
    schema.pop("$defs", None)
    return schema


def raw_body(content: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """A route's ``openapi_extra``: its required body, by media type."""
    return {"requestBody": {"required": True, "content": content}}


def with_components(app: FastAPI, *models: TypeAdapter) -> None:
    """Add the models the raw request bodies refer to to the spec's components."""
    base_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            spec = base_openapi()
            defs: dict[str, Any] = {}
            for model in models:
                defs.update(model.json_schema(ref_template=_REF).get("$defs", {}))
            spec.setdefault("components", {}).setdefault("schemas", {}).update(defs)
        return app.openapi_schema or spec

    app.openapi = openapi  # type: ignore[method-assign]
