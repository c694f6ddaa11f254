"""The learners in the live system: gateway, pipeline worker and learner worker on the real broker.

A simulated app asks ``POST /v1/route`` which adapter serves each request, logs the
interaction with that adapter and propensity, and gives feedback that favours one adapter per
domain. Checks: an ``adapter_loaded`` event adds an arm that the gateway routes to; the router
learns the best adapter per domain; the A/B test promotes the better challenger on the control
topic; the change of domain mix raises a drift alarm; review picks stay within budget; and a
learner killed with SIGKILL comes back with the identical router.
"""

import asyncio
import json
import subprocess

import httpx
import numpy as np
from aiokafka import AIOKafkaProducer
from sqlalchemy import select

from streams.config import LearnerSettings
from streams.store import RouterSnapshot, make_engine, make_sessionmaker
from streams.contract import AdapterLoaded, Context, utcnow
from learners.router import LinUCBRouter
from streams.learning import route_features
from streams.topics import CONTROL, REVIEW
from tests.conftest import archived_records, make_settings, start_stack, wait_until_archived
from tests.factories import feedback, interaction
from tests.integration.test_pipeline_live import AUTH, at, start_worker, stop_worker, wait_for

# No canary cap: 240 requests must teach the router and give code-v1 a verdict (the cap has
# its own tests in tests/learners). A min_propensity of 0.1 keeps a tenth of the traffic on the
# base model, which the router soon learns is worst, so code-v1's test against it fills sooner
# (it was a fixed floor of 0.3 over the three arms before the floor faded): with a floor of 0.1,
# some runs promoted nothing (the suspected cause, not yet observed: the test
# was still short of base's rewards when the mix moved to math, and chat-v1's reward drift
# then ended it, as a reward alarm ends every running test). With the fixed 0.3, 5 of 6 runs here passed;
# a failure prints the control events the archive holds.
LEARNERS = {"initial_arms": ["base", "chat-v1"], "ab_min_samples": 15, "review_budget_per_hour": 5,
            "checkpoint_interval_s": 0.5, "snapshot_poll_s": 0.3, "canary_share": 1.0, "min_propensity": 0.1}  # fmt: skip
LEARNER_ENV = {f"FEEDLOOP_LEARNERS__{k.upper()}": json.dumps(v) for k, v in LEARNERS.items()}
# Which adapter answers well where: code-v1 for code and math, chat-v1 for chat, base nowhere.
GOOD = {("code-v1", "code"), ("code-v1", "math"), ("chat-v1", "chat")}


def start_learner(settings) -> subprocess.Popen:
    return start_worker(settings, LEARNER_ENV, command="learn")


def newest_snapshot(sessions) -> RouterSnapshot | None:
    with sessions() as session:
        return session.scalar(select(RouterSnapshot).order_by(RouterSnapshot.id.desc()).limit(1))


async def route(http: httpx.AsyncClient, context: dict) -> dict:
    response = await http.post("/v1/route", json={"context": context}, headers=AUTH)
    assert response.status_code == 200, response.text
    return response.json()


async def simulate(http: httpx.AsyncClient, domains: list[str], start: int) -> None:
    """Route each request through the gateway, log it with the chosen adapter, give a thumb."""
    events = []
    for n, domain in enumerate(domains, start):
        context = {"domain": domain, "cohort": "ab"[n % 2]}
        decision = await route(http, context)
        turn = interaction(occurred_at=at(n), adapter=decision["adapter"], propensity=decision["propensity"],
                           probabilities=decision["probabilities"], context=context)  # fmt: skip
        up = (decision["adapter"], domain) in GOOD
        events += [turn, feedback(turn, "thumbs", value=1 if up else -1, occurred_at=at(n + 1))]
    for i in range(0, len(events), 200):
        response = await http.post("/v1/events", content=json.dumps(events[i : i + 200]), headers=AUTH)
        assert response.status_code == 202, response.text


async def test_learners_route_learn_decide_and_survive_sigkill(tmp_path, own_broker):
    settings = make_settings(tmp_path, own_broker.port, learners=LearnerSettings(**LEARNERS))
    stack, stop = await start_stack(settings)
    sessions = make_sessionmaker(make_engine(settings.store_url))
    # The pipeline starts once the events are in: its first idle tick (wall-clock time) would
    # otherwise close every window before the events of an hour ago came, and all their
    # feedback would be late (with the learner's start a little slower, 3 runs in 3 were).
    pipeline, learner = None, start_learner(settings)
    http = httpx.AsyncClient(base_url=stack.base_url, timeout=30)
    try:
        producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers)
        await producer.start()
        loaded = AdapterLoaded(event_id="loaded-code-v1", occurred_at=utcnow(), source="hotswap",
                               adapter="code-v1", replicas=["r0"])  # fmt: skip
        await producer.send_and_wait(CONTROL.name, loaded.model_dump_json().encode(), key=b"code-v1")
        await producer.stop()
        # learner -> store -> gateway: the new arm is routed to, with its propensity.
        await wait_for(lambda: (s := newest_snapshot(sessions)) and "code-v1" in s.arms, 90, "the code-v1 arm")
        arms = await wait_for_route(http, lambda body: "code-v1" in body["probabilities"])
        assert set(arms["probabilities"]) == {"base", "chat-v1", "code-v1"}

        # Code and chat traffic, then the mix moves to math.
        total = 240
        await simulate(http, ["code", "chat"] * 60 + ["math"] * 120, start=0)
        pipeline = start_worker(settings)
        await wait_for(lambda: (s := newest_snapshot(sessions)) and s.examples >= total, 120, "every example learned")

        def control_of(kind: str, prefix: str = ""):
            def matches(record) -> bool:
                event = json.loads(record.value)
                return event["type"] == kind and event.get("signal", "").startswith(prefix)
            return matches

        # Wait for the records themselves: the archive may hold other control events first.
        promoted = [json.loads(r.value) for r in
                    await wait_until_archived(stack, CONTROL.name, 1, where=control_of("adapter_promoted"))]
        seen = [(e["type"], e.get("adapter") or e.get("signal"), e.get("reason", ""))
                for e in (json.loads(r.value) for r in archived_records(stack, CONTROL.name))]  # fmt: skip
        assert [(e["adapter"], e["previous_champion"], e["source"]) for e in promoted] == [
            ("code-v1", "base", "learners")], seen
        assert await wait_until_archived(stack, CONTROL.name, 1, where=control_of("drift_alarm", "feature:domain="))
        best = {d: await wait_for_route(http, lambda b: "base" not in b["probabilities"], {"domain": d, "cohort": "a"})
                for d in ("code", "chat", "math")}  # fmt: skip
        assert {d: max(b["probabilities"], key=b["probabilities"].get) for d, b in best.items()} == {
            "code": "code-v1", "chat": "chat-v1", "math": "code-v1"}
        picks = [json.loads(r.value) for r in await wait_until_archived(stack, REVIEW.name, 1)]
        assert 1 <= len(picks) <= 2 * 5  # 4 minutes of event time touch at most two hours of budget
        assert all(p["example"]["app_id"] == "app-a" and p["type"] == "review_request" for p in picks)

        # Quiet, checkpointed: kill the learner without warning and start it again.
        before = await settled(sessions)
        probabilities = (await wait_for_route(http, lambda b: b["snapshot_version"] == before.version))["probabilities"]
        stop_worker(learner, kill=True)
        learner = start_learner(settings)
        after = await wait_for(lambda: (s := newest_snapshot(sessions)) and s.id > before.id and s, 90,
                               "the restarted learner's snapshot")  # fmt: skip
        assert (after.version, after.examples, after.arms) == (before.version, before.examples, before.arms)
        assert after.state == before.state
        for domain in ("code", "chat", "math"):
            features = route_features(Context(domain=domain, cohort="b"), "app-a")
            routers = [LinUCBRouter.from_bytes(s.state, np.random.default_rng(11)) for s in (before, after)]
            assert routers[0].decide(features) == routers[1].decide(features)
        await asyncio.sleep(2)  # redelivered records, if any, must not be learned twice
        assert newest_snapshot(sessions).version == before.version
        reloaded = await wait_for_route(http, lambda b: b["snapshot_version"] == before.version)
        assert reloaded["probabilities"] == probabilities

        # And it goes on learning.
        await simulate(http, ["chat"] * 20, start=total + 10)
        await wait_for(lambda: newest_snapshot(sessions).examples == total + 20, 90, "the new examples")
    finally:
        await http.aclose()
        stop_worker(learner)
        if pipeline is not None:
            stop_worker(pipeline)
        await stop()


async def wait_for_route(http, predicate, context=None, timeout_s: float = 30) -> dict:
    """The gateway's answer once it holds a router the predicate accepts (it polls the store)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        body = await route(http, context or {"domain": "code", "cohort": "a"})
        if predicate(body):
            return body
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"the gateway never routed as expected; last answer {body}")
        await asyncio.sleep(0.2)


async def settled(sessions, quiet_s: float = 2.0) -> RouterSnapshot:
    """The newest snapshot once no newer one has come for ``quiet_s``."""
    last = newest_snapshot(sessions)
    while True:
        await asyncio.sleep(quiet_s)
        newest = newest_snapshot(sessions)
        if newest.id == last.id:
            return newest
        last = newest
