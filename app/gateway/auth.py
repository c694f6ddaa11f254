"""Who is asking: an app, by its API key, an operator, by an operator key, or a reviewer.

Three roles, three sets of keys (``FEEDLOOP_API_KEYS``, ``FEEDLOOP_OPERATOR_KEYS``,
``FEEDLOOP_REVIEWER_KEYS``), and no key in two. An **app** key sends its own app's events, asks for routes, chats and erases its own
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

The third role works the review desk (``/dashboard/review``, ``app.gateway.review``): a
**reviewer** key (``FEEDLOOP_REVIEWER_KEYS``) is for one app's queue; an operator key reviews
every app; an app's key is refused (403). The desk's cookie posts reviews: SameSite=Strict
keeps other sites from sending it, and the desk takes JSON bodies only, which no cross-site
form can send without a preflight.

The routers get an :class:`ApiKeys`, not the settings: the keys are all they need to know.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from fastapi import Request
from fastapi.responses import Response
from pydantic import SecretStr

from app.review_desk import ReviewerKey

SESSION_COOKIE = "feedloop_dashboard"
_SESSIONS = {
    "operator": b"feedloop dashboard session v2",  # v2: operator keys only
    "app": b"feedloop dashboard app session v1",  # an app's view; never an operator's token
    "reviewer": b"feedloop review desk session v1",  # one app's review desk
}
Role = Literal["operator", "app", "reviewer"]
OPERATOR_ONLY = ("an operator key is needed here (FEEDLOOP_OPERATOR_KEYS); an app's key reaches its own "
                 "app's events, routes, chat, erasures and dashboard only")  # fmt: skip
REVIEWERS_ONLY = ("the review desk needs an operator key (FEEDLOOP_OPERATOR_KEYS) or a reviewer key "
                  "(FEEDLOOP_REVIEWER_KEYS); an app's key does not review")  # fmt: skip


def session_token(key: str, role: Role = "operator") -> str:
    return hmac.new(key.encode(), _SESSIONS[role], hashlib.sha256).hexdigest()


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

    def __init__(self, keys: Mapping[str, SecretStr], operators: Mapping[str, SecretStr] | None = None,
                 reviewers: Mapping[str, ReviewerKey] | None = None) -> None:  # fmt: skip
        self._keys = dict(keys)
        self._operators = dict(operators or {})
        self._reviewers = {name: reviewer.key for name, reviewer in (reviewers or {}).items()}
        self._reviewer_apps = {name: reviewer.app_id for name, reviewer in (reviewers or {}).items()}

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

    def reviewer_for_key(self, key: str) -> str | None:
        """The reviewer a reviewer key belongs to."""
        return _find(self._reviewers, lambda secret: hmac.compare_digest(secret.encode(), key.encode()))

    def reviewer(self, request: Request) -> Viewer | None:
        """Who may work the review desk: an operator (every app) or a reviewer (their app), by
        key or session cookie; None for anyone else, an app's key included."""
        if (operator := self.operator(request)) is not None:
            return Viewer(operator, None)
        key, token = header_key(request), request.cookies.get(SESSION_COOKIE)
        name = self.reviewer_for_key(key) if key else None
        if name is None and token:
            name = _find(self._reviewers, lambda secret: hmac.compare_digest(session_token(secret, "reviewer"), token))
        return None if name is None else Viewer(name, self._reviewer_apps[name])

    def review_refusal(self, request: Request) -> tuple[int, str, str] | None:
        """Why the review desk refuses the request ((status, reason, detail)); None: it may pass."""
        if self.reviewer(request) is not None:
            return None
        if self.viewer(request) is not None:  # an app's key or an app's dashboard session
            return 403, "forbidden", REVIEWERS_ONLY
        return 401, "unauthenticated", ("send an operator or reviewer key as 'Authorization: Bearer <key>', or open "
                                        "/dashboard/review?key=<key>")  # fmt: skip

    def viewer(self, request: Request) -> Viewer | None:
        """The operator or the app behind the request's key or session cookie; None: neither."""
        if (operator := self.operator(request)) is not None:
            return Viewer(operator, None)
        app = self.app_for_header(request)
        if app is None and (token := request.cookies.get(SESSION_COOKIE)):
            app = _find(self._keys, lambda secret: hmac.compare_digest(session_token(secret, "app"), token))
        return None if app is None else Viewer(app, app)

    def refusal(self, request: Request) -> tuple[int, str, str] | None:
        """Why an operator endpoint refuses the request ((status, reason, detail)); None: it may pass."""
        if self.operator(request) is not None:
            return None
        if self.app_for_header(request) is not None:
            return 403, "forbidden", OPERATOR_ONLY
        return 401, "unauthenticated", "send an operator key as 'Authorization: Bearer <key>', or open /dashboard?key=<key>"


def set_session_cookie(response: Response, request: Request, key: str, role: Role) -> None:
    response.set_cookie(
        SESSION_COOKIE, session_token(key, role), httponly=True, samesite="strict",
        secure=request.url.scheme == "https", path="/",
    )  # fmt: skip
