"""What vLLM answered, folded: each choice's text, tool calls and finish reason. A pure core.

The chat gateway records one interaction per choice, so it must know, choice by choice, what
the model said, whether the answer ended, and whether it failed. :class:`Answer` folds the
non-streamed completion (:meth:`Answer.of_completion`) and a stream's chunks
(:meth:`Answer.add_chunk`) into the same result, so the two paths cannot drift apart:

- chunks carry deltas by ``choices[].index``; choices are never concatenated (with ``n=2``
  the two answers interleave in one stream);
- a streamed tool call arrives in pieces by ``tool_calls[].index``: the first piece has its
  ``id`` and ``function.name``, the following ones append to ``function.arguments``;
- an ``error`` object in a chunk (vLLM's way to fail a stream that has begun) fails the
  whole answer: :attr:`Answer.error` is set and nothing of it may be recorded.

>>> answer = Answer()
>>> answer.add_chunk({"choices": [{"index": 1, "delta": {"content": "B"}}]})
>>> answer.add_chunk({"choices": [{"index": 0, "delta": {"content": "A"}, "finish_reason": "stop"}]})
>>> answer.add_chunk({"choices": [{"index": 1, "delta": {"content": "b"}, "finish_reason": "length"}]})
>>> [(c.index, c.text, c.finish_reason) for c in answer.ordered()]
[(0, 'A', 'stop'), (1, 'Bb', 'length')]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from streams.contract import FunctionCall, ToolCall


def message_text(content: Any) -> str:
    """Message content as text: a string, or the text parts of a list of content parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return "" if content is None else str(content)


def tool_calls_of(calls: Any) -> list[ToolCall]:
    """A message's complete ``tool_calls`` (a request's assistant turn, a non-streamed answer)."""
    if not isinstance(calls, list):
        return []
    return [_tool_call(str(call.get("id") or ""), str((call.get("function") or {}).get("name") or ""),
                       str((call.get("function") or {}).get("arguments") or ""))
            for call in calls if isinstance(call, dict)]  # fmt: skip


def _tool_call(call_id: str, name: str, arguments: str) -> ToolCall:
    # The contract bounds ids and names (OpenAI's own are far shorter); a model that wrote a
    # longer name is recorded cut, not refused.
    return ToolCall(id=call_id[:256], function=FunctionCall(name=name[:256], arguments=arguments))


@dataclass
class _CallPieces:
    id: str = ""
    name: str = ""
    arguments: list[str] = field(default_factory=list)


@dataclass
class Choice:
    """One choice of an answer, as far as it has arrived."""

    index: int
    parts: list[str] = field(default_factory=list)
    calls: dict[int, _CallPieces] = field(default_factory=dict)  # by the tool call's index
    finish_reason: str | None = None

    @property
    def text(self) -> str:
        return "".join(self.parts)

    @property
    def tool_calls(self) -> list[ToolCall]:
        return [_tool_call(call.id, call.name, "".join(call.arguments)) for _, call in sorted(self.calls.items())]

    def add_delta(self, delta: dict[str, Any]) -> None:
        if delta.get("content"):
            self.parts.append(message_text(delta["content"]))
        for piece in delta.get("tool_calls") or ():
            if not isinstance(piece, dict):
                continue
            call = self.calls.setdefault(int(piece.get("index", len(self.calls))), _CallPieces())
            function = piece.get("function") or {}
            call.id = piece.get("id") or call.id
            call.name = function.get("name") or call.name
            if function.get("arguments"):
                call.arguments.append(function["arguments"])


@dataclass
class Answer:
    """An answer's choices by index, its token usage, and the error that failed it, if any."""

    choices: dict[int, Choice] = field(default_factory=dict)
    usage: dict[str, Any] = field(default_factory=dict)
    error: dict[str, Any] | None = None

    @classmethod
    def of_completion(cls, payload: dict[str, Any]) -> Answer:
        answer = cls(usage=payload.get("usage") or {})
        for position, raw in enumerate(payload.get("choices") or ()):
            message = raw.get("message") or {}
            choice = answer._choice(raw.get("index", position))
            choice.parts.append(message_text(message.get("content")))
            for i, call in enumerate(tool_calls_of(message.get("tool_calls"))):
                choice.calls[i] = _CallPieces(call.id, call.function.name, [call.function.arguments])
            choice.finish_reason = raw.get("finish_reason")
        return answer

    def add_chunk(self, chunk: dict[str, Any]) -> None:
        if chunk.get("error") is not None or chunk.get("object") == "error":
            self.error = chunk.get("error") if isinstance(chunk.get("error"), dict) else chunk
            return
        for position, raw in enumerate(chunk.get("choices") or ()):
            choice = self._choice(raw.get("index", position))
            choice.add_delta(raw.get("delta") or {})
            choice.finish_reason = raw.get("finish_reason") or choice.finish_reason
        self.usage = chunk.get("usage") or self.usage

    def ordered(self) -> list[Choice]:
        return [self.choices[i] for i in sorted(self.choices)]

    def _choice(self, index: Any) -> Choice:
        index = int(index) if isinstance(index, int) else len(self.choices)
        return self.choices.setdefault(index, Choice(index))
