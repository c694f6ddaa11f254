"""Pickling a long-lived immutable model once for all the checkpoints that meet it.

A checkpoint pickles a partition's whole state every few seconds, and much of it (an open
interaction, a training record kept for replay) is the same as at the last checkpoint, while
pickling a pydantic model costs ~10 µs. The first checkpoint that meets a model pickles it
inline, like the rest of the state (cheapest when it is met only once); from the second on, a
pickle kept beside it on its holder is copied instead. The model must never be replaced on
its holder (the holders here are frozen or never reassign it).
"""

from __future__ import annotations

import pickle
from typing import Any

_MET_ONCE = b""


def for_state(holder: object, name: str) -> Any:
    """What to put in the holder's pickled state for ``holder.<name>``: the model, or its pickle."""
    cache = f"_pickled_{name}"  # straight into __dict__: frozen dataclasses refuse setattr
    kept = holder.__dict__.get(cache)
    if kept is None:
        holder.__dict__[cache] = _MET_ONCE
        return getattr(holder, name)
    if kept is _MET_ONCE:
        kept = holder.__dict__[cache] = pickle.dumps(getattr(holder, name), protocol=pickle.HIGHEST_PROTOCOL)
    return kept


def from_state(value: Any) -> Any:
    """The model back from what :func:`for_state` gave."""
    return pickle.loads(value) if isinstance(value, bytes) else value
