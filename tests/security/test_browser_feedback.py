"""Feedback from a web page with a feedback token, never the app's key, in a real browser.

Real parts: the Tansu broker, the gateway under uvicorn, the archiver, the ``openai`` package,
Debian's chromium driven by Playwright, and two web pages served from their own origins (one
the app lists, one it does not). Mocked: the model server (tests/integration/fake_vllm.py's
FakeVllm: the chat answer only has to exist).
"""

from __future__ import annotations

import json
import uuid

import httpx
import openai
import pytest
from aiohttp import web

from app.feedback_tokens import BrowserSettings, FeedbackTokens
from streams.contract import utcnow
from streams.topics import EVENTS
from tests.conftest import API_KEYS, archived_records, free_port, make_settings, start_stack, wait_until_archived
from tests.factories import interaction
from tests.integration.fake_vllm import FakeVllm
from tests.integration.test_dashboard import chromium_path

KEY = API_KEYS["app-a"]


class Page:
    """An empty page on an origin of its own, from which the browser calls the gateway."""

    def __init__(self) -> None:
        self.port = free_port()
        self.origin = f"http://127.0.0.1:{self.port}"

    async def __aenter__(self) -> Page:
        app = web.Application()
        async def page(_: web.Request) -> web.Response:
            return web.Response(text="<!doctype html><title>chat</title>", content_type="text/html")

        app.router.add_get("/", page)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.runner.cleanup()


def thumbs(interaction_id: str, **fields) -> dict:
    return {"type": "feedback", "event_id": uuid.uuid4().hex, "occurred_at": utcnow().isoformat(), "app_id": "app-a",
            "interaction_id": interaction_id, "kind": "thumbs", "value": 1, **fields}  # fmt: skip


POST_FROM_PAGE = """async ([url, token, events]) => {
    try {
        const answer = await fetch(url + "/v1/events", {method: "POST", body: JSON.stringify(events),
            headers: {"Authorization": "Bearer " + token, "Content-Type": "application/json"}});
        return [answer.status, (await answer.json()).reason || null];
    } catch (error) { return ["blocked", String(error)]; }
}"""


async def test_a_page_posts_feedback_with_its_token_and_nothing_else(tmp_path, broker):
    from playwright.async_api import async_playwright

    model_dir = tmp_path / "base"
    model_dir.mkdir()
    (model_dir / "feedloop_model.json").write_text(json.dumps({"weights_sha256": "0" * 64}))
    async with FakeVllm() as vllm, Page() as listed, Page() as unlisted:
        settings = make_settings(tmp_path, broker.port, vllm_urls=[vllm.url], base_model_path=model_dir,
                                 browser=BrowserSettings(cors_origins={"app-a": [listed.origin]}))  # fmt: skip
        stack, stop = await start_stack(settings)
        try:
            async with openai.AsyncOpenAI(base_url=f"{stack.base_url}/v1", api_key=KEY, max_retries=0) as chat:
                answer = await chat.chat.completions.create(model="auto", messages=[{"role": "user", "content": "hi"}])
            ids, token = answer.feedloop, answer.feedloop["feedback_token"]
            assert KEY not in token
            good = thumbs(ids["interaction_id"], session_id=ids["session_id"], comment="helpful")
            other = thumbs(f"i-{uuid.uuid4().hex}")
            turn = interaction(app_id="app-a")

            async with async_playwright() as playwright:
                browser = await playwright.chromium.launch(executable_path=chromium_path(), headless=True)
                try:
                    page = await browser.new_page()
                    await page.goto(listed.origin)
                    sent = [await page.evaluate(POST_FROM_PAGE, [stack.base_url, token, events])
                            for events in ([good], [other], [turn], [good, other])]  # fmt: skip
                    assert sent[0] == [202, None], sent
                    assert sent[1:] == [[403, "outside_token_scope"]] * 3, sent
                    assert (await page.evaluate(POST_FROM_PAGE, [stack.base_url, "fbt1.forged.x", [good]]))[0] == 401
                    elsewhere = await browser.new_page()
                    await elsewhere.goto(unlisted.origin)
                    blocked = await elsewhere.evaluate(POST_FROM_PAGE, [stack.base_url, token, [thumbs(ids["interaction_id"])]])
                    assert blocked[0] == "blocked", blocked  # the preflight names no origin but the listed one
                finally:
                    await browser.close()

            async with httpx.AsyncClient(base_url=stack.base_url) as http:
                # No browser: the Origin header is the only thing a page cannot forge, so it is checked when sent.
                spoofed = await http.post("/v1/events", json=[thumbs(ids["interaction_id"])],
                                          headers={"Authorization": f"Bearer {token}", "Origin": unlisted.origin})  # fmt: skip
                assert spoofed.json()["reason"] == "origin_not_allowed"
                minted = await http.post("/v1/feedback-tokens", json={"interaction_ids": [turn["interaction_id"]]},
                                         headers={"Authorization": f"Bearer {KEY}"})  # fmt: skip
                own = minted.json()["feedback_token"]
                mine = await http.post("/v1/events", json=[thumbs(turn["interaction_id"], session_id="s-1")],
                                       headers={"Authorization": f"Bearer {own}"})  # fmt: skip
                assert mine.status_code == 202 and mine.json()["accepted"] == 1
                b_token = FeedbackTokens(settings.api_keys, 60).mint("app-b", [ids["interaction_id"]])
                as_b = await http.post("/v1/events", json=[thumbs(ids["interaction_id"])],
                                       headers={"Authorization": f"Bearer {b_token}"})  # fmt: skip
                assert as_b.json()["accepted"] == 0, "app-b's token names app-a's events"
                expired = FeedbackTokens(settings.api_keys, 1).mint("app-a", [ids["interaction_id"]], now=0.0)
                late = await http.post("/v1/events", json=[thumbs(ids["interaction_id"])],
                                       headers={"Authorization": f"Bearer {expired}"})  # fmt: skip
                assert late.status_code == 401

            (kept,) = await wait_until_archived(stack, EVENTS.name, 1, where=lambda r: good["event_id"].encode() in r.value)
            assert json.loads(kept.value)["comment"] == "helpful"
            refused = {other["event_id"], turn["event_id"]}
            assert not [r for r in archived_records(stack, EVENTS.name) if json.loads(r.value)["event_id"] in refused]
        finally:
            await stop()


@pytest.mark.parametrize("token", ["", "fbt1.", "fbt1.a.b.c", "fbt1.e30.sig", "fbt1.bm90IGpzb24.sig"])
def test_a_malformed_token_is_no_token(token):
    assert FeedbackTokens({"app-a": "k"}, 60).verify(token) is None
