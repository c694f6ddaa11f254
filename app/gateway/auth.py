"""Who is asking: an app, by its API key, or an operator, by an operator key.

Two roles, two sets of keys (``FEEDLOOP_API_KEYS``, ``FEEDLOOP_OPERATOR_KEYS``), and no key in
both. An **app** key sends its own app's events, asks for routes, chats and erases its own
app's users: every id it names is read within its app. An **operator** key opens what spans
apps: ``/metrics``, the dashboard and ``/v1/overview`` over every app, and erasing a user of
any app. The dashboard and ``/v1/overview`` are also an app key's (its :class:`Viewer`), scoped
to its own app: one tenant never sees another's traffic or dead letters. An app key on an
operator-only endpoint is answered 403.

Programs send a key as ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``. A browser
cannot send a header when it opens a page, so the dashboard takes a key once as
``/dashboard?key=<key>`` and answers with a session cookie (HttpOnly: page scripts cannot read
it; SameSite=Strict: other sites cannot make the browser send it). The cookie holds an HMAC of
the key for the role it was given for, not the key, so it opens only the views (never an
erasure, never another role's pages), and it stops working when the key is removed.

The routers get an :class:`ApiKeys`, not the settings: the keys are all they need to know.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import Response
from pydantic import SecretStr

SESSION_COOKIE = "feedloop_dashboard"
_OPERATOR_SESSION = b"feedloop dashboard session v2"  # v2: operator keys only
_APP_SESSION = b"feedloop dashboard app session v1"  # an app's view; never an operator's token
OPERATOR_ONLY = ("an operator key is needed here (FEEDLOOP_OPERATOR_KEYS); an app's key reaches its own "
                 "app's events, routes, chat, erasures and dashboard only")  # fmt: skip


def session_token(key: str, *, app: bool = False) -> str:
    return hmac.new(key.encode(), _APP_SESSION if app else _OPERATOR_SESSION, hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class Viewer:
    """Who looks at the dashboard or the overview: an operator sees every app (``app_id``
    None); an app's key sees its own app."""

    name: str  # the operator's or the app's
    app_id: str | None


def _find(keys: Mapping[str, SecretStr], matches) -> str | None:
    """The name whose key ``matches``; every key is compared, each in constant time."""
    found = None
    for name, secret in keys.items():
        if matches(secret.get_secret_value()):
            found = name
    return found


def header_key(request: Request) -> str | None:
    """The key a request carries (``Authorization: Bearer`` or ``X-API-Key``), if any."""
    key = request.headers.get("x-api-key")
    authorization = request.headers.get("authorization", "")
    if key is None and authorization.lower().startswith("bearer "):
        key = authorization[7:].strip()
    return key or None


class ApiKeys:
    """The gateway's app keys (by app id) and operator keys (by operator name)."""

    def __init__(self, keys: Mapping[str, SecretStr], operators: Mapping[str, SecretStr] | None = None) -> None:
        self._keys = dict(keys)
        self._operators = dict(operators or {})

    def app_for_key(self, key: str) -> str | None:
        """The app id an API key belongs to."""
        return _find(self._keys, lambda secret: hmac.compare_digest(secret.encode(), key.encode()))

    def operator_for_key(self, key: str) -> str | None:
        """The operator an operator key belongs to."""
        return _find(self._operators, lambda secret: hmac.compare_digest(secret.encode(), key.encode()))

    def app_for_header(self, request: Request) -> str | None:
        key = header_key(request)
        return self.app_for_key(key) if key else None

    def operator_for_header(self, request: Request) -> str | None:
        key = header_key(request)
        return self.operator_for_key(key) if key else None

    def operator(self, request: Request) -> str | None:
        """The operator behind the request's key or session cookie; None when neither is one."""
        if (operator := self.operator_for_header(request)) is not None:
            return operator
        token = request.cookies.get(SESSION_COOKIE)
        if not token:
            return None
        return _find(self._operators, lambda secret: hmac.compare_digest(session_token(secret), token))

    def viewer(self, request: Request) -> Viewer | None:
        """The operator or the app behind the request's key or session cookie; None: neither."""
        if (operator := self.operator(request)) is not None:
            return Viewer(operator, None)
        app = self.app_for_header(request)
        if app is None and (token := request.cookies.get(SESSION_COOKIE)):
            app = _find(self._keys, lambda secret: hmac.compare_digest(session_token(secret, app=True), token))
        return None if app is None else Viewer(app, app)

    def refusal(self, request: Request) -> tuple[int, str, str] | None:
        """Why an operator endpoint refuses the request ((status, reason, detail)); None: it may pass."""
        if self.operator(request) is not None:
            return None
        if self.app_for_header(request) is not None:
            return 403, "forbidden", OPERATOR_ONLY
        return 401, "unauthenticated", "send an operator key as 'Authorization: Bearer <key>', or open /dashboard?key=<key>"


def set_session_cookie(response: Response, request: Request, key: str, *, app: bool = False) -> None:
    response.set_cookie(
        SESSION_COOKIE, session_token(key, app=app), httponly=True, samesite="strict",
        secure=request.url.scheme == "https", path="/",
    )  # fmt: skip
