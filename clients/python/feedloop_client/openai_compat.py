"""Route an existing ``openai`` client through feedloop's chat gateway, and read the ids back.

The gateway speaks OpenAI's chat API, so the only change an app makes is the base URL and the
key: ``wrap_openai`` returns a copy of the app's client (``with_options``, which both
``OpenAI`` and ``AsyncOpenAI`` have) pointed at the gateway, with the app's other settings
(timeouts, retries, headers) kept. Answers are still openai's objects; the gateway adds a
``feedloop`` object to the body, which openai keeps in ``model_extra``, and ``feedloop_ids``
reads it. openai is never imported here: an app that has no use for it does not need it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

C = TypeVar("C")


def wrap_openai(client: C, *, gateway_url: str, api_key: str) -> C:
    """``client`` (``openai.OpenAI`` or ``openai.AsyncOpenAI``) talking to the gateway at
    ``gateway_url`` with the app's feedloop key."""
    return client.with_options(base_url=gateway_url.rstrip("/") + "/v1", api_key=api_key)  # type: ignore[attr-defined]


@dataclass(frozen=True)
class FeedloopIds:
    """What the gateway recorded for one answer: post feedback on ``interaction_id`` (choice
    ``i`` of ``n>1``: ``interaction_ids[i]``); ``session_id`` is where it was recorded."""

    interaction_id: str
    interaction_ids: tuple[str, ...]
    session_id: str
    adapter: str


def feedloop_ids(answer: Any) -> FeedloopIds | None:
    """The ids of a chat completion (or of the first chunk of a stream) from the gateway;
    None when the answer carries none (it did not come through the gateway)."""
    extra = answer if isinstance(answer, Mapping) else getattr(answer, "model_extra", None) or {}
    ids = extra.get("feedloop")
    if not ids:
        return None
    return FeedloopIds(
        interaction_id=ids["interaction_id"],
        interaction_ids=tuple(ids.get("interaction_ids") or (ids["interaction_id"],)),
        session_id=ids["session_id"],
        adapter=ids["adapter"],
    )
