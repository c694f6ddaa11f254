"""What the client raises. A refused request carries the gateway's own reason and detail:
a 4xx is a bug or a policy the caller must see, never something to retry or swallow."""

from __future__ import annotations

import httpx


class FeedloopError(RuntimeError):
    """The gateway refused a request (or kept failing it past the retries)."""

    def __init__(self, status: int, reason: str, detail: str) -> None:
        super().__init__(f"{status} {reason}: {detail}")
        self.status, self.reason, self.detail = status, reason, detail

    @classmethod
    def from_response(cls, response: httpx.Response) -> FeedloopError:
        # The gateway answers {"reason", "detail"}; a proxy in front of it may answer anything.
        try:
            body = response.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            return cls(response.status_code, response.reason_phrase or "error", response.text)
        return cls(response.status_code, str(body.get("reason", "error")), str(body.get("detail", response.text)))


class QueueFull(RuntimeError):
    """The background queue stayed full for ``BatchPolicy.put_timeout_s``: the event was not
    queued and is the caller's to keep (the gateway is slower than the app, or unreachable)."""
