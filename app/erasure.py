"""Erasing a user, for the gateway's ``POST /v1/users/{id}/erase`` and ``feedloop erase``.

1. The user's pseudonym is read while their key still exists, then the key is shredded
   (``streams.pseudonyms``): from here on, nothing can tie the pseudonym to the user.
2. The erasure is recorded in the store under that pseudonym (``trainer.erasure``), with the
   adapters already trained on the user's data: the answer names them for retraining.
3. The caller announces the ``user_erased`` control event and then marks the row announced;
   the trainer cuts the user out of the batches it has not trained.

Erasing again is idempotent: a user who is erased (no key since) is not shredded again, which
would move the erasure's time, and gets the first erasure's answer, found by that time (the
key store keeps it; the row has it too). An erasure whose announcement failed is announced
by the repeat. A user the key store never saw has no pseudonym and nothing to cut out: their
erasure is recorded in the key store only, so their events from before it are never trained.
"""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field
from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

from streams.contract import UserErased
from streams.pseudonyms import KeyStore, Pseudonymizer, user_identity
from streams.store import Erasure
from trainer.erasure import erasure_event, record_erasure


class ErasureAnswer(BaseModel):
    app_id: str
    user_id: str
    erased_at: datetime = Field(description="Events of the user up to this time are never trained on.")
    retrain_adapters: list[str] = Field(
        description="Adapters already trained on the user's data (or continuing from one): retrain them without it."
    )
    already_erased: bool = Field(description="The user was erased before: nothing was done again.")


def erase_user(keys: KeyStore, sessions: sessionmaker, app_id: str,
               user_id: str) -> tuple[ErasureAnswer, UserErased | None]:  # fmt: skip
    """Erase the user; returns the answer and the event still to announce (None: nothing to
    announce, or announced already). Announce it, then :func:`trainer.erasure.mark_announced`."""
    user = user_identity(app_id, user_id)
    pseudonyms = Pseudonymizer(keys)
    if already := pseudonyms.is_erased(user):
        erased_at = pseudonyms.erased_at(user)
        with sessions() as session:
            row = session.scalar(select(Erasure).where(Erasure.app_id == app_id, Erasure.erased_at == erased_at))
    else:
        pseudonym = pseudonyms.pseudonym(user) if pseudonyms.key_store.has_key(user) else None
        pseudonyms.erase(user)
        erased_at = pseudonyms.erased_at(user)
        row = None if pseudonym is None else record_erasure(
            sessions, erasure_event(app_id, pseudonym, erased_at), announced=False)  # fmt: skip
    answer = ErasureAnswer(app_id=app_id, user_id=user_id, erased_at=erased_at, already_erased=already,
                           retrain_adapters=row.adapters if row else [])  # fmt: skip
    pending = row is not None and not row.announced
    return answer, erasure_event(row.app_id, row.pseudonym, row.erased_at) if pending else None
