"""Feedback tokens: what a browser holds instead of the app's secret key. A pure core.

A web app's page must never hold the app's API key: anyone could read it and post anything as
the app. The chat gateway gives each answer a **feedback token** instead (``feedback_token``
in the answer's ``feedloop`` object; ``POST /v1/feedback-tokens`` mints one for interactions an
app records itself). A token lets its holder do one thing: post ``feedback`` events on the
interactions it names (a ``pairwise`` choice between two of them included), for its app,
until it expires (``FEEDLOOP_BROWSER__TOKEN_TTL_S``). Everything else it is sent with is
refused (403): another interaction, another event type, another app.

A token is ``fbt1.<payload>.<signature>``: the payload (app, interaction ids, expiry) in
base64url JSON, signed with HMAC-SHA256 under the app's own API key. So it is checked with
nothing stored, every gateway process that holds the app's key accepts it, and rotating the
key revokes every token made with it. Not encrypted: the ids in it are the ones the page was
given anyway.

>>> tokens = FeedbackTokens({"chat-web": "s3cret"}, ttl_s=60)
>>> token = tokens.mint("chat-web", ["i-1"], now=1000.0)
>>> tokens.verify(token, now=1030.0)
FeedbackScope(app_id='chat-web', interaction_ids=('i-1',), expires_at=1060.0)
>>> tokens.verify(token, now=1061.0) is None
True
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from pydantic import BaseModel, Field, SecretStr

from streams.contract import Feedback
from streams.intake import UserEventModel

PREFIX = "fbt1."
_PURPOSE = b"feedloop feedback token v1\n"


class BrowserSettings(BaseModel):
    """What a browser may do (``FEEDLOOP_BROWSER__<FIELD>``)."""

    token_ttl_s: float = Field(3600.0, gt=0, description="How long a feedback token stays valid, from the answer.")
    cors_origins: dict[str, list[str]] = Field(
        default_factory=dict,
        description='Web origins allowed to post feedback with a token, by app, e.g. FEEDLOOP_BROWSER__CORS_ORIGINS='
        '\'{"chat-web": ["https://chat.example.com"]}\'. Default: none (no cross-origin request is allowed).',
    )


@dataclass(frozen=True)
class FeedbackScope:
    """What a valid token allows: feedback on these interactions of this app, until then."""

    app_id: str
    interaction_ids: tuple[str, ...]
    expires_at: float

    def refusal(self, event: UserEventModel) -> str | None:
        """Why this token may not post ``event``; None: it may. (Its app is the intake's to
        check, as for a key: an event of another app is rejected before this.)"""
        if not isinstance(event, Feedback):
            return f"a feedback token posts feedback only, not {event.type} events"
        named = [event.interaction_id, *([event.rejected_interaction_id] if event.rejected_interaction_id else [])]
        outside = [i for i in named if i not in self.interaction_ids]
        if outside:
            return f"this token is for {', '.join(self.interaction_ids)}, not {outside[0]}"
        return None


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class FeedbackTokens:
    """Mints and checks feedback tokens with the apps' keys (app id -> key)."""

    def __init__(self, keys: Mapping[str, SecretStr | str], ttl_s: float) -> None:
        self._keys = {app: (k.get_secret_value() if isinstance(k, SecretStr) else k).encode() for app, k in keys.items()}
        self.ttl_s = ttl_s

    def _sign(self, app_id: str, payload: str) -> str:
        return _b64(hmac.new(self._keys[app_id], _PURPOSE + payload.encode(), hashlib.sha256).digest())

    def mint(self, app_id: str, interaction_ids: Sequence[str], now: float | None = None) -> str:
        expires = (time.time() if now is None else now) + self.ttl_s
        payload = _b64(json.dumps({"a": app_id, "i": list(interaction_ids), "e": expires}, separators=(",", ":")).encode())
        return f"{PREFIX}{payload}.{self._sign(app_id, payload)}"

    def verify(self, token: str, now: float | None = None) -> FeedbackScope | None:
        """The scope of a genuine, unexpired token; None for anything else."""
        if not token.startswith(PREFIX) or token.count(".") != 2:
            return None
        payload, signature = token[len(PREFIX):].split(".")
        try:
            claims = json.loads(_unb64(payload))
            app_id, ids, expires = claims["a"], tuple(claims["i"]), float(claims["e"])
        except (ValueError, KeyError, TypeError, binascii.Error):
            return None
        if not isinstance(app_id, str) or app_id not in self._keys:
            return None
        if not hmac.compare_digest(self._sign(app_id, payload), signature):
            return None
        if expires < (time.time() if now is None else now):
            return None
        return FeedbackScope(app_id, ids, expires)
