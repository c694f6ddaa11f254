"""The review desk in headless Chromium, on the real broker, archiver, gateway and worker.

Picks are produced onto ``feedloop.review.v1`` as the learner emits them (the learner is not
running); a reviewer opens ``/dashboard/review``, labels one with a correction, and the page
posts a human annotation, the thumbs, and the correction with its example. The worker turns the
correction into SFT and preference records of the next batch, though the example's window
closed long ago. The item leaves the queue for a second reviewer and for a desk rebuilt from
the archive (a restarted gateway); an app's key is refused.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import datetime, timedelta, timezone

import httpx
import pytest
from pydantic import SecretStr
from sqlalchemy import select

from app.review_desk import ReviewDesk, ReviewerKey
from streams.contract import AnnotatedExample, Context
from streams.learning import ReviewRequest
from streams.store import Batch
from streams.topics import EVENTS, REVIEW
from streams.training_data import BatchFolder, read_batch
from tests.conftest import API_KEYS, OPERATOR_KEY, make_settings, start_stack, wait_until_archived
from tests.integration.test_dashboard import chromium_path, produce
from tests.integration.test_pipeline_live import start_worker, stop_worker

ALICE, BOB = "alice-key-0123456789", "bob-key-0123456789"
APP_KEY = API_KEYS["app-a"]
T0 = datetime.now(timezone.utc) - timedelta(hours=1)


@pytest.fixture
def settings(tmp_path, own_broker):  # its own: the worker reads every record on the topic
    reviewers = {"alice": ReviewerKey(app_id="app-a", key=SecretStr(ALICE)),
                 "bob": ReviewerKey(app_id="app-a", key=SecretStr(BOB))}  # fmt: skip
    return make_settings(tmp_path, own_broker.port, reviewer_keys=reviewers)


def pick(example_id: str, app_id: str = "app-a") -> ReviewRequest:
    example = AnnotatedExample(
        example_id=example_id, app_id=app_id, session_id=f"s-{example_id}", user="pseudonym-of-the-user",
        adapter="champ", propensity=0.5, cohort="a", domain="math", context=Context(domain="math", cohort="a"),
        prompt=[{"role": "user", "content": "What is 2+2?"}], response="2+2 is 5.",
        rewards={"explicit": 1.0, "implicit": 0.0}, feedback_kinds=["thumbs"], training_consent=True,
        occurred_at=T0, closed_at=T0 + timedelta(minutes=30), event_ids=[f"e-{example_id}"],
    )  # fmt: skip
    return ReviewRequest(review_id=f"review-{example_id}", score=0.7, terms={"disagreement": 0.5, "rarity": 0.2},
                         threshold=0.4, selected_at=example.closed_at, example=example)  # fmt: skip


async def open_desk(browser, base_url: str, key: str):
    page = await (await browser.new_context()).new_page()
    problems: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    await page.goto(f"{base_url}/dashboard/review?key={key}")
    assert page.url == f"{base_url}/dashboard/review"  # the key left the address bar
    await page.wait_for_function("() => window.feedloopReview.drawn > 0", timeout=60_000)
    return page, problems


async def shown(page) -> list[str]:
    return await page.evaluate("() => [...document.querySelectorAll('#queue article')].map(a => a.dataset.exampleId)")


@pytest.fixture
async def stack(settings):
    running, stop = await start_stack(settings)
    # Batches cut 2 s of event time after their first record: the correction's comes at once.
    worker = start_worker(settings, {"FEEDLOOP_PIPELINE__BATCH_MAX_WAIT_S": "2"})
    try:
        yield running
    finally:
        stop_worker(worker)
        await stop()


async def batch_records_of(stack, example_id: str, timeout_s: float = 90) -> dict[str, object]:
    """The training records of ``example_id`` in the store's batches, once some are there."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        found = {}
        with stack.sessions() as session:
            for batch in session.scalars(select(Batch)):
                _, records = read_batch(BatchFolder.of(stack.settings.objects, batch.batch_id))
                found |= {r.example_id: r for rs in records.values() for r in rs
                          if r.example_id.split(":")[0] == example_id}  # fmt: skip
        if found or asyncio.get_running_loop().time() > deadline:
            return found
        await asyncio.sleep(0.5)


async def test_a_reviewer_corrects_an_example_it_joins_the_next_batch_and_leaves_the_queue(stack, tmp_path):
    from playwright.async_api import async_playwright

    mine, other, foreign = (f"{name}-{uuid.uuid4().hex[:12]}" for name in ("fix", "keep", "b"))
    await produce(stack.settings, REVIEW.name, [pick(mine), pick(other), pick(foreign, app_id="app-b")])
    await wait_until_archived(stack, REVIEW.name, 3, where=lambda r: any(i.encode() in r.value
                                                                         for i in (mine, other, foreign)))

    async with httpx.AsyncClient(base_url=stack.base_url, timeout=30) as http:
        app_key = {"Authorization": f"Bearer {APP_KEY}"}
        assert (await http.get("/dashboard/review", params={"key": APP_KEY})).status_code == 403
        assert (await http.get("/v1/review/queue", headers=app_key)).json()["reason"] == "forbidden"
        refused = await http.post(f"/v1/review/app-a/{mine}", json={"thumbs": 1}, headers=app_key)
        assert refused.status_code == 403
        assert (await http.get("/v1/review/queue")).status_code == 401
        alice = {"Authorization": f"Bearer {ALICE}"}
        assert (await http.post(f"/v1/review/app-b/{foreign}", json={"thumbs": 1}, headers=alice)).status_code == 403
        operator = (await http.get("/v1/review/queue", headers={"Authorization": f"Bearer {OPERATOR_KEY}"})).json()
        assert {mine, other, foreign} <= {i["example"]["example_id"] for i in operator["items"]}

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=chromium_path(), headless=True)
        try:
            page, problems = await open_desk(browser, stack.base_url, ALICE)
            second, second_problems = await open_desk(browser, stack.base_url, BOB)  # the same queue
            assert {mine, other} <= set(await shown(second))
            assert {mine, other} <= set(await shown(page)) and foreign not in await shown(page)  # app-a's only
            card = page.locator(f'#queue article[data-example-id="{mine}"]')
            assert "2+2 is 5." in await card.inner_text()
            assert "disagreement 0.50" in await card.locator(".why").inner_text()  # why it was picked
            assert "pseudonym-of-the-user" not in await page.content()
            screenshot = tmp_path / "review-desk.png"
            await page.screenshot(path=str(screenshot), full_page=True)
            print(f"review desk screenshot: {screenshot}")
            await card.get_by_label("down").check()
            await card.get_by_label("Corrected answer").fill("2+2 is 4.")
            await card.get_by_role("button", name="Save review").click()
            await page.wait_for_function("() => window.feedloopReview.posted > 0", timeout=30_000)
            assert mine not in await shown(page) and other in await shown(page)
            assert problems == []

            # The review is in the log: a human annotation, the thumbs and the correction.
            archived = await wait_until_archived(stack, EVENTS.name, 3, where=lambda r: mine.encode() in r.value)
            events = [json.loads(r.value) for r in archived]
            assert {(e["type"], e.get("kind"), e.get("source")) for e in events} == {
                ("annotation", None, "human"), ("feedback", "thumbs", None), ("review_correction", None, None)}
            assert all((e["app_id"], e["session_id"], e["interaction_id"]) == ("app-a", f"s-{mine}", mine)
                       for e in events if e["type"] != "review_correction")  # fmt: skip
            fix = next(e for e in events if e["type"] == "review_correction")
            assert (fix["correction"], fix["reviewer"], fix["example"]["example_id"]) == ("2+2 is 4.", "alice", mine)

            # The worker made it training data of the next batch, under the example's user.
            records = await batch_records_of(stack, mine)
            assert set(records) == {f"{mine}:review", f"{mine}:review-pair"}, records
            assert records[f"{mine}:review"].messages[-1].content == "2+2 is 4."
            assert (records[f"{mine}:review-pair"].chosen, records[f"{mine}:review-pair"].rejected) == (
                "2+2 is 4.", "2+2 is 5.")
            with stack.sessions() as session:
                (batch,) = [b for b in session.scalars(select(Batch))
                            if mine in json.dumps(b.manifest or {})]  # fmt: skip
                assert list(batch.manifest["users"]) == ["pseudonym-of-the-user"]

            # The second reviewer, reloading, and a desk rebuilt from the archive no longer see it.
            await second.get_by_role("button", name="Reload queue").click()
            await second.wait_for_function("() => window.feedloopReview.drawn > 1", timeout=30_000)
            assert mine not in await shown(second) and other in await shown(second)
            desk = ReviewDesk(stack.sessions, stack.settings.objects)
            rebuilt = [r.example.example_id for r in desk.waiting("app-a")]
            assert mine not in rebuilt and other in rebuilt
            # A reviewer who labels it from a stale page is told it left the queue.
            async with httpx.AsyncClient(base_url=stack.base_url, timeout=30) as http:
                late = await http.post(f"/v1/review/app-a/{mine}", json={"thumbs": 1},
                                       headers={"Authorization": f"Bearer {BOB}"})
                assert (late.status_code, late.json()["reason"]) == (409, "not_waiting")
            assert second_problems == []
        finally:
            await browser.close()
