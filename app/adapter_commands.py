"""What `feedloop adapters ...` does: list the registry; promote, roll back or pin by hand.

An operator's command is a control event, exactly like the learner's verdicts: the learner
moves traffic when it reads it, the hot-swap controller updates the registry and unloads
what it retires, and the log records who did what (``source="operator"``). The command
checks the transition first, against the registry, so a typo fails here with a hint instead
of as an ignored event.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

from learners.router import LinUCBRouter
from streams.store import Adapter, RouterSnapshot
from streams.contract import AdapterPinned, AdapterPromoted, AdapterRolledBack, AdapterState, utcnow
from trainer.serving import BASE_ALIAS

SOURCE = "operator"


class OperatorError(ValueError):
    """The transition is not allowed; the message says what to do instead."""


@dataclass(frozen=True)
class AdapterRow:
    name: str
    state: str
    parent: str | None
    created_at: str
    swap_ms: float | None
    reason: str | None


@dataclass(frozen=True)
class Routing:
    arms: list[str]
    caps: dict[str, float]
    pinned: str | None


def list_adapters(sessions: sessionmaker) -> list[AdapterRow]:
    with sessions() as session:
        rows = session.scalars(select(Adapter).order_by(Adapter.created_at, Adapter.name)).all()
    return [AdapterRow(r.name, r.state, r.parent, r.created_at.isoformat(timespec="seconds"),
                       (r.lineage or {}).get("serving", {}).get("swap_ms"), r.reason) for r in rows]  # fmt: skip


def current_routing(sessions: sessionmaker) -> Routing | None:
    """What the gateway routes with now: the newest router snapshot's arms, caps and pin."""
    with sessions() as session:
        newest = session.scalar(select(RouterSnapshot).order_by(RouterSnapshot.id.desc()).limit(1))
    if newest is None:
        return None
    router = LinUCBRouter.from_bytes(newest.state, np.random.default_rng())  # read, never drawn from
    return Routing(list(newest.arms), router.caps, router.pinned)


def _live(sessions: sessionmaker, name: str, action: str) -> Adapter | None:
    """The registry row of an adapter the router serves (None for the base model), or
    OperatorError. The base model is live until the first promotion retires it."""
    routing = current_routing(sessions)
    if name == BASE_ALIAS:
        if routing is not None and BASE_ALIAS not in routing.arms:
            raise OperatorError(f"cannot {action} the base model: it was retired; live: {', '.join(routing.arms)}")
        return None
    with sessions() as session:
        row = session.get(Adapter, name)
    if row is None:
        raise OperatorError(f"no adapter {name!r}; `feedloop adapters list` shows them")
    if row.state not in (AdapterState.CHALLENGER, AdapterState.CHAMPION):
        raise OperatorError(f"cannot {action} {name!r}: it is {row.state}, not serving")
    return row


def promote(sessions: sessionmaker, name: str) -> AdapterPromoted:
    row = _live(sessions, name, "promote")
    if row is not None and row.state == AdapterState.CHAMPION:
        raise OperatorError(f"{name!r} is already the champion")
    with sessions() as session:
        previous = session.scalar(select(Adapter.name).where(Adapter.state == AdapterState.CHAMPION))
    if row is None and previous is None:
        raise OperatorError("the base model is already the champion")
    return AdapterPromoted(event_id=f"operator-{uuid.uuid4().hex}", occurred_at=utcnow(), source=SOURCE,
                           adapter=name, previous_champion=previous or BASE_ALIAS)  # fmt: skip


def rollback(sessions: sessionmaker, name: str, reason: str) -> AdapterRolledBack:
    if name == BASE_ALIAS:
        raise OperatorError("the base model cannot be rolled back; it is what traffic falls back to")
    with sessions() as session:
        row = session.get(Adapter, name)
    if row is None:
        raise OperatorError(f"no adapter {name!r}; `feedloop adapters list` shows them")
    if row.state == AdapterState.CHAMPION:
        raise OperatorError(f"{name!r} is the champion: promote another live adapter first, "
                            "then it is retired and unloaded")  # fmt: skip
    if row.state not in (AdapterState.READY, AdapterState.CHALLENGER):
        raise OperatorError(f"cannot roll back {name!r}: it is {row.state}")
    return AdapterRolledBack(event_id=f"operator-{uuid.uuid4().hex}", occurred_at=utcnow(), source=SOURCE,
                             adapter=name, reason=f"operator: {reason}")  # fmt: skip


def pin(sessions: sessionmaker, name: str | None) -> AdapterPinned:
    if name is not None:
        _live(sessions, name, "pin")
    return AdapterPinned(event_id=f"operator-{uuid.uuid4().hex}", occurred_at=utcnow(), source=SOURCE, adapter=name)
