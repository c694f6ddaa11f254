"""``POST /v1/users/{user_id}/erase``: no later training batch holds anything of the user's.

Erasure crypto-shreds the user's pseudonym key (``streams.pseudonyms``, docs/privacy.md): the
pseudonyms already in the log, archives and batches can no longer be tied back to the user, and
replays drop the user's events from before the answer's ``erased_at``. The gateway shares the
key directory with the pipeline worker (``FEEDLOOP_KEY_DIR``).

A user is (app, user id): an app's key erases its own app's user of that id and no other app's
(``?app_id=`` naming another app is refused); an operator key erases the user of the app that
``?app_id=`` names.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import structlog
from fastapi import APIRouter, Request
from pydantic import ValidationError

from app.gateway.auth import ApiKeys
from app.gateway.http import UNAUTHENTICATED_DETAIL, ErrorBody, error, over_limit
from app.rate_limit import RateLimiter
from streams.contract import ID_ADAPTER
from streams.pseudonyms import FileKeyStore, Pseudonymizer, user_identity

log = structlog.get_logger(__name__)


def erase_router(keys: ApiKeys, limiter: RateLimiter, key_dir: Path) -> APIRouter:
    router = APIRouter()

    @router.post(
        "/v1/users/{user_id}/erase",
        status_code=202,
        responses={401: {"model": ErrorBody}, 403: {"model": ErrorBody}, 422: {"model": ErrorBody},
                   429: {"model": ErrorBody}},  # fmt: skip
        summary="Erase a user of your app (an operator: of the app named by ?app_id=)",
    )
    async def erase_user(user_id: str, request: Request, app_id: str | None = None) -> Any:
        caller = keys.app_for_header(request)
        operator = None if caller is not None else keys.operator_for_header(request)  # never by the dashboard's cookie
        if caller is not None:
            if app_id is not None and app_id != caller:
                return error(403, "forbidden", f"an app's key erases its own app's users; '{app_id}' is not "
                             f"'{caller}' (an operator key erases any app's)")  # fmt: skip
            if (refused := over_limit(limiter, caller)) is not None:  # each erase fsyncs the key store
                return refused
            app_id = caller
        elif operator is None:
            return error(401, "unauthenticated", UNAUTHENTICATED_DETAIL)
        elif app_id is None:
            return error(422, "invalid_request", "an operator erases a user of one app: add ?app_id=<app>")
        try:
            ID_ADAPTER.validate_python(user_id)
            ID_ADAPTER.validate_python(app_id)
        except ValidationError as exc:
            return error(422, "invalid_request", f"not an id events can carry: {exc.errors(include_url=False)[0]['msg']}")
        user = user_identity(app_id, user_id)
        pseudonyms = Pseudonymizer(FileKeyStore(key_dir))
        pseudonyms.erase(user)
        log.info("gateway.user_erased", app_id=app_id, by=caller or f"operator {operator}")  # never the user id
        return {"app_id": app_id, "user_id": user_id, "erased_at": pseudonyms.erased_at(user).isoformat()}

    return router
