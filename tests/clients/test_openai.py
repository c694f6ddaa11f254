"""wrap_openai points the app's own openai client at the gateway with the app's key, and
feedloop_ids reads the gateway's ids off openai's objects. No vLLM here: the gateway's own
answers (401 for a wrong key; 403 naming app-a, whose key it was, for an adapter app-a may not
choose) show which server and key were used; the ids of a real answer are covered by the chat
tests with a real vLLM."""

from __future__ import annotations

import openai
import pytest
from openai.types.chat import ChatCompletion

from feedloop_client import FeedloopClient, feedloop_ids, wrap_openai
from tests.conftest import API_KEYS, make_settings, start_stack

ASK = {"model": "base", "messages": [{"role": "user", "content": "hi"}]}


async def test_the_wrapped_client_talks_to_the_gateway_with_the_feedloop_key(tmp_path, broker):
    settings = make_settings(tmp_path, broker.port, vllm_urls=["http://127.0.0.1:9"])
    stack, stop = await start_stack(settings)
    app_client = openai.AsyncOpenAI(base_url="http://127.0.0.1:1/elsewhere", api_key="an-openai-key", max_retries=0)
    try:
        wrapped = wrap_openai(app_client, gateway_url=stack.base_url + "/", api_key=API_KEYS["app-a"])
        assert isinstance(wrapped, openai.AsyncOpenAI) and wrapped.max_retries == 0  # the app's settings kept
        with pytest.raises(openai.PermissionDeniedError) as refused:
            await wrapped.chat.completions.create(**ASK)
        with pytest.raises(openai.AuthenticationError):
            await wrap_openai(app_client, gateway_url=stack.base_url, api_key="wrong").chat.completions.create(**ASK)
    finally:
        await stop()
    assert "app 'app-a' may not choose the adapter 'base'" in str(refused.value)


def test_feedloop_ids_are_read_off_a_completion_and_name_the_interaction_for_feedback():
    completion = ChatCompletion.model_validate({
        "id": "c", "object": "chat.completion", "created": 0, "model": "base",
        "choices": [{"index": i, "finish_reason": "stop", "message": {"role": "assistant", "content": "x"}}
                    for i in range(2)],
        "feedloop": {"interaction_id": "i1.0", "interaction_ids": ["i1.0", "i1.1"], "session_id": "chat-i1",
                     "adapter": "base"},
    })  # fmt: skip
    ids = feedloop_ids(completion)
    assert (ids.interaction_id, ids.interaction_ids, ids.session_id) == ("i1.0", ("i1.0", "i1.1"), "chat-i1")
    with FeedloopClient("http://127.0.0.1:9", api_key="k", app_id="app-a") as client:
        event = client.feedback(ids, "pairwise", rejected_interaction_id=ids.interaction_ids[1])
    assert (event["interaction_id"], event["session_id"], event["kind"]) == ("i1.0", "chat-i1", "pairwise")
    assert feedloop_ids(ChatCompletion.model_validate({**completion.model_dump(), "feedloop": None})) is None
