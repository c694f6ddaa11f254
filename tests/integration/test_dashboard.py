"""The operator views on a short real run: the dashboard in headless Chromium, /metrics, `feedloop status`.

Real parts: the Tansu broker, the archiver, uvicorn serving the gateway, SQLite; Debian's
chromium driven by Playwright (`make chromium` installs it; Playwright's own browsers are never
downloaded). The run: events and malformed input posted to the gateway, control events and
annotated examples produced onto their topics (the pipeline and learner are not running), and
store rows and a privacy ledger as the trainer and hot-swap controller write them.
"""

from __future__ import annotations

import base64
import json
import random
import shutil
import uuid
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import httpx
import pytest
from aiokafka import AIOKafkaProducer
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families

from app.cli import main
from app.liveness import Heartbeat
from streams.config import LearnerSettings
from streams.store import Adapter, Batch
from streams.contract import AdapterLoaded, AdapterReady, AnnotatedExample, Context, DriftAlarm
from streams.topics import CONTROL, DEAD_LETTER, EVENTS, EXAMPLES
from tests.conftest import API_KEYS, OPERATOR, OPERATOR_KEY, archived_records, make_settings, wait_until_archived
from tests.factories import feedback, interaction

KEY = API_KEYS["app-a"]
AUTH = {"Authorization": f"Bearer {KEY}"}
T0 = datetime(2026, 11, 21, 10, 0, tzinfo=timezone.utc)
EXAMPLES_PER_ARM = 40


@pytest.fixture
def settings(tmp_path, own_broker):
    # A broker of the test's own: the views fold the whole archive through one adapter
    # lifecycle, so other tests' promotions and drift alarms on the session's shared topics can
    # change the champion or end this test's experiment, depending on what ran before (the
    # likely cause of one failure in `make test`: no running A/B test in /metrics, while the
    # file passed alone). Names of its own all the same; a small A/B minimum so that 40
    # examples per arm give bounds.
    uid = uuid.uuid4().hex[:8]
    return make_settings(tmp_path, own_broker.port,
                         learners=LearnerSettings(initial_arms=[f"champ-{uid}"], ab_min_samples=20))


@dataclass
class Run:
    champion: str
    challenger: str
    marker: str
    epsilon_spent: float


async def produce(settings, topic: str, records: list) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers, acks="all")
    await producer.start()
    try:
        for record in records:
            # One partition keeps them in time order, as a live run's examples come (each closes
            # when event time passes its window); the log does not record the order across partitions.
            await producer.send_and_wait(topic, record.model_dump_json().encode(), partition=0)
    finally:
        await producer.stop()


def carries(marker: str):
    """Whether a dead letter is this run's: its event id or its raw bytes hold the marker."""
    def check(record) -> bool:
        letter = json.loads(record.value)
        return marker in (letter.get("event_id") or "") or marker.encode() in base64.b64decode(letter["raw_b64"])
    return check


def example(adapter: str, i: int, reward: float) -> AnnotatedExample:
    occurred = T0 + timedelta(seconds=15 * i)
    return AnnotatedExample(
        example_id=f"{adapter}-{i}", app_id="app-a", session_id=f"s-{adapter}-{i}", user="pseudonym",
        adapter=adapter, propensity=0.5, cohort="a", domain="code", context=Context(domain="code", cohort="a"),
        prompt=[{"role": "user", "content": "hi"}], response="hello", rewards={"explicit": reward},
        feedback_kinds=["thumbs"], training_consent=True, occurred_at=occurred,
        closed_at=occurred + timedelta(seconds=30), event_ids=[f"e-{adapter}-{i}"],
    )  # fmt: skip


async def run_the_loop(stack) -> Run:
    """A short run with something in every panel; returns what the views must show."""
    settings = stack.settings
    champion = settings.learners.initial_arms[0]
    challenger = champion.replace("champ", "chall")
    marker = uuid.uuid4().hex

    # Users: interactions served by both arms, feedback, and malformed input with this run's marker.
    turns = [interaction(adapter=champion if i % 3 else challenger,
                         occurred_at=(T0 + timedelta(seconds=20 * i)).isoformat()) for i in range(12)]
    good = turns + [feedback(t) for t in turns[:5]]
    bad = [{"type": "sparkle", "event_id": f"unknown-{marker}"},
           {**interaction(prompt_tokens="many"), "event_id": f"type-{marker}"},
           {**interaction(), "session_id": None, "event_id": f"null-{marker}"}]
    async with httpx.AsyncClient(base_url=stack.base_url, timeout=30) as http:
        answer = await http.post("/v1/events", json=good + bad, headers=AUTH)
        assert answer.json()["accepted"] == len(good) and answer.json()["rejected"] == len(bad)
        broken = await http.post("/v1/events", content=f'[{{"event_id": "json-{marker}"', headers=AUTH)
        assert broken.status_code == 422
        route = await http.post("/v1/route", json={"context": {"domain": "code"}}, headers=AUTH)
        assert route.status_code == 200

    # The trainer and the hot-swap controller: an adapter ready and loaded; the learner: a drift
    # alarm on the context mix (one on a reward would end the test the A/B panel draws, as the
    # learner ends it).
    control = [
        AdapterReady(event_id=f"ready-{marker}", occurred_at=T0, source="trainer", adapter=challenger,
                     path=f"adapters/{challenger}", sha256="0" * 64, base_model_sha256="1" * 64),
        AdapterLoaded(event_id=f"loaded-{marker}", occurred_at=T0 + timedelta(seconds=5), source="serving",
                      adapter=challenger, replicas=["vllm-0"]),
        DriftAlarm(event_id=f"drift-{marker}", occurred_at=T0 + timedelta(seconds=400), source="learners",
                   signal="feature:domain=code", detector="ADWIN", detected_at=T0 + timedelta(seconds=400),
                   details={"mean_before": 0.5, "mean_after": 0.7}),
    ]  # fmt: skip
    await produce(settings, CONTROL.name, control)
    # The experiment must be running before its examples are folded: control first, archived.
    await wait_until_archived(stack, CONTROL.name, 3, where=lambda r: marker.encode() in r.value)
    rng = random.Random(7)
    examples = [example(arm, i, float(rng.random() < p)) for i in range(EXAMPLES_PER_ARM)
                for arm, p in ((champion, 0.4), (challenger, 0.7))]  # fmt: skip
    await produce(settings, EXAMPLES.name, examples)

    with stack.sessions.begin() as session:
        session.add(Adapter(name=challenger, state="ready", path=f"adapters/{challenger}", sha256="0" * 64,
                            base_model_sha256="1" * 64, lineage={"serving": {"swap_ms": 850.0}}))
        session.add(Adapter(name=f"failed-{marker[:8]}", state="failed", path="-", sha256="-", base_model_sha256="-",
                            reason="gate: candidate worse than parent", lineage={"serving": "not a mapping"}))
        for n, trigger in ((1, "size"), (2, "drift")):
            session.add(Batch(batch_id=f"batch-{marker[:8]}-{n}", path="batches/x", manifest_sha256="0" * 64,
                              example_count=30 * n, trigger=trigger, status="trained" if n == 1 else "emitted",
                              manifest={"strata": {"a/code": 20 * n, "b/chat": 10 * n},
                                        "loss_weights": {"explicit": 0.6, "implicit": 0.3, "self_eval": 0.1}}))
    from trainer.config import PrivacyConfig
    from trainer.ledger import PrivacyLedger

    ledger = PrivacyLedger(settings.objects, PrivacyConfig(budget_epsilon=8.0))
    ledger.reserve(f"batch-{marker[:8]}-1", 1.5)
    ledger.settle(f"batch-{marker[:8]}-1", challenger, "trained")

    ids = [e["event_id"] for e in good]
    await wait_until_archived(stack, EVENTS.name, len(good), where=lambda r: any(i.encode() in r.value for i in ids))
    await wait_until_archived(stack, EXAMPLES.name, len(examples),
                              where=lambda r: json.loads(r.value)["adapter"] in (champion, challenger))
    await wait_until_archived(stack, DEAD_LETTER.name, 4, where=carries(marker))
    return Run(champion, challenger, marker, ledger.spent())


def chromium_path() -> str:
    path = shutil.which("chromium")
    if path is None:
        pytest.fail("Debian's chromium is not installed: run `make chromium` (make test does)")
    return path


async def test_dashboard_shows_the_loop_in_a_browser(stack, tmp_path):
    from playwright.async_api import async_playwright

    run = await run_the_loop(stack)
    training = Heartbeat("trainer", stack.sessions, stack.settings.liveness, detail=lambda: {"training": "b-0042"},
                         host="gpu-1", pid=11)  # fmt: skip
    training.beat()
    stopped = Heartbeat("worker", stack.sessions, stack.settings.liveness, host="cpu-1", pid=12)
    stopped.beat()
    stopped.stopped()
    async with httpx.AsyncClient(base_url=stack.base_url) as http:
        assert (await http.get("/dashboard")).status_code == 401
        assert (await http.get("/dashboard", params={"key": "wrong"})).status_code == 401
        assert (await http.get("/v1/overview")).status_code == 401
        # An app's key opens its own app's view; /metrics (every app's counters) stays the operator's.
        assert (await http.get("/dashboard", params={"key": KEY})).status_code == 303
        assert (await http.get("/metrics", headers=AUTH)).json()["reason"] == "forbidden"

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=chromium_path(), headless=True)
        try:
            page = await browser.new_page(viewport={"width": 1400, "height": 1000})
            problems: list[str] = []
            page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append(str(e)))
            await page.goto(f"{stack.base_url}/dashboard?key={OPERATOR_KEY}")
            assert page.url == f"{stack.base_url}/dashboard"  # the key left the address bar
            cookie = next(c for c in await page.context.cookies() if c["name"] == "feedloop_dashboard")
            assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and OPERATOR_KEY not in cookie["value"]
            await page.wait_for_function("() => window.feedloopDashboard.updates > 0", timeout=60_000)
            charts = await page.evaluate("""() => Object.fromEntries(
                ['adapters', 'traffic', 'reward', 'ab', 'batches', 'deadletters', 'privacy'].map(id => [id,
                 document.getElementById('chart-' + id).data.map(t => ({name: t.name, x: t.x, y: t.y, value: t.value}))]))""")
            processes = await page.evaluate("""() => [...document.querySelectorAll('#table-processes tr')].slice(1)
                .map(tr => [...tr.cells].map(td => td.textContent))""")
            screenshot = tmp_path / "dashboard.png"
            await page.screenshot(path=str(screenshot), full_page=True)
            print(f"dashboard screenshot: {screenshot}")
            assert await page.evaluate("window.feedloopDashboard.lastError") is None
            assert problems == []  # no script errors, no content-security-policy violations

            # The app's own view, in a browser of its own: its traffic, none of what spans apps.
            app_page = await (await browser.new_context()).new_page()
            app_page.on("pageerror", lambda e: problems.append(str(e)))
            await app_page.goto(f"{stack.base_url}/dashboard?key={KEY}")
            await app_page.wait_for_function("() => window.feedloopDashboard.updates > 0", timeout=60_000)
            app_view = await app_page.evaluate("""() => ({
                title: document.getElementById('title').textContent,
                hidden: [...document.querySelectorAll('article')].filter(a => a.hidden).map(a => a.querySelector('h2').firstChild.textContent.trim()),
                traffic: document.getElementById('chart-traffic').data.map(t => t.name)})""")
            assert problems == [] and await app_page.evaluate("window.feedloopDashboard.lastError") is None
        finally:
            await browser.close()

    def names(chart: str) -> set[str]:
        return {trace["name"] for trace in charts[chart]}

    assert {run.champion, run.challenger} <= names("traffic") and {run.champion, run.challenger} <= names("reward")
    shares = {t["name"]: t["y"] for t in charts["traffic"]}
    assert all(0 <= s <= 1 for arm in (run.champion, run.challenger) for s in shares[arm])
    pair = f"{run.challenger} vs {run.champion}"
    assert {f"lift {pair}", f"{pair} lower", f"{pair} upper"} <= names("ab")
    ab = {t["name"]: t for t in charts["ab"]}
    lowers, uppers = ab[f"{pair} lower"]["y"], ab[f"{pair} upper"]["y"]
    assert lowers, "the confidence sequence starts once both arms have ab_min_samples rewards"
    assert ab[f"{pair} lower"]["x"] == ab[f"{pair} upper"]["x"] and None not in lowers + uppers
    # (The lift itself may leave the band: the band is the running intersection of the bounds.)
    assert all(lower <= upper for lower, upper in zip(lowers, uppers))
    # A running intersection: it only narrows, drawn in the order the test went through it.
    assert all(b <= a for a, b in zip(uppers, uppers[1:])) and all(b >= a for a, b in zip(lowers, lowers[1:]))
    assert uppers[-1] - lowers[-1] < uppers[0] - lowers[0]
    assert len(ab[f"lift {pair}"]["y"]) > len(lowers)  # the lift is drawn from the first rewards on
    assert {"ready", "loaded"} <= names("adapters")
    assert {"a/code", "b/chat", "weight explicit"} <= names("batches")
    reasons = dict(zip(charts["deadletters"][0]["y"], charts["deadletters"][0]["x"]))
    assert {"unknown_type", "schema_violation", "invalid_json"} <= set(reasons)
    assert charts["privacy"][0]["value"] == pytest.approx(run.epsilon_spent)
    rows = {row[0]: row for row in processes}
    assert rows["trainer"][1:3] == ["gpu-1:11", "up"] and rows["trainer"][5] == 'training "b-0042"'
    assert rows["worker"][1:3] == ["cpu-1:12", "down"] and rows["worker"][5].startswith("stopped at")
    assert app_view["title"] == "feedloop · app-a" and {run.champion, run.challenger} <= set(app_view["traffic"])
    assert app_view["hidden"] == ["Processes", "A/B tests: lift of challenger over champion", "Batches",
                                  "Drift alarms", "Privacy budget", "Pipeline lag"]


async def test_an_apps_key_sees_its_own_app_in_the_overview(stack):
    """App B's events and dead letters beside app A's: each key's overview holds its own only;
    the operator's holds both."""
    run = await run_the_loop(stack)  # app A's traffic
    marker = uuid.uuid4().hex
    b_turn = interaction(app_id="app-b", adapter=run.champion, event_id=f"b-{marker}")
    async with httpx.AsyncClient(base_url=stack.base_url, timeout=30) as http:
        b_key = {"Authorization": f"Bearer {API_KEYS['app-b']}"}
        answer = await http.post("/v1/events", json=[b_turn, {"type": "sparkle", "event_id": f"b-bad-{marker}"}],
                                 headers=b_key)  # fmt: skip
        assert answer.json()["accepted"] == 1
        await wait_until_archived(stack, DEAD_LETTER.name, 1, where=carries(f"b-bad-{marker}"))
        await wait_until_archived(stack, EVENTS.name, 1, where=lambda r: f"b-{marker}".encode() in r.value)
        views = {who: (await http.get("/v1/overview", headers=headers)).json()
                 for who, headers in (("a", AUTH), ("b", b_key), ("ops", OPERATOR))}  # fmt: skip
    a, b, ops = views["a"], views["b"], views["ops"]
    assert (a["app_id"], b["app_id"], ops["app_id"]) == ("app-a", "app-b", None)
    # The topics are the session's (other tests' records are archived too): counts compare, names are this run's.
    count = lambda view: view["events_accepted"]["interaction"]  # noqa: E731
    assert count(b) >= 1 and count(a) >= 12 and count(a) + count(b) <= count(ops)
    assert a["examples"] >= 2 * EXAMPLES_PER_ARM and a["examples"] + b["examples"] <= ops["examples"]
    assert {d["app_id"] for d in b["recent_dead_letters"]} == {"app-b"} and "unknown_type" in b["dead_letters"]
    assert "app-b" not in {d["app_id"] for d in a["recent_dead_letters"]}
    # This run's arms: A's interactions went to both, B's one to the champion; the examples are A's.
    assert {run.champion, run.challenger} <= set(a["traffic_share"]["values"]) <= set(ops["traffic_share"]["values"])
    assert run.champion in b["traffic_share"]["values"] and run.challenger not in b["traffic_share"]["values"]
    assert run.challenger in a["reward_mean"]["values"] and run.challenger not in b["reward_mean"]["values"]
    for view in (a, b):  # what is made of every app's data
        assert view["experiments"] == view["lag"] == view["processes"] == view["recent_batches"] == []
        assert view["records_by_topic"] == {} and view["privacy"]["entries"] == {}
    assert ops["experiments"] and ops["records_by_topic"]
    assert [adapter["name"] for adapter in a["adapters"]] == [adapter["name"] for adapter in ops["adapters"]]


def archive_counts(stack) -> tuple[Counter, Counter]:
    events = Counter(json.loads(r.value).get("type") for r in archived_records(stack, EVENTS.name))
    letters = Counter(json.loads(r.value)["reason"] for r in archived_records(stack, DEAD_LETTER.name))
    return Counter({k: events[k] for k in ("interaction", "feedback", "annotation")}), letters


def scrape(text: str) -> dict[str, dict[tuple, float]]:
    samples: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


async def test_metrics_and_status_match_the_archive(stack, monkeypatch):
    run = await run_the_loop(stack)
    async with httpx.AsyncClient(base_url=stack.base_url) as http:
        assert (await http.get("/metrics")).status_code == 401
        # Other tests' records may still be arriving on the shared topics: compare once the
        # archive reads the same before and after the scrape.
        for _ in range(50):
            before = archive_counts(stack)
            response = await http.get("/metrics", headers=OPERATOR)
            if archive_counts(stack) == before:
                break
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    metrics = scrape(response.text)
    events, letters = before
    accepted = {dict(labels)["type"]: v for labels, v in metrics["feedloop_events_accepted_total"].items()}
    assert accepted == dict(events) and events["interaction"] >= 12 and events["feedback"] >= 5
    dead = {dict(labels)["reason"]: v for labels, v in metrics["feedloop_dead_letters_total"].items()}
    assert dead == dict(letters) and letters["schema_violation"] >= 2 and letters["invalid_json"] >= 1
    assert metrics["feedloop_overview_up"][()] == 1
    assert metrics["feedloop_route_latency_seconds_count"][()] == 1
    assert metrics["feedloop_batches"][(("status", "trained"),)] == 1
    assert metrics["feedloop_batches"][(("status", "emitted"),)] == 1
    assert metrics["feedloop_adapters"][(("state", "challenger"),)] >= 1  # the shared control topic may hold more
    assert metrics["feedloop_adapters"][(("state", "failed"),)] == 1
    assert metrics["feedloop_swap_latency_seconds_count"][()] == 1  # the malformed lineage is skipped
    assert metrics["feedloop_swap_latency_seconds_sum"][()] == pytest.approx(0.85)
    assert metrics["feedloop_swap_latency_seconds_bucket"][(("le", "1.0"),)] == 1
    assert metrics["feedloop_swap_latency_seconds_bucket"][(("le", "0.5"),)] == 0
    assert metrics["feedloop_privacy_epsilon_spent"][()] == pytest.approx(run.epsilon_spent)
    lift = {dict(labels)["bound"]: v for labels, v in metrics["feedloop_ab_lift"].items()
            if dict(labels)["challenger"] == run.challenger}
    assert lift["lower"] <= lift["upper"] and -1 <= lift["estimate"] <= 1

    for name, value in {"FEEDLOOP_DATA_DIR": str(stack.settings.data_dir),
                        "FEEDLOOP_LEARNERS__INITIAL_ARMS": json.dumps([run.champion]),
                        "FEEDLOOP_LEARNERS__AB_MIN_SAMPLES": "20", "FEEDLOOP_LOG_LEVEL": "warning",
                        "COLUMNS": "200"}.items():  # rich's width off a terminal
        monkeypatch.setenv(name, value)
    result = CliRunner().invoke(main, ["status"])
    assert result.exit_code == 0, result.output
    for text in (run.champion, run.challenger, "challenger", "schema_violation", f"batch-{run.marker[:8]}-2",
                 "epsilon 1.50 of 8.00"):
        assert text in result.output
    result = CliRunner().invoke(main, ["status", "--json"])
    overview = json.loads(result.output)
    assert overview["events_accepted"] == accepted and overview["dead_letters"] == dead
    assert run.challenger in overview["challengers"]
