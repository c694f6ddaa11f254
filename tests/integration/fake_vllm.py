"""A fake vLLM for the chat path's tests, and the OpenAI client and request they send.

:class:`FakeVllm` is a real HTTP server that answers vLLM's chat endpoint in vLLM's wire
format, because the real vLLM server cannot be made to fail mid-stream, break off, stall or
interleave two choices with a tool call on demand. The ``gateway`` fixture (conftest.py) puts
the stack in front of it. tests/serving/test_chat_gateway.py runs the same path against the
real vLLM server.
"""

from __future__ import annotations

import asyncio
import json

import openai
from aiohttp import web

from tests.conftest import API_KEYS, free_port

KEY = API_KEYS["app-a"]


def chunk(choices: list[dict], usage: dict | None = None) -> bytes:
    body = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": choices}
    if usage is not None:
        body["usage"] = usage
    return f"data: {json.dumps(body)}\n\n".encode()


def delta(index: int, finish: str | None = None, **fields) -> dict:
    return {"index": index, "delta": fields, "finish_reason": finish}


USAGE = {"prompt_tokens": 7, "completion_tokens": 9, "total_tokens": 16}
# Two choices interleaved; choice 1 calls a tool, its arguments in two pieces.
TWO_CHOICES = [
    chunk([delta(0, role="assistant", content="Cats "), delta(1, role="assistant")]),
    chunk([delta(1, tool_calls=[{"index": 0, "id": "call_1", "type": "function",
                                 "function": {"name": "lookup", "arguments": '{"animal": '}}])]),  # fmt: skip
    chunk([delta(0, content="eat fish.", finish="stop")]),
    chunk([delta(1, finish="tool_calls", tool_calls=[{"index": 0, "function": {"arguments": '"cat"}'}}])]),
]


class FakeVllm:
    """vLLM's ``POST /v1/chat/completions``, scripted by the last user message."""

    def __init__(self) -> None:
        self.bodies: list[dict] = []
        self.port = free_port()
        self.released = asyncio.Event()  # ends a stalled answer

    async def __aenter__(self) -> FakeVllm:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.answer)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()
        return self

    async def __aexit__(self, *exc) -> None:
        self.released.set()
        await self.runner.cleanup()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def answer(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append(body)
        script = body["messages"][-1]["content"]
        if script == "refuse":  # older vLLM's flat error body
            return web.json_response({"object": "error", "message": "max_tokens is too large", "type": "BadRequestError",
                                      "param": "max_tokens", "code": 400}, status=400)  # fmt: skip
        if not body.get("stream"):
            message = {"role": "assistant", "content": "Cats eat fish."}
            if script == "tool":
                message = {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_9", "type": "function", "function": {"name": "lookup", "arguments": '{"a": 1}'}}]}
            return web.json_response({"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "m",
                                      "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                                      "usage": USAGE})  # fmt: skip
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        if script == "two":
            for piece in TWO_CHOICES:
                await response.write(piece)
        else:
            await response.write(chunk([delta(0, role="assistant", content="Cats ")]))
        if script == "fail":  # vLLM's way to fail a stream that has begun
            await response.write(b'data: {"error": {"message": "engine died", "type": "InternalServerError", '
                                 b'"code": 500}}\n\n')  # fmt: skip
        elif script == "break":
            request.transport.close()  # the replica goes away mid-answer
            return response
        elif script == "stall":
            await self.released.wait()
        if (body.get("stream_options") or {}).get("include_usage"):
            await response.write(chunk([], USAGE))
        await response.write(b"data: [DONE]\n\n")
        return response


def client(stack, key: str = KEY) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{stack.base_url}/v1", api_key=key, max_retries=0)


def ask(script: str, session_id: str, **extra) -> dict:
    return {"model": "auto", "messages": [{"role": "user", "content": script}],
            "extra_body": {"feedloop": {"session_id": session_id}}, **extra}  # fmt: skip
