"""Red team: two apps share one deployment; app B tries to reach app A's users, views, training
data and adapters through every door the gateway has.

Real gateway, archiver, broker and worker (for the training-data attack). The chat attack needs
no model: forcing an adapter is refused before any vLLM replica is asked.
"""

import json

import httpx
import openai
import pytest

from streams.pseudonyms import Pseudonymizer, user_identity
from streams.topics import DEAD_LETTER, EXAMPLES
from tests.conftest import API_KEYS, OPERATOR, OPERATOR_KEY, make_settings, start_stack, wait_until_archived
from tests.factories import feedback, interaction
from tests.integration.test_pipeline_live import at, start_worker, stop_worker

A = {"Authorization": f"Bearer {API_KEYS['app-a']}"}
B = {"Authorization": f"Bearer {API_KEYS['app-b']}"}


async def test_an_app_erases_only_its_own_users(stack):
    def keys() -> Pseudonymizer:  # a fresh reader of the key store each time (no cache to wait out)
        return Pseudonymizer(stack.settings.key_store())

    a_user, b_user = user_identity("app-a", "u-1"), user_identity("app-b", "u-1")
    a_before = keys().pseudonym(a_user)
    async with httpx.AsyncClient(base_url=stack.base_url) as http:
        own = await http.post("/v1/users/u-1/erase", headers=B)
        assert own.status_code == 202 and own.json()["app_id"] == "app-b"
        assert keys().pseudonym(a_user) == a_before and not keys().is_erased(a_user), "B's erase reached A's user"
        assert keys().is_erased(b_user)

        across = await http.post("/v1/users/u-1/erase", params={"app_id": "app-a"}, headers=B)
        assert across.status_code == 403 and across.json()["reason"] == "forbidden"
        assert not keys().is_erased(a_user)

        assert (await http.post("/v1/users/u-1/erase", headers=OPERATOR)).status_code == 422  # which app?
        by_operator = await http.post("/v1/users/u-1/erase", params={"app_id": "app-a"}, headers=OPERATOR)
        assert by_operator.status_code == 202 and by_operator.json()["app_id"] == "app-a"
    assert keys().is_erased(a_user)


async def test_an_app_key_opens_no_view_of_other_apps(stack):
    async with httpx.AsyncClient(base_url=stack.base_url) as http:
        assert (await http.get("/metrics", headers=B)).status_code == 403, "every app's counters"
        for path in ("/v1/overview", "/metrics", "/dashboard"):
            assert (await http.get(path, headers=OPERATOR)).status_code == 200, path
        assert (await http.get("/v1/overview", headers=B)).json()["app_id"] == "app-b", "B's own view only"
        assert (await http.get("/v1/overview", headers=OPERATOR)).json()["app_id"] is None
    async with httpx.AsyncClient(base_url=stack.base_url) as http:
        signed_in = await http.get("/dashboard", params={"key": API_KEYS["app-b"]})
        assert signed_in.status_code == 303 and API_KEYS["app-b"] not in signed_in.cookies["feedloop_dashboard"]
        http.cookies.set("feedloop_dashboard", signed_in.cookies["feedloop_dashboard"])
        assert (await http.get("/v1/overview")).json()["app_id"] == "app-b", "B's cookie opens B's view"
        assert (await http.get("/metrics")).status_code == 401
        assert (await http.post("/v1/users/u-1/erase")).status_code == 401, "a cookie erases nothing"
    async with httpx.AsyncClient(base_url=stack.base_url) as http:
        operator = await http.get("/dashboard", params={"key": OPERATOR_KEY})
        assert operator.status_code == 303 and "feedloop_dashboard" in operator.cookies
        # The operator's cookie opens the views but erases nothing (no cross-site posts).
        http.cookies.set("feedloop_dashboard", operator.cookies["feedloop_dashboard"])
        assert (await http.get("/v1/overview")).status_code == 200
        assert (await http.post("/v1/users/u-1/erase", params={"app_id": "app-a"})).status_code == 401


async def test_an_app_forces_an_adapter_only_when_allowed(tmp_path, broker):
    settings = make_settings(tmp_path, broker.port, adapter_choice={"app-a": ["*"]}, vllm_urls=["http://127.0.0.1:9"])
    stack, stop = await start_stack(settings)
    ask = {"model": "base", "messages": [{"role": "user", "content": "hi"}]}  # "base": a live arm
    try:
        b = openai.AsyncOpenAI(base_url=f"{stack.base_url}/v1", api_key=API_KEYS["app-b"], max_retries=0)
        with pytest.raises(openai.PermissionDeniedError) as refused:
            await b.chat.completions.create(**ask)
        assert refused.value.code == "permission_denied" and "FEEDLOOP_ADAPTER_CHOICE" in refused.value.message
        a = openai.AsyncOpenAI(base_url=f"{stack.base_url}/v1", api_key=API_KEYS["app-a"], max_retries=0)
        with pytest.raises(openai.APIError) as allowed:  # allowed: on to vLLM, which is not there
            await a.chat.completions.create(**ask)
        assert not isinstance(allowed.value, openai.PermissionDeniedError)
        await a.close()
        await b.close()
    finally:
        await stop()


async def test_another_apps_feedback_never_becomes_an_apps_training_data(tmp_path, own_broker):
    """B names A's interaction id in an edit (SFT data for A, if it joined); both apps' chat users
    are the default 'anonymous', who must be two people."""
    settings = make_settings(tmp_path, own_broker.port)
    stack, stop = await start_stack(settings)
    worker = start_worker(settings)
    try:
        turn_a = interaction(app_id="app-a", user_id="anonymous", occurred_at=at(0), response="A's answer")
        turn_b = interaction(app_id="app-b", user_id="anonymous", occurred_at=at(1), response="B's answer")
        poison = feedback(turn_a, "edit", app_id="app-b", occurred_at=at(2), text="words B puts in A's mouth")
        thumbs_a = feedback(turn_a, "thumbs", app_id="app-a", occurred_at=at(3), value=1)
        thumbs_b = feedback(turn_b, "thumbs", app_id="app-b", occurred_at=at(4), value=1)
        async with httpx.AsyncClient(base_url=stack.base_url, timeout=30) as http:
            for headers, events in ((A, [turn_a, thumbs_a]), (B, [turn_b, poison, thumbs_b])):
                answer = await http.post("/v1/events", json=events, headers=headers)
                assert answer.status_code == 202 and answer.json()["accepted"] == len(events), answer.text
        ids = {turn_a["interaction_id"], turn_b["interaction_id"]}
        found = await wait_until_archived(stack, EXAMPLES.name, 2, timeout_s=120,
                                          where=lambda r: json.loads(r.value)["example_id"] in ids)  # fmt: skip
        examples = {json.loads(r.value)["app_id"]: json.loads(r.value) for r in found}
        assert examples["app-a"]["edit"] is None and examples["app-a"]["feedback_kinds"] == ["thumbs"]
        assert examples["app-a"]["user"] != examples["app-b"]["user"], "one 'anonymous' for two apps"
        (orphan,) = await wait_until_archived(
            stack, DEAD_LETTER.name, 1, timeout_s=60,
            where=lambda r: json.loads(r.value).get("event_id") == poison["event_id"])
        assert json.loads(orphan.value)["reason"] == "orphan_feedback" and json.loads(orphan.value)["app_id"] == "app-b"
    finally:
        stop_worker(worker)
        await stop()
