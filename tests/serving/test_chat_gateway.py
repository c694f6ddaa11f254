"""The OpenAI-compatible chat gateway on the real stack: embedded broker, archiver, gateway,
the real vLLM server, trained adapters and the hot-swap controller. Nothing is mocked.

The router's state comes from snapshots written to the store, as `feedloop learn` writes
them; the learner itself is not running here (tests/integration/test_learners_live.py runs it).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import uuid

import httpx
import openai
import pytest

from streams.config import LearnerSettings

from trainer.config import ServingSettings
from streams.store import RouterSnapshot
from streams.contract import AdapterLoaded, utcnow
from streams.learning import LearnerState
from streams.topics import EVENTS, EXAMPLES
from tests.conftest import API_KEYS, make_settings, start_stack, wait_until_archived
from tests.factories import feedback
from tests.integration.test_pipeline_live import start_worker, stop_worker
from tests.serving.conftest import MAX_LORA_RANK, SERVED_NAME, Models, Trained, registry_copy
from trainer.hot_swap import SwapController
from trainer.replicas import AdapterSet, HotSwapper

KEY = API_KEYS["app-a"]
QUESTIONS = ["How do I sort a list in Python?", "What do cats eat?", "What is 12 times 3?", "Where is Paris?"]
MAX_TOKENS = 16


def messages(question: str) -> list[dict]:
    return [{"role": "user", "content": question}]


def loaded(adapter: str) -> AdapterLoaded:
    return AdapterLoaded(event_id=f"adapter-loaded-{adapter}", occurred_at=utcnow(), source="swap", adapter=adapter,
                         replicas=[])  # fmt: skip


def publish_router(sessions, learner: LearnerState) -> int:
    """What `feedloop learn` does after a checkpoint: the gateway picks it up within a poll.
    Returns the snapshot's version."""
    snapshot = learner.snapshot()
    with sessions.begin() as session:
        session.add(RouterSnapshot(learner="test", version=snapshot.version, examples=snapshot.examples,
                                   arms=list(snapshot.arms), state=snapshot.data))  # fmt: skip
    return snapshot.version


async def wait_for_router(stack, version: int) -> None:
    """Until the gateway routes with the snapshot at ``version``: each route decision names
    the version of the router that made it."""
    async with httpx.AsyncClient(base_url=stack.base_url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as c:
        seen = None
        for _ in range(600):
            response = await c.post("/v1/route", json={"context": {"domain": "code"}})
            response.raise_for_status()
            seen = response.json()["snapshot_version"]
            if seen == version:
                return
            await asyncio.sleep(0.05)
    raise AssertionError(f"the gateway still routes with snapshot version {seen}, not {version}")


async def served_alone(server_url: str, model: str) -> dict[str, str]:
    """Each question's greedy answer from ``model`` with nothing else in flight."""
    answers = {}
    async with httpx.AsyncClient(timeout=60) as client:
        for question in QUESTIONS:
            response = await client.post(f"{server_url}/v1/chat/completions", json={
                "model": model, "messages": messages(question), "max_tokens": MAX_TOKENS, "temperature": 0})  # fmt: skip
            response.raise_for_status()
            answers[question] = response.json()["choices"][0]["message"]["content"]
    return answers


@pytest.fixture
async def chat(models: Models, trained: Trained, server, broker, tmp_path):
    """The stack pointed at the vLLM server, the zero-delta and concise adapters loaded, and the
    router serving base and concise (the canary share at 50% so both get traffic)."""
    settings = make_settings(
        tmp_path, broker.port, vllm_urls=[server.url], base_model_path=models.base_dir,
        adapter_dir=models.adapters_dir,
        serving=ServingSettings(served_model_name=SERVED_NAME, max_lora_rank=MAX_LORA_RANK),
        learners=LearnerSettings(snapshot_poll_s=0.1, canary_share=0.5), adapter_choice={"app-a": ["*"]},
    )  # fmt: skip
    stack, stop = await start_stack(settings)
    controller = SwapController(registry_copy(trained, tmp_path), HotSwapper(AdapterSet(models.validator(), models.zero),
                                [server.url]), drain_s=0.0, reconcile_interval_s=60.0, max_challengers=2)  # fmt: skip
    await asyncio.to_thread(controller.handle, trained.concise)
    learner = LearnerState(settings.learners)
    learner.apply_control(loaded(trained.concise.adapter))
    await wait_for_router(stack, publish_router(stack.sessions, learner))
    try:
        yield stack, controller, learner
    finally:
        await stop()


async def interactions(stack, ids: list[str]) -> list[dict]:
    records = await wait_until_archived(stack, EVENTS.name, len(ids),
                                        where=lambda r: json.loads(r.value).get("interaction_id") in ids
                                        and json.loads(r.value)["type"] == "interaction")  # fmt: skip
    return [json.loads(r.value) for r in records]


async def test_the_openai_client_works_unchanged_and_each_answer_is_one_archived_interaction(chat, server, models, trained):
    stack, _, _ = chat
    client = openai.AsyncOpenAI(base_url=f"{stack.base_url}/v1", api_key=KEY)
    expected = {"base": await served_alone(server.url, models.zero.name),
                trained.concise.adapter: await served_alone(server.url, trained.concise.adapter)}  # fmt: skip
    session_id = f"s-{uuid.uuid4().hex}"
    extra = {"feedloop": {"session_id": session_id, "context": {"domain": "code", "cohort": "a"}}}
    sent = {}
    for question in QUESTIONS:
        raw = await client.chat.completions.with_raw_response.create(
            model="auto", messages=messages(question), max_tokens=MAX_TOKENS, temperature=0, user="user-7",
            extra_body=extra,
        )  # fmt: skip
        completion = raw.parse()
        adapter = raw.headers["x-feedloop-adapter"]
        assert completion.model == adapter and completion.choices[0].message.content == expected[adapter][question]
        sent[raw.headers["x-feedloop-interaction-id"]] = (question, adapter, completion.choices[0].message.content)
    # Streaming: the same text in chunks, and one interaction event for the whole answer.
    async with client.chat.completions.with_streaming_response.create(
        model="auto", messages=messages(QUESTIONS[0]), max_tokens=MAX_TOKENS, temperature=0, stream=True,
        user="user-7", extra_body=extra,
    ) as response:  # fmt: skip
        adapter = response.headers["x-feedloop-adapter"]
        text = "".join([chunk.choices[0].delta.content or "" async for chunk in await response.parse() if chunk.choices])
        sent[response.headers["x-feedloop-interaction-id"]] = (QUESTIONS[0], adapter, text)
    assert text == expected[adapter][QUESTIONS[0]]
    assert {adapter for _, adapter, _ in sent.values()} <= set(expected)

    await interactions(stack, list(sent))
    await asyncio.sleep(1.0)  # anything doubled would have been archived by now
    events = await interactions(stack, list(sent))
    assert sorted(e["interaction_id"] for e in events) == sorted(sent), "exactly one event per answer"
    for event in events:
        question, adapter, text = sent[event["interaction_id"]]
        assert (event["adapter"], event["response"], event["prompt"][0]["content"]) == (adapter, text, question)
        assert event["session_id"] == session_id and event["user_id"] == "user-7" and event["app_id"] == "app-a"
        assert event["propensity"] == pytest.approx(0.5) and event["context"]["domain"] == "code"
        # The whole distribution, so that the A/B test knows both variants had a chance.
        assert set(event["probabilities"]) == set(expected) and event["probabilities"][adapter] == event["propensity"]
        assert event["completion_tokens"] > 0 and event["latency_ms"] > 0

    with pytest.raises(openai.AuthenticationError):
        await openai.AsyncOpenAI(base_url=f"{stack.base_url}/v1", api_key="wrong").chat.completions.create(
            model="auto", messages=messages("hi"), max_tokens=4)  # fmt: skip


async def test_under_load_during_a_swap_nothing_fails_and_every_answer_is_its_adapters(chat, server, models, trained):
    stack, controller, learner = chat
    concurrency, before_swap, after_swap, most = 6, 24, 8, 600
    outcomes: list[tuple[str, str, int, str]] = []  # question, adapter, status, text
    counter = itertools.count()
    swapped = asyncio.Event()  # the gateway routes with the router that has the new adapter

    def enough() -> bool:
        """Traffic goes on through the swap until the new adapter has served a few answers."""
        new = sum(adapter == trained.detailed.adapter for _, adapter, _, _ in outcomes)
        return (swapped.is_set() and new >= after_swap) or len(outcomes) >= most

    async def worker(client: httpx.AsyncClient) -> None:
        while not enough():
            i = next(counter)
            question = QUESTIONS[i % len(QUESTIONS)]
            response = await client.post("/v1/chat/completions", json={
                "model": "auto", "messages": messages(question), "max_tokens": MAX_TOKENS, "temperature": 0})  # fmt: skip
            text = response.json()["choices"][0]["message"]["content"] if response.status_code == 200 else response.text
            outcomes.append((question, response.headers.get("x-feedloop-adapter", ""), response.status_code, text))

    async def swap() -> None:
        while len(outcomes) < before_swap:  # mid-loop: requests in flight before, during and after
            await asyncio.sleep(0.05)
        (announced,) = await asyncio.to_thread(controller.handle, trained.detailed)
        learner.apply_control(announced)
        await wait_for_router(stack, publish_router(stack.sessions, learner))
        swapped.set()

    headers = {"Authorization": f"Bearer {KEY}"}
    async with httpx.AsyncClient(base_url=stack.base_url, headers=headers, timeout=120) as client:
        await asyncio.gather(swap(), *(worker(client) for _ in range(concurrency)))

    assert [o for o in outcomes if o[2] != 200] == [], "no request may fail during a swap"
    assert len(outcomes) < most, "the new adapter got (almost) no traffic after the swap"
    served = {adapter for _, adapter, _, _ in outcomes}
    assert trained.detailed.adapter in served, "the new adapter got traffic during the loop"
    names = {"base": models.zero.name, trained.concise.adapter: trained.concise.adapter,
             trained.detailed.adapter: trained.detailed.adapter}  # fmt: skip
    alone = {adapter: await served_alone(server.url, names[adapter]) for adapter in served}
    wrong = [(q, a, t) for q, a, _, t in outcomes if t != alone[a][q]]
    assert wrong == [], "an answer differs from its adapter's served alone (the mixed-batch bug?)"


async def test_a_route_to_an_adapter_no_replica_has_falls_back_to_the_base_model(chat, server, models):
    stack, _, learner = chat
    learner.apply_control(loaded("adapter-ghost-1"))  # the router has it; no replica does
    learner.router.pin("adapter-ghost-1")
    await wait_for_router(stack, publish_router(stack.sessions, learner))
    expected = await served_alone(server.url, models.zero.name)
    async with httpx.AsyncClient(base_url=stack.base_url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as c:
        response = await c.post("/v1/chat/completions", json={"model": "auto", "messages": messages(QUESTIONS[1]),
                                                              "max_tokens": MAX_TOKENS, "temperature": 0})  # fmt: skip
    assert response.status_code == 200 and response.headers["x-feedloop-adapter"] == "base"
    assert response.json()["choices"][0]["message"]["content"] == expected[QUESTIONS[1]]
    (event,) = await interactions(stack, [response.headers["x-feedloop-interaction-id"]])
    assert event["adapter"] == "base" and event["propensity"] is None, "not the router's choice: no propensity"


async def test_models_n_choices_refused_streams_and_feedback_by_the_body_id(chat, server, models, trained):
    """What a chat UI does with the unchanged openai package: list the models, name one, ask
    for two answers, overflow the context in a stream, and rate an answer by the id in the body."""
    stack, _, _ = chat
    worker = start_worker(stack.settings, {"FEEDLOOP_PIPELINE__EXPLICIT_WINDOW_S": "5",
                                           "FEEDLOOP_PIPELINE__IMPLICIT_WINDOW_S": "5"})  # fmt: skip
    client = openai.AsyncOpenAI(base_url=f"{stack.base_url}/v1", api_key=KEY, max_retries=0)
    try:
        listed = [m.id for m in (await client.models.list()).data]
        assert sorted(listed) == sorted(["auto", "base", trained.concise.adapter])
        named = await client.chat.completions.create(model=trained.concise.adapter, messages=messages(QUESTIONS[2]),
                                                     max_tokens=MAX_TOKENS, temperature=0)  # fmt: skip
        assert named.model == named.feedloop["adapter"] == trained.concise.adapter
        assert named.choices[0].message.content == (await served_alone(server.url, trained.concise.adapter))[QUESTIONS[2]]

        # n=2, not streamed and streamed: each choice its own interaction, never joined.
        two = await client.chat.completions.create(model="auto", messages=messages(QUESTIONS[1]), n=2,
                                                   max_tokens=MAX_TOKENS, temperature=1.0, seed=5)  # fmt: skip
        texts = {two.feedloop["interaction_ids"][c.index]: c.message.content for c in two.choices}
        # The user picks the second answer: a pairwise choice, without a session (the gateway's).
        picked, passed = two.feedloop["interaction_ids"][1], two.feedloop["interaction_ids"][0]
        async with httpx.AsyncClient(base_url=stack.base_url, headers={"Authorization": f"Bearer {KEY}"}) as http:
            sent = await http.post("/v1/events", json=[{
                "type": "feedback", "event_id": uuid.uuid4().hex, "occurred_at": utcnow().isoformat(),
                "app_id": "app-a", "interaction_id": picked, "kind": "pairwise", "rejected_interaction_id": passed}])  # fmt: skip
        assert sent.status_code == 202, sent.text
        parts = [part async for part in await client.chat.completions.create(
            model="auto", messages=messages(QUESTIONS[3]), n=2, max_tokens=MAX_TOKENS, temperature=1.0, seed=6,
            stream=True)]  # fmt: skip
        ids, streamed = parts[0].feedloop["interaction_ids"], {}
        for c in (c for part in parts for c in part.choices):
            streamed[c.index] = streamed.get(c.index, "") + (c.delta.content or "")
        texts.update({ids[i]: text for i, text in streamed.items()})
        assert len(texts) == 4
        events = {e["interaction_id"]: e for e in await interactions(stack, list(texts))}
        assert {i: e["response"] for i, e in events.items()} == texts
        assert len({events[i]["session_id"] for i in two.feedloop["interaction_ids"]}) == 1

        # A prompt past max_model_len (512): vLLM refuses the stream before it starts.
        session_id = f"s-{uuid.uuid4().hex}"
        with pytest.raises(openai.BadRequestError):
            await client.chat.completions.create(model="auto", messages=messages("cat " * 2000), stream=True,
                                                 max_tokens=MAX_TOKENS, extra_body={"feedloop": {"session_id": session_id}})  # fmt: skip
        after = await client.chat.completions.create(model="auto", messages=messages(QUESTIONS[0]), max_tokens=4,
                                                     extra_body={"feedloop": {"session_id": session_id}})  # fmt: skip
        (only,) = await wait_until_archived(stack, EVENTS.name, 1,
                                            where=lambda r: json.loads(r.value).get("session_id") == session_id)  # fmt: skip
        assert json.loads(only.value)["interaction_id"] == after.feedloop["interaction_id"], "the refused one is not recorded"

        # Feedback by the id the body gave joins its interaction.
        turn = {"interaction_id": after.feedloop["interaction_id"], "session_id": after.feedloop["session_id"]}
        async with httpx.AsyncClient(base_url=stack.base_url, headers={"Authorization": f"Bearer {KEY}"}) as http:
            sent = await http.post("/v1/events", json=[feedback(turn, "thumbs", value=-1,
                                                                occurred_at=utcnow().isoformat())])
        assert sent.status_code == 202, sent.text
        (example,) = await wait_until_archived(stack, EXAMPLES.name, 1, timeout_s=60,
                                               where=lambda r: json.loads(r.value)["example_id"] == turn["interaction_id"])  # fmt: skip
        example = json.loads(example.value)
        assert example["feedback_kinds"] == ["thumbs"] and example["rewards"]["explicit"] == 0.0
        (chosen,) = await wait_until_archived(stack, EXAMPLES.name, 1, timeout_s=60,
                                              where=lambda r: json.loads(r.value)["example_id"] == picked)  # fmt: skip
        assert json.loads(chosen.value)["feedback_kinds"] == ["pairwise"], "the choice joined the picked answer"
    finally:
        await client.close()
        stop_worker(worker)


async def test_a_conversation_with_tool_calls_is_recorded_with_them(chat):
    """The prompt side of tools on the real server: an earlier assistant turn's tool call and the
    tool's result are recorded as such, not flattened to text.

    The answer side (a response that calls a tool, streamed in pieces) runs against a mock
    server in tests/integration/test_chat_path.py: with this vLLM (CPU) a named ``tool_choice``
    constrains only the call's frame (``<tool_call>{"name": "lookup", "arguments": ``), and
    the tiny model then writes digits until ``max_tokens`` (measured: ``2.1111...``), so vLLM
    never returns a parsed tool call."""
    stack, _, _ = chat
    lookup = {"type": "function", "function": {"name": "lookup", "parameters": {
        "type": "object", "properties": {"animal": {"type": "string"}}, "required": ["animal"]}}}  # fmt: skip
    call = {"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": '{"animal": "cat"}'}}
    history = [{"role": "user", "content": QUESTIONS[1]}, {"role": "assistant", "content": None, "tool_calls": [call]},
               {"role": "tool", "tool_call_id": "call_1", "content": "fish"}]  # fmt: skip
    async with openai.AsyncOpenAI(base_url=f"{stack.base_url}/v1", api_key=KEY, max_retries=0) as client:
        completion = await client.chat.completions.create(model="auto", messages=history, tools=[lookup],
                                                          tool_choice="none", max_tokens=MAX_TOKENS, temperature=0)  # fmt: skip
    (event,) = await interactions(stack, [completion.feedloop["interaction_id"]])
    assert event["prompt"][1]["tool_calls"] == [call] and event["prompt"][1]["content"] == ""
    assert event["prompt"][2] == {"role": "tool", "content": "fish", "tool_calls": None, "tool_call_id": "call_1"}
    assert event["response"] == completion.choices[0].message.content and event["tool_calls"] == []
