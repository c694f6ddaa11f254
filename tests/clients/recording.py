"""A real HTTP transport that also notes when each request left and what came back: how the
tests see the client's retries without mocking the gateway."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import httpx


@dataclass(frozen=True)
class Exchange:
    sent_at: float  # monotonic
    answered_at: float
    status: int
    retry_after: str | None


@dataclass
class Recording:
    sent: int = 0  # requests that left, answered or not
    exchanges: list[Exchange] = field(default_factory=list)

    @property
    def statuses(self) -> list[int]:
        return [e.status for e in self.exchanges]

    def note(self, sent_at: float, response: httpx.Response) -> None:
        self.exchanges.append(Exchange(sent_at, time.monotonic(), response.status_code,
                                       response.headers.get("retry-after")))  # fmt: skip


class RecordingTransport(httpx.HTTPTransport):
    def __init__(self, recording: Recording) -> None:
        super().__init__()
        self.recording = recording

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        sent_at = time.monotonic()
        self.recording.sent += 1
        response = super().handle_request(request)
        self.recording.note(sent_at, response)
        return response


class AsyncRecordingTransport(httpx.AsyncHTTPTransport):
    def __init__(self, recording: Recording) -> None:
        super().__init__()
        self.recording = recording

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        sent_at = time.monotonic()
        self.recording.sent += 1
        response = await super().handle_async_request(request)
        self.recording.note(sent_at, response)
        return response
