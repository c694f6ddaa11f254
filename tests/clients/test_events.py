"""The event builders and the Retry-After reading, on their own (no gateway needed)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from email.utils import format_datetime

import httpx
import pytest

from feedloop_client import feedback, interaction
from feedloop_client.retry import retry_after_s
from streams.contract import USER_EVENT_ADAPTER


def test_built_events_carry_their_ids_and_an_aware_time_and_fit_the_contract():
    turn = interaction("app-a", user_id="u", session_id="s", adapter="base",
                       prompt=[{"role": "user", "content": "hi"}], response="hello")  # fmt: skip
    thumbs = feedback("app-a", turn, "thumbs", value=1, comment="short and right")
    assert thumbs["interaction_id"] == turn["interaction_id"] and thumbs["session_id"] == "s"
    assert datetime.fromisoformat(turn["occurred_at"]).utcoffset() is not None
    assert turn["event_id"] != thumbs["event_id"]
    for event in (turn, thumbs, feedback("app-a", "i-1", "score", name="helpfulness", label="true")):
        USER_EVENT_ADAPTER.validate_python(event)  # the server's own contract accepts them
    with pytest.raises(ValueError, match="timezone"):
        feedback("app-a", "i-1", "copy", occurred_at=datetime.now())


def test_retry_after_is_read_as_seconds_or_as_an_http_date():
    def answer(value):
        return httpx.Response(429, headers={"Retry-After": value})

    assert retry_after_s(answer("3")) == 3.0
    later = format_datetime(datetime.now(timezone.utc) + timedelta(seconds=30), usegmt=True)
    assert 25 < retry_after_s(answer(later)) <= 30
    assert retry_after_s(answer("soon")) is None
    assert retry_after_s(httpx.Response(429)) is None
