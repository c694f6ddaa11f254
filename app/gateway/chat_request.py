"""A chat request, read: what feedloop records of it and what goes on to vLLM. A pure core.

:func:`read_request` checks what the gateway needs from an OpenAI chat request body and
refuses the rest as OpenAI does (400 ``invalid_request_error`` with the ``param`` at fault);
everything else is vLLM's to check, so a field the gateway does not know still reaches it.

- ``messages`` become the contract's messages: roles mapped (``developer`` is a system
  message, ``function`` a tool message), content parts joined to their text, an assistant
  turn's ``tool_calls`` and a tool message's ``tool_call_id`` kept.
- The user is ``feedloop.user_id``, else OpenAI's ``safety_identifier`` (its successor of
  ``user`` for this purpose), else ``user``, else ``anonymous``.
- ``metadata`` (OpenAI's string map; scalars here) goes to the interaction's metadata;
  it and ``safety_identifier`` are not sent on, as OpenAI does not pass them to the model.
- ``stream_options.include_usage`` is remembered: the gateway always asks vLLM for the usage
  chunk (token counts for the interaction) and passes it on only when the client asked.

>>> ask = read_request({"model": "auto", "messages": [{"role": "developer", "content": "Be brief."},
...                     {"role": "user", "content": [{"type": "text", "text": "Hi"}]}], "user": "u-1"})
>>> [(m.role, m.content) for m in ask.prompt], ask.user_id, ask.n
([('system', 'Be brief.'), ('user', 'Hi')], 'u-1', 1)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from app.gateway.chat_answer import message_text, tool_calls_of
from app.gateway.openai_errors import OpenAIError
from streams.contract import ID_ADAPTER, Context, Id, Message, Metadata

# Roles the event contract knows; newer OpenAI roles map onto them.
ROLE_ALIASES = {"developer": "system", "function": "tool"}
_METADATA = TypeAdapter(Metadata)
# Read here, not sent to vLLM.
_OWN_FIELDS = ("feedloop", "metadata", "safety_identifier")


class ChatExtras(BaseModel):
    """The ``feedloop`` object of a chat request's body."""

    model_config = ConfigDict(extra="forbid")

    session_id: Id | None = None
    user_id: Id | None = None
    context: Context = Field(default_factory=Context)
    training_consent: bool = True
    regenerates: Id | None = None


@dataclass(frozen=True)
class ChatAsk:
    """What a chat request asks, read."""

    extras: ChatExtras
    prompt: list[Message]
    user_id: str
    metadata: dict[str, Any]
    model: Any  # as sent: the gateway decides what it names
    n: int  # choices asked for; each is recorded as its own interaction
    stream: bool
    wants_usage: bool  # the client asked for the usage chunk
    upstream: dict[str, Any]  # the body to send on to vLLM (its model set later)


def _first_error(exc: ValidationError, prefix: str) -> OpenAIError:
    first = exc.errors(include_url=False)[0]
    where = ".".join(str(p) for p in (prefix, *first["loc"]) if p != "")
    return OpenAIError(400, "invalid_value", f"{where}: {first['msg']}", param=where)


def _message(i: int, message: Any) -> Message:
    if not isinstance(message, dict):
        raise OpenAIError(400, "invalid_type", f"messages[{i}]: an object with role and content", f"messages[{i}]")
    role = ROLE_ALIASES.get(message.get("role"), message.get("role"))
    if role not in ("system", "user", "assistant", "tool"):
        raise OpenAIError(400, "invalid_value", f"messages[{i}].role: unknown role {message.get('role')!r}",
                          f"messages[{i}].role")  # fmt: skip
    try:
        return Message(role=role, content=message_text(message.get("content")),
                       tool_calls=tool_calls_of(message.get("tool_calls")) or None,
                       tool_call_id=message.get("tool_call_id"))  # fmt: skip
    except ValidationError as exc:
        raise _first_error(exc, f"messages[{i}]") from exc


def read_request(body: dict[str, Any]) -> ChatAsk:
    """The request ``body`` read, or :class:`OpenAIError` (400) naming the field at fault."""
    try:
        extras = ChatExtras.model_validate(body.get("feedloop") or {})
    except ValidationError as exc:
        raise _first_error(exc, "feedloop") from exc
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise OpenAIError(400, "invalid_value", "messages: a non-empty list of {role, content} objects", "messages")
    prompt = [_message(i, m) for i, m in enumerate(messages)]
    named_by = (("feedloop.user_id", extras.user_id), ("safety_identifier", body.get("safety_identifier")),
                ("user", body.get("user")))  # fmt: skip
    user_field, named = next(((field, value) for field, value in named_by if value), ("user", "anonymous"))
    try:
        user_id = ID_ADAPTER.validate_python(named)
    except ValidationError as exc:
        raise _first_error(exc, user_field) from exc
    try:
        metadata = _METADATA.validate_python(body.get("metadata") or {})
    except ValidationError as exc:
        raise _first_error(exc, "metadata") from exc
    n = body.get("n") if body.get("n") is not None else 1
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise OpenAIError(400, "invalid_value", f"n: a whole number of choices, 1 or more, not {n!r}", "n")
    options = body.get("stream_options")
    return ChatAsk(
        extras=extras, prompt=prompt, user_id=user_id, metadata=metadata, model=body.get("model"), n=n,
        stream=bool(body.get("stream")),
        wants_usage=isinstance(options, dict) and bool(options.get("include_usage")),
        upstream={k: v for k, v in body.items() if k not in _OWN_FIELDS},
    )  # fmt: skip
