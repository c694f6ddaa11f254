"""Who is asking: the app whose API key a request carries.

Programs send the key as ``Authorization: Bearer <key>`` or ``X-API-Key: <key>`` on every
gateway endpoint (``ApiKeys.app_for_header``). A browser cannot send a header when it opens a
page, so the dashboard takes the key once as ``/dashboard?key=<key>`` and answers with a session
cookie (HttpOnly: page scripts cannot read it; SameSite=Strict: other sites cannot make the
browser send it). The cookie holds an HMAC of the key, not the key, so it cannot be used to post
events, and it stops working when the key is removed from ``FEEDLOOP_API_KEYS``.

The routers get an :class:`ApiKeys`, not the settings: the keys are all they need to know.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping

from fastapi import Request
from fastapi.responses import Response
from pydantic import SecretStr

SESSION_COOKIE = "feedloop_dashboard"
_SESSION_PURPOSE = b"feedloop dashboard session v1"


def session_token(key: str) -> str:
    return hmac.new(key.encode(), _SESSION_PURPOSE, hashlib.sha256).hexdigest()


class ApiKeys:
    """The gateway's per-app API keys (``FEEDLOOP_API_KEYS``), every comparison in constant time."""

    def __init__(self, keys: Mapping[str, SecretStr]) -> None:
        self._keys = dict(keys)

    def app_for_key(self, key: str) -> str | None:
        """The app id an API key belongs to."""
        found = None
        for app_id, secret in self._keys.items():
            if hmac.compare_digest(secret.get_secret_value().encode(), key.encode()):
                found = app_id
        return found

    def app_for_header(self, request: Request) -> str | None:
        key = request.headers.get("x-api-key")
        authorization = request.headers.get("authorization", "")
        if key is None and authorization.lower().startswith("bearer "):
            key = authorization[7:].strip()
        return self.app_for_key(key) if key else None

    def app_for_cookie(self, request: Request) -> str | None:
        """The app whose key the session cookie was made from."""
        token = request.cookies.get(SESSION_COOKIE)
        if not token:
            return None
        found = None
        for app_id, secret in self._keys.items():
            if hmac.compare_digest(session_token(secret.get_secret_value()), token):
                found = app_id
        return found

    def operator(self, request: Request) -> str | None:
        """The app id behind the request's key or session cookie; None when neither is valid."""
        return self.app_for_header(request) or self.app_for_cookie(request)


def set_session_cookie(response: Response, request: Request, key: str) -> None:
    response.set_cookie(
        SESSION_COOKIE, session_token(key), httponly=True, samesite="strict",
        secure=request.url.scheme == "https", path="/",
    )  # fmt: skip
