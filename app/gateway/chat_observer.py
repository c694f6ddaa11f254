"""What the chat service reports about its answers' timing, to whoever measures it.

:class:`app.gateway.chat.ChatService` calls an observer rather than prometheus_client, so the
chat core stays free of the metrics library and testable with a recording observer; the
gateway passes :class:`app.gateway.metrics.ChatMetrics`, anything else gets :class:`NoObserver`.
"""

from __future__ import annotations

from typing import Protocol


class ChatObserver(Protocol):
    def first_token(self, adapter: str, seconds: float) -> None:
        """A streamed answer relayed its first content: ``seconds`` since the request came."""

    def generated(self, adapter: str, completion_tokens: int, seconds: float) -> None:
        """An answer ended whole: vLLM's completion token count, and the ``seconds`` from asking
        vLLM to its last chunk (or its whole answer, unstreamed)."""


class NoObserver:
    """Observes nothing: the default."""

    def first_token(self, adapter: str, seconds: float) -> None:
        pass

    def generated(self, adapter: str, completion_tokens: int, seconds: float) -> None:
        pass
