"""``POST /v1/users/{user_id}/erase``: no batch still to train holds anything of the user's.

Erasure crypto-shreds the user's pseudonym key (``streams.pseudonyms``, docs/privacy.md): the
pseudonyms already in the log, archives and batches can no longer be tied back to the user, and
replays drop the user's events from before the answer's ``erased_at``. It is announced as a
``user_erased`` control event, on which the trainer cuts the user's records out of the batches
it has not trained; the answer's ``retrain_adapters`` names the adapters already trained on
them (``app.erasure``). The gateway shares the key store with the pipeline worker
(``keys/`` of ``FEEDLOOP_STORAGE__URL``, or ``FEEDLOOP_KEY_DIR``). Erasing again answers the same and does nothing again.

A user is (app, user id): an app's key erases its own app's user of that id and no other app's
(``?app_id=`` naming another app is refused); an operator key erases the user of the app that
``?app_id=`` names.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import structlog
from fastapi import APIRouter, Request
from pydantic import ValidationError

from sqlalchemy.orm import sessionmaker

from app import erasure
from app.gateway.auth import ApiKeys
from app.gateway.http import UNAUTHENTICATED_DETAIL, ErrorBody, error, over_limit
from app.publisher import Publisher, PublishError
from app.rate_limit import RateLimiter
from streams.contract import ID_ADAPTER
from streams.pseudonyms import KeyStore
from trainer.erasure import mark_announced

log = structlog.get_logger(__name__)


def erase_router(keys: ApiKeys, limiter: RateLimiter, key_store: Callable[[], KeyStore], sessions: sessionmaker,
                 publisher: Publisher) -> APIRouter:  # fmt: skip
    router = APIRouter()
    # One erasure at a time: two requests for one user at once would both shred, and the second
    # would move the erasure's time away from its recorded answer.
    one_at_a_time = asyncio.Lock()
    # A key store per erasure (``key_store()``): its caches start empty, so an erasure another
    # gateway made a moment before is seen at once, not only after a cache's recheck interval.

    @router.post(
        "/v1/users/{user_id}/erase",
        status_code=202,
        response_model=erasure.ErasureAnswer,
        responses={401: {"model": ErrorBody}, 403: {"model": ErrorBody}, 422: {"model": ErrorBody},
                   429: {"model": ErrorBody}, 503: {"model": ErrorBody}},  # fmt: skip
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
        async with one_at_a_time:
            answer, announce = await asyncio.to_thread(erasure.erase_user, key_store(), sessions, app_id, user_id)
            log.info("gateway.user_erased", app_id=app_id, by=caller or f"operator {operator}",
                     already=answer.already_erased, retrain=answer.retrain_adapters)  # never the user id
            if announce is not None:
                try:
                    await publisher.publish_control(announce)
                except PublishError as exc:
                    return error(503, "not_announced", f"the user is erased (their key is shredded), but the trainer "
                                 f"was not told: {exc}")  # fmt: skip
                await asyncio.to_thread(mark_announced, sessions, announce.pseudonym)
        return answer

    return router
