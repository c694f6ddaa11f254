"""``POST /v1/users/{user_id}/erase``: no later training batch holds anything of the user's.

Erasure crypto-shreds the user's pseudonym key (``streams.pseudonyms``, docs/privacy.md): the
pseudonyms already in the log, archives and batches can no longer be tied back to the user, and
replays drop the user's events from before the answer's ``erased_at``. The gateway shares the
key directory with the pipeline worker (``FEEDLOOP_KEY_DIR``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import structlog
from fastapi import APIRouter, Request

from app.gateway.auth import ApiKeys
from app.gateway.http import UNAUTHENTICATED_DETAIL, ErrorBody, error, over_limit
from app.rate_limit import RateLimiter
from streams.pseudonyms import FileKeyStore, Pseudonymizer

log = structlog.get_logger(__name__)


def erase_router(keys: ApiKeys, limiter: RateLimiter, key_dir: Path) -> APIRouter:
    router = APIRouter()

    @router.post(
        "/v1/users/{user_id}/erase",
        status_code=202,
        responses={401: {"model": ErrorBody}, 429: {"model": ErrorBody}},
        summary="Erase a user: no later training batch holds anything of theirs",
    )
    async def erase_user(user_id: str, request: Request) -> Any:
        app_id = keys.app_for_header(request)
        if app_id is None:
            return error(401, "unauthenticated", UNAUTHENTICATED_DETAIL)
        if (refused := over_limit(limiter, app_id)) is not None:  # each erase fsyncs the key store
            return refused
        pseudonyms = Pseudonymizer(FileKeyStore(key_dir))
        pseudonyms.erase(user_id)
        log.info("gateway.user_erased")  # the user id is deliberately not logged
        return {"erased_at": pseudonyms.erased_at(user_id).isoformat()}

    return router
