"""`feedloop demo` (what `make run` runs): the whole loop on embedded defaults, on its own.

In this process: the embedded broker, the SQLite store, the archiver and the gateway. Beside
it: a vLLM server (CPU) and `feedloop worker`, `learn`, `train` and `swap`, all with the
same settings (``app.processes``). The tiny base model is built first if it is missing.

Then a simulated chat-app population (``demo.population``: cohorts with hidden preferences
that shift halfway, a rare skill, PII in some prompts) talks to the OpenAI-compatible gateway
and reacts to every answer with feedback. Nothing else is done by hand: the pipeline curates
batches, the trainer trains adapters, the controller hot-swaps them, and the A/B test
promotes or rolls them back. At the end the live champion and the static base model answer
held-out prompts for the blind judge, and the report (``demo.report``) goes to
``runs/<timestamp>/`` and ``runs/latest/``: a table, report.json and plots.

The demo shortens the loop's windows and thresholds (``DEMO_DEFAULTS``) unless a
``FEEDLOOP_*`` variable sets them. docs/demo.md describes the population and the report.
"""

from __future__ import annotations

import asyncio
import bisect
import json
import os
import secrets
import signal
import time
import uuid
from collections import Counter, deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from statistics import median

import httpx
import structlog
from pydantic import SecretStr
from rich.console import Console
from sqlalchemy import func, select

from app.local_loop import LocalLoop
from app.logs import configure_logging
from app.overview import OverviewSource
from app.review_desk import ReviewerKey
from app.settings import Settings
from learners.loss_weights import LossWeights
from demo.base_model import ensure_base_model
from demo.population import Population, PopulationConfig, Turn, style_profile
from demo.progress import Snapshot, progress_view
from demo.report import ABPoint, Decision, DemoReport, LabelSavings, RewardPoint, Series, WeightPoint
from demo.report import drift_detect_delay, label_savings, loaded_so_far, recovery_delay, regret_ratio, routing_regret
from demo.report import run_directory, weights_before, win_rate, write_report
from demo.suites import RARE_SKILL_ACCURACY
from streams.store import Adapter, ArchiveSegment, RouterSnapshot, make_engine, make_sessionmaker
from streams.agents import PIPELINE_RECORD_KEYS
from streams.archive import read_segment, segments, verify_archive
from streams.contract import AdapterState, AnnotatedExample
from streams.learning import combined_reward
from streams.objects import ObjectStore
from streams.topics import CONTROL, DEAD_LETTER, EVENTS, EXAMPLES
from streams.training_data import BATCHES

log = structlog.get_logger(__name__)

DEMO_APP = "demo-chat"
DEMO_REVIEWER = "demo-reviewer"  # the simulated reviewer's key (Driver.review)
# The simulated self-evaluation judge (Population.grade) as its annotations name it.
GRADER, GRADER_RUBRIC = "demo-grader", "demo-style-v1"
MAX_TOKENS = 48  # a detailed answer fits; the judge needs its closing line
CONCURRENCY = 4  # users talking at once
HELDOUT_PER_COHORT = 60
JUDGING_S = 75  # judging 3 x 60 prompts and the report: ~50 s on 2 cores

# What the demo shortens so that the loop turns several times in minutes, not days.
# One partition: one curator sees all feedback, so batches are few and large enough to move
# the model, rather than one small batch per partition. The A/B test is tuned to the lifts
# the demo's adapters make (tens of points: ab_tau), and the router's min_propensity keeps a tenth of
# the traffic on each arm of a test, so verdicts come within a minute or two. Four epochs of
# SFT and DPO: a batch of ~150 records moves the tiny model's style by tens of points. No KTO:
# on the demo's batches it moved the style the wrong way and cost the rare skill (docs/demo.md).
# The gate scores the toy world's suites (demo.suites), on 20 held-out prompts instead of 60.
# The review budget's hour is 30 s: 3 picks in each, about 2% of the examples, for the
# simulated reviewer (Driver.review).
DEMO_DEFAULTS: dict[str, object] = {
    "topic_partitions": 1,
    "pipeline": {"implicit_window_s": 4, "explicit_window_s": 8, "allowed_lateness_s": 1, "idle_tick_s": 1,
                 "batch_size": 160, "batch_max_wait_s": 120, "checkpoint_interval_s": 1},
    "learners": {"ab_min_samples": 40, "ab_max_samples": 300, "ab_tau": 0.2, "floor": 0.2, "min_propensity": 0.1, "canary_share": 0.5,
                 "checkpoint_interval_s": 1, "snapshot_poll_s": 1, "review_budget_per_hour": 3, "review_hour_s": 30},
    "serving": {"drain_s": 3, "reconcile_interval_s": 10, "max_loras": 3},
    "trainer": {"num_threads": 1, "log_every": 50,
                "gate": {"suites": [{"component": "demo.suites:toy_suites", "options": {"heldout_prompts": 20}}]},
                "sft": {"epochs": 4}, "dpo": {"epochs": 4}, "kto": {"enabled": False}},
}  # fmt: skip


def demo_state(data_dir: Path, resume: bool, now: datetime | None = None) -> Path:
    """The directory of one run's state: its store, archive, keys, batches, adapters and logs.

    Each run starts from nothing in a new ``<data_dir>/demo/<UTC timestamp>/``: a run that
    continued the last one's store, registry and router would meet a population that starts
    before the shift with a champion trained after it, and its report would mix both runs.
    ``resume`` continues the newest one instead (a new one if there is none). The base model
    is built once, outside, and shared by every run.

    >>> import tempfile
    >>> data = Path(tempfile.mkdtemp())
    >>> first = demo_state(data, resume=False, now=datetime(2026, 12, 3, 12, 0, tzinfo=timezone.utc))
    >>> first.relative_to(data).as_posix()
    'demo/20261203T120000Z'
    >>> first.mkdir(parents=True)
    >>> demo_state(data, resume=True) == first, demo_state(data, resume=False) == first
    (True, False)
    """
    runs = data_dir / "demo"
    if resume and (earlier := [p for p in runs.glob("*") if p.is_dir()]):
        return max(earlier, key=lambda p: p.stat().st_mtime)
    return run_directory(runs, now or datetime.now(timezone.utc))


def demo_settings(settings: Settings, resume: bool = False) -> Settings:
    """The settings with DEMO_DEFAULTS, except where FEEDLOOP_<FIELD> or FEEDLOOP_<GROUP>__<FIELD> is set,
    and this run's own state directory (``demo_state``)."""
    updates = {"data_dir": demo_state(settings.data_dir, resume)}
    for group, values in DEMO_DEFAULTS.items():
        if not isinstance(values, dict):
            if f"FEEDLOOP_{group}".upper() not in os.environ:
                updates[group] = values
            continue
        current = getattr(settings, group).model_dump()
        for name, value in values.items():
            if f"FEEDLOOP_{group}__{name}".upper() in os.environ:
                continue
            current[name] = {**current[name], **value} if isinstance(value, dict) else value
        updates[group] = type(getattr(settings, group)).model_validate(current)
    if DEMO_APP not in settings.api_keys:
        updates["api_keys"] = {**settings.api_keys, DEMO_APP: SecretStr(secrets.token_urlsafe(16))}
    if DEMO_REVIEWER not in settings.reviewer_keys:
        reviewer = ReviewerKey(app_id=DEMO_APP, key=SecretStr(secrets.token_urlsafe(16)))
        updates["reviewer_keys"] = {**settings.reviewer_keys, DEMO_REVIEWER: reviewer}
    if "FEEDLOOP_BASE_MODEL_PATH" not in os.environ:
        updates["base_model_path"] = settings.data_dir / "models" / "demo-base"
    return settings.model_copy(update=updates)


# --- what the simulated users did ------------------------------------------------------------


@dataclass
class Served:
    """One answer: what the judge and the report need."""

    index: int
    cohort: str
    phase: int
    adapter: str
    answer: str
    satisfied: bool
    at: float  # wall time of the request


@dataclass
class Traffic:
    sent_events: int = 0
    failed_requests: int = 0
    served: list[Served] = field(default_factory=list)
    decisions: list[Decision] = field(default_factory=list)
    outcomes: dict[str, tuple[Turn, bool]] = field(default_factory=dict)  # interaction id -> (turn, satisfied)
    reviewed: list[str] = field(default_factory=list)  # example ids the simulated reviewer labelled
    recent: deque = field(default_factory=lambda: deque(maxlen=100))  # satisfied flags

    @property
    def satisfaction(self) -> float | None:
        return sum(self.recent) / len(self.recent) if self.recent else None


class Driver:
    """Sends the population's turns through the chat gateway and their feedback to /v1/events."""

    def __init__(self, population: Population, gateway_url: str, api_key: str, arms: list[str],
                 reviewer_key: str | None = None) -> None:  # fmt: skip
        self.population = population
        self.http = httpx.AsyncClient(base_url=gateway_url, timeout=180,
                                      headers={"Authorization": f"Bearer {api_key}"})  # fmt: skip
        self.reviewer = None if reviewer_key is None else httpx.AsyncClient(
            base_url=gateway_url, timeout=60, headers={"Authorization": f"Bearer {reviewer_key}"})
        self.traffic = Traffic()
        self.arms = arms  # live arms, refreshed by the caller from the router snapshots

    async def close(self) -> None:
        await self.http.aclose()
        if self.reviewer is not None:
            await self.reviewer.aclose()

    async def review(self, until: float, poll_s: float = 2.0) -> None:
        """The simulated reviewer: works the review desk's queue until ``until`` (monotonic).

        For each example the learner picked it posts what a careful person would: thumbs by
        whether the answer met the user's hidden preference, and, when it did not, the answer
        the user wanted (as a user's edit is), which becomes training data. An example it cannot
        place (not one of the population's turns) is labelled ``skipped``, so it leaves the queue."""
        population, traffic = self.population, self.traffic
        while time.monotonic() < until:
            try:
                queue = await self.reviewer.get("/v1/review/queue")
                items = queue.json()["items"] if queue.status_code == 200 else []
                for item in items:
                    example = item["example"]
                    known = traffic.outcomes.get(example["example_id"])
                    if known is None:
                        labels = {"label": "skipped"}
                    else:
                        turn, satisfied = known
                        wanted = turn.prompt.answer(population.preferred_style(turn.cohort, turn.phase))
                        labels = {"thumbs": 1} if satisfied else {"thumbs": -1, "correction": wanted}
                    answer = await self.reviewer.post(f"/v1/review/{example['app_id']}/{example['example_id']}",
                                                      json=labels)  # fmt: skip
                    if answer.status_code == 202 and known is not None:
                        traffic.reviewed.append(example["example_id"])
            except httpx.TransportError as exc:
                log.warning("demo.review_failed", error=repr(exc))
            await asyncio.sleep(poll_s)

    async def run(self, turns, interactions: int, deadline: float) -> None:
        """Spread the turns evenly until ``deadline``: the drift then falls halfway in time,
        and the loop has as long to react to it as it had to learn the first preference."""
        start = time.monotonic()
        spacing = (deadline - start) / interactions

        async def user() -> None:
            for turn in turns:  # shared by the users; each takes the next turn
                due = start + turn.index * spacing
                if due > deadline:
                    return
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                await self.converse(turn)

        await asyncio.gather(*(user() for _ in range(CONCURRENCY)))

    async def wait_for_base(self, loop: Loop, timeout_s: float = 300) -> None:
        """Until the controller has loaded the zero-delta adapter, chat answers 503."""
        deadline = time.monotonic() + timeout_s
        while True:
            loop.check()
            response = await self.http.post("/v1/chat/completions", json={
                "model": "auto", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 1,
                "feedloop": {"training_consent": False}})  # fmt: skip
            if response.status_code == 200:
                self.traffic.sent_events += response.headers.get("x-feedloop-recorded") == "true"
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the base adapter was not served within {timeout_s:.0f} s: {response.text[:300]}")
            await asyncio.sleep(1)

    async def converse(self, turn) -> None:
        while turn is not None:
            reply = await self._chat(turn)
            if reply is None:
                return
            interaction_id, adapter, answer, recorded = reply
            population, traffic = self.population, self.traffic
            satisfied = population.satisfies(turn.user_id, turn.phase, turn.prompt, answer)
            traffic.served.append(Served(turn.index, turn.cohort, turn.phase, adapter, answer, satisfied, time.time()))
            traffic.outcomes[interaction_id] = (turn, satisfied)
            traffic.decisions.append(Decision(turn.index, adapter, turn.cohort, turn.phase, tuple(self.arms)))
            traffic.recent.append(satisfied)
            traffic.sent_events += recorded  # the gateway published the interaction event itself
            actions = population.react(turn, answer)
            now = datetime.now().astimezone().isoformat()
            on_turn = {"occurred_at": now, "app_id": DEMO_APP, "session_id": turn.session_id,
                       "interaction_id": interaction_id}  # fmt: skip
            events = [{"type": "feedback", "event_id": f"fb-{uuid.uuid4().hex}", **on_turn, "user_id": turn.user_id,
                       **action.fields} for action in actions]  # fmt: skip
            if (score := population.grade(turn, answer)) is not None:  # the self-evaluation channel
                events.append({"type": "annotation", "event_id": f"an-{uuid.uuid4().hex}", **on_turn, "source": "model",
                               "annotator": GRADER, "rubric": GRADER_RUBRIC, "label": "graded", "score": score})
            if events:
                response = await self.http.post("/v1/events", json=events)
                accepted = response.json().get("accepted", 0) if response.status_code == 202 else 0
                traffic.sent_events += accepted
            # A regenerate asks the same prompt again, as the next turn of this conversation.
            regenerate = any(action.kind == "regenerate" for action in actions)
            turn = population.regenerate(turn, interaction_id) if regenerate else None

    async def _chat(self, turn) -> tuple[str, str, str, bool] | None:
        body = {"model": "auto", "messages": turn.messages, "max_tokens": MAX_TOKENS, "temperature": 0.7,
                "seed": turn.index * 10 + turn.attempt, "user": turn.user_id, "feedloop": turn.feedloop}  # fmt: skip
        try:
            response = await self.http.post("/v1/chat/completions", json=body)
        except httpx.TransportError as exc:
            log.warning("demo.chat_failed", error=repr(exc))
            self.traffic.failed_requests += 1
            return None
        if response.status_code != 200:
            log.warning("demo.chat_failed", status=response.status_code, body=response.text[:300])
            self.traffic.failed_requests += 1
            return None
        answer = response.json()["choices"][0]["message"]["content"] or ""
        headers = response.headers
        recorded = headers.get("x-feedloop-recorded") == "true"
        return headers["x-feedloop-interaction-id"], headers["x-feedloop-adapter"], answer, recorded


# --- the loop's processes ---------------------------------------------------------------------


class Loop(LocalLoop):
    """Everything the demo runs (``app.local_loop``) and a vLLM server: ``stop_services()`` in the
    event loop, then ``stop_processes()``."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings, ("worker", "learn", "train", "swap"))
        self.vllm = None

    async def start(self) -> None:
        self.start_broker_and_store()
        # Held before it starts, so that stop() can end it even while it is still starting.
        self.vllm = _vllm(self.settings, self.logs / "vllm.log")
        await asyncio.to_thread(self.vllm.start, 600)
        await self.start_services()

    def check(self) -> None:
        super().check()
        if self.vllm is not None and not self.vllm.running:
            raise RuntimeError(f"vLLM exited:\n{self.vllm.log_tail()}")

    async def stop_adapter_changes(self) -> None:
        """Stop the processes that change which adapters serve (learn, train, swap), so that the
        judging that follows hears the champion it read from the registry: a verdict on late
        feedback during judging would retire it and unload it after the drain (vLLM then
        answers 404: the likely cause of one CI failure). What they leave unread on the control
        topic is applied on the next start."""
        changing = [c for c in self.children if c.command[0] in ("learn", "train", "swap")]
        await asyncio.gather(*(asyncio.to_thread(child.stop) for child in changing))
        self.children = [c for c in self.children if c not in changing]

    def stop_processes(self) -> None:
        super().stop_processes()
        if self.vllm is not None:
            self.vllm.stop()


def _vllm(settings: Settings, log_path: Path):
    from urllib.parse import urlsplit

    from trainer.vllm_server import VllmServer, VllmServerConfig

    serving = settings.serving
    config = VllmServerConfig(model_path=settings.model_path, served_model_name=serving.served_model_name,
                              port=urlsplit(settings.vllm_urls[0]).port or 8000, max_lora_rank=serving.max_lora_rank,
                              max_loras=serving.max_loras, log_path=log_path)  # fmt: skip
    return VllmServer(config)


# --- reading the log back ------------------------------------------------------------------------


def registry(sessions, earlier: set[str] = frozenset()) -> list[Adapter]:
    """The registry's adapters, oldest first, less those named in ``earlier``."""
    with sessions() as session:
        rows = session.scalars(select(Adapter).order_by(Adapter.created_at))
        return [r for r in rows if r.name not in earlier]


def live_arms(sessions) -> list[str] | None:
    with sessions() as session:
        newest = session.scalar(select(RouterSnapshot).order_by(RouterSnapshot.id.desc()).limit(1))
    return list(newest.arms) if newest is not None else None


def last_segment(sessions) -> int:
    with sessions() as session:
        return session.scalar(select(func.max(ArchiveSegment.id))) or 0


def archived(sessions, objects: ObjectStore, after_segment: int, topic: str) -> list:
    """This run's records of a topic: those in segments sealed after ``after_segment``."""
    with sessions() as session:
        return [record for segment in segments(session, topic) if segment.id > after_segment
                for record in read_segment(objects, segment)]  # fmt: skip


def count_archived(sessions, objects: ObjectStore, after_segment: int) -> Counter:
    """The apps' records per topic since ``after_segment`` (not the worker's ticks/triggers)."""
    counts: Counter = Counter()
    for topic in (EVENTS.name, DEAD_LETTER.name):
        for record in archived(sessions, objects, after_segment, topic):
            if topic != EVENTS.name or record.key not in PIPELINE_RECORD_KEYS:
                counts[topic] += 1
    return counts


class TurnClock:
    """Maps event times back to the turn that was being served then (for alarms and A/B bounds)."""

    def __init__(self, served: list[Served]) -> None:
        ordered = sorted((s.at, s.index) for s in served)
        self.times = [t for t, _ in ordered]
        self.turns = [i for _, i in ordered]

    def turn_at(self, moment: datetime | float) -> int | None:
        at = moment.timestamp() if isinstance(moment, datetime) else moment
        if not self.times:
            return None
        return self.turns[min(bisect.bisect_left(self.times, at), len(self.turns) - 1)]


def leaked_canaries(objects: ObjectStore, canaries: list[str]) -> int:
    texts = [objects.get(key).decode(errors="replace") for key in objects.keys(BATCHES)]
    return sum(1 for canary in canaries if any(canary in text for text in texts))


MALFORMED = [  # what a buggy app might send: each is refused and dead-lettered with its reason
    b'[{"type": "interaction", "event_id": ',
    json.dumps([{"type": "sparkle", "event_id": "bad-type-0001"}]).encode(),
    json.dumps([{"type": "feedback", "event_id": "bad-kind-0001", "app_id": DEMO_APP, "session_id": "s",
                 "occurred_at": "2026-11-21T10:00:00Z", "interaction_id": "x", "kind": "sparkle"}]).encode(),
]  # fmt: skip


# --- the run -------------------------------------------------------------------------------------


async def _judge(settings: Settings, population: Population, champion: str) -> tuple[list[float], dict[str, list[float]]]:
    """Blind pairwise judgements of the champion against the static base model, per cohort."""
    from trainer.adapter_validation import base_model_sha256
    from trainer.serving import model_for, zero_delta_name

    zero = zero_delta_name(base_model_sha256(settings.model_path), settings.trainer.lora.rank)
    live = model_for(champion, base_adapter=zero, served_model_name=settings.serving.served_model_name)
    url = settings.vllm_urls[0].rstrip("/") + "/v1/chat/completions"
    limit = asyncio.Semaphore(8)

    async def answer(client: httpx.AsyncClient, model: str, prompt, seed: int) -> str:
        async with limit:
            response = await client.post(url, json={"model": model, "messages": [{"role": "user", "content": prompt.text}],
                                                     "max_tokens": MAX_TOKENS, "temperature": 0.7, "seed": seed})  # fmt: skip
            response.raise_for_status()
            return response.json()["choices"][0]["message"]["content"] or ""

    per_cohort: dict[str, list[float]] = {}
    async with httpx.AsyncClient(timeout=180) as client:
        for cohort in population.config.cohort_shares:
            prompts = population.heldout_prompts(HELDOUT_PER_COHORT, cohort)
            ours = await asyncio.gather(*(answer(client, live, p, i) for i, p in enumerate(prompts)))
            static = await asyncio.gather(*(answer(client, zero, p, i) for i, p in enumerate(prompts)))
            per_cohort[cohort] = [population.prefer(cohort, 1, a, b, prompt=p) for p, a, b in zip(prompts, ours, static)]
    return [j for judgements in per_cohort.values() for j in judgements], per_cohort


def _rare_skill(rows: list[Adapter], champion: str) -> tuple[float | None, float | None]:
    """Accuracy on the gate's rare-skill suite of the base model and of the champion."""
    evals = {r.name: r.lineage["eval"] for r in rows if (r.lineage or {}).get("eval")}
    start = next((e["base"][RARE_SKILL_ACCURACY] for e in evals.values()
                  if RARE_SKILL_ACCURACY in e.get("base", {})), None)  # fmt: skip
    end = evals[champion]["candidate"][RARE_SKILL_ACCURACY] if champion in evals else start
    return start, end


async def _demo(settings: Settings, loop: Loop, users: PopulationConfig, minutes: float, console: Console) -> int:
    started = time.monotonic()
    deadline = started + minutes * 60
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    await asyncio.to_thread(ensure_base_model, settings, console)
    population = Population(users)
    interactions = users.interactions
    sessions = None
    try:
        console.print(f"this run's state: {settings.data_dir}")
        console.print("starting broker, store, archive, gateway, vLLM, worker, learner, trainer, hot-swap ...")
        await loop.start()
        sessions = make_sessionmaker(make_engine(settings.store_url))
        before = last_segment(sessions)
        # Adapters of an earlier run (`--resume`, or a store named by FEEDLOOP_DATABASE_URL,
        # which outlives the run's directory) are not this run's to report.
        earlier = {r.name for r in registry(sessions)}
        if settings.database_url and earlier:
            console.print(f"the store at FEEDLOOP_DATABASE_URL holds {len(earlier)} adapters of earlier runs: "
                          "this run's report counts only its own")
        gateway_url = f"http://{settings.gateway_host}:{settings.gateway_port}"
        driver = Driver(population, gateway_url, settings.api_keys[DEMO_APP].get_secret_value(), ["base"],
                        settings.reviewer_keys[DEMO_REVIEWER].key.get_secret_value())  # fmt: skip
        await driver.wait_for_base(loop)
        for body in MALFORMED:
            await driver.http.post("/v1/events", content=body)

        # Judging and the report take the last JUDGING_S; the users talk until then.
        traffic = asyncio.create_task(driver.run(population.turns(), interactions, deadline - JUDGING_S))
        reviewing = asyncio.create_task(driver.review(until=deadline - JUDGING_S))
        with progress_view(console, interactions, loop.logs / "demo.log") as show:
            while not traffic.done():
                loop.check()
                driver.arms = live_arms(sessions) or driver.arms
                elapsed = time.monotonic() - started
                show(_snapshot(registry(sessions, earlier), driver.traffic, population, interactions, elapsed))
                await asyncio.wait([traffic], timeout=1.0)
            traffic.result()
        reviewing.cancel()  # its last labels come after the traffic and train nothing

        console.print("traffic done; waiting for the archive, stopping learn, train and swap, then judging on held-out "
                      "prompts ...")
        sent = driver.traffic.sent_events
        settle = time.monotonic() + 60
        while (counts := count_archived(sessions, settings.objects, before))[EVENTS.name] < sent:
            if time.monotonic() > settle:
                break
            await asyncio.sleep(0.5)
        await loop.stop_adapter_changes()
        every = registry(sessions)
        champion = next((r.name for r in every if r.state == AdapterState.CHAMPION), "base")
        judgements, per_cohort = await _judge(settings, population, champion)
        await driver.close()
        folded = _fold_examples(settings, sessions, before, driver.traffic)
        report = _report(settings, sessions, before, population, driver.traffic, every, earlier, champion, judgements,
                         per_cohort, counts, folded, time.monotonic() - started)  # fmt: skip
        series = _series(settings, sessions, before, population, driver.traffic)
        series.weights = folded.weights
        run_dir = write_report(report, Path("runs"), series, console=console)
        with sessions() as session:
            verified = verify_archive(session, settings.objects)
        console.print(f"report: {run_dir / 'report.json'} (and runs/latest/); logs: {loop.logs}; "
                      f"archive verified: {'yes' if verified.ok else verified.problems[:3]}")  # fmt: skip
        return 0 if all(report.targets().values()) else 1
    finally:
        await loop.stop_services()


def _snapshot(rows: list[Adapter], traffic: Traffic, population: Population, interactions: int,
              elapsed_s: float) -> Snapshot:  # fmt: skip
    states = Counter(r.state for r in rows)
    turns_done = len({s.index for s in traffic.served})
    return Snapshot(phase="before drift" if turns_done < population.shift_index else "after drift",
                    turns=turns_done, total_turns=interactions, events=traffic.sent_events, trained=len(rows),
                    promoted=states[AdapterState.CHAMPION] + states[AdapterState.RETIRED],
                    rolled_back=states[AdapterState.ROLLED_BACK], satisfaction=traffic.satisfaction,
                    elapsed_s=elapsed_s)  # fmt: skip


def _report(settings, sessions, before, population, traffic: Traffic, every, earlier, champion, judgements,
            per_cohort, counts, folded: Folded, wall_s) -> DemoReport:  # fmt: skip
    rate, ci95 = win_rate(judgements)
    # Each arm's style mix, measured on the answers it served; the arms live at a decision are
    # those of the router snapshot then (refreshed each second) that served anything at all.
    profiles = {arm: style_profile(s.answer for s in traffic.served if s.adapter == arm)
                for arm in {s.adapter for s in traffic.served}}  # fmt: skip

    def reward_of(arm: str, cohort: str, phase: int) -> float:
        return population.profile_reward(cohort, phase, profiles[arm])

    live = [Decision(d.event_index, d.arm, d.cohort, d.phase, tuple(dict.fromkeys(
            [a for a in d.arms if a in profiles] + [d.arm]))) for d in traffic.decisions]  # fmt: skip
    alarms = _alarm_turns(settings, sessions, before, traffic)
    start, end = _rare_skill(every, champion)
    rows = [r for r in every if r.name not in earlier]  # this run's
    swaps = [r.lineage["serving"]["swap_ms"] for r in rows if "serving" in (r.lineage or {})]
    archived_events = counts[EVENTS.name]
    savings = _label_savings(folded, traffic)
    return DemoReport(
        events_sent=traffic.sent_events,
        events_archived=archived_events,
        events_lost=max(0, traffic.sent_events - archived_events),
        dead_lettered=counts[DEAD_LETTER.name],
        pii_canaries_seeded=len(population.canaries_seeded),
        pii_canaries_leaked=leaked_canaries(settings.objects, population.canaries_seeded),
        win_rate_live_vs_static=rate,
        win_rate_ci95=ci95,
        regret_ratio_vs_uniform=regret_ratio(*routing_regret(loaded_so_far(live), reward_of)),
        regret_ratio_live_arms=regret_ratio(*routing_regret(live, reward_of)),
        recovery_events=recovery_delay(population.shift_index, [(s.index, float(s.satisfied)) for s in traffic.served]),
        drift_detect_delay_events=drift_detect_delay(population.shift_index, alarms),
        cohort_win_rates={cohort: win_rate(js)[0] for cohort, js in per_cohort.items()},
        rare_skill_accuracy_start=start,
        rare_skill_accuracy_end=end,
        adapters_trained=len(rows),
        adapters_promoted=sum(r.state in (AdapterState.CHAMPION, AdapterState.RETIRED) for r in rows),
        adapters_rolled_back=sum(r.state == AdapterState.ROLLED_BACK for r in rows),
        hot_swap_p50_ms=median(swaps) if swaps else None,
        wall_seconds=round(wall_s, 1),
        loss_weights_before_shift=weights_before(folded.weights, population.shift_index),
        loss_weights_end=dict(folded.weights[-1].weights) if folded.weights else None,
        review_labels=savings.labels,
        review_label_error_rate_active=savings.error_rate_active,
        review_label_error_rate_random=savings.error_rate_random,
        random_labels_to_match=savings.random_labels_to_match,
    )


def _alarm_turns(settings, sessions, before, traffic: Traffic) -> list[int]:
    clock = TurnClock(traffic.served)
    turns = []
    for record in archived(sessions, settings.objects, before, CONTROL.name):
        event = json.loads(record.value)
        if event.get("type") == "drift_alarm":
            turn = clock.turn_at(datetime.fromisoformat(event["detected_at"]))
            if turn is not None:
                turns.append(turn)
    return sorted(turns)


@dataclass
class Folded:
    """This run's examples as the learner folds them: the loss weights over time, and the
    label (the combined reward) it held for each example it could pick for review."""

    weights: list[WeightPoint] = field(default_factory=list)
    rewards: dict[str, float | None] = field(default_factory=dict)  # example id -> combined reward


def _fold_examples(settings, sessions, before, traffic: Traffic) -> Folded:
    """In closing order, each once, through the loss weights, with the turn being served when each closed."""
    examples = [AnnotatedExample.model_validate_json(r.value)
                for r in archived(sessions, settings.objects, before, EXAMPLES.name) if r.value]  # fmt: skip
    clock, weights, seen, folded = TurnClock(traffic.served), LossWeights(), set(), Folded()
    for example in sorted(examples, key=lambda e: e.closed_at):
        if example.key in seen:
            continue
        seen.add(example.key)
        weights.learn_one(example.rewards)
        if example.training_consent:  # what the review selector sees
            folded.rewards[example.example_id] = combined_reward(example.rewards, weights.weights())
        if (turn := clock.turn_at(example.closed_at)) is not None:
            folded.weights.append(WeightPoint(turn, {c: round(w, 4) for c, w in weights.weights().items()}))
    return folded


def _label_savings(folded: Folded, traffic: Traffic) -> LabelSavings:
    """The reviewers' labels against as many at random (``demo.report.label_savings``)."""
    wrong = {example_id: reward is None or (reward >= 0.5) != traffic.outcomes[example_id][1]
             for example_id, reward in folded.rewards.items() if example_id in traffic.outcomes}  # fmt: skip
    return label_savings(wrong, traffic.reviewed)


def _series(settings, sessions, before, population, traffic: Traffic) -> Series:
    series = Series(shift_index=population.shift_index)
    series.decisions = list(traffic.decisions)
    series.rewards = [RewardPoint(s.index, s.adapter, 1.0 if s.satisfied else 0.0) for s in traffic.served]
    series.alarms = _alarm_turns(settings, sessions, before, traffic)
    clock = TurnClock(traffic.served)
    for experiment in OverviewSource(settings, sessions).read().experiments:
        for at, lift, lower, upper in zip(experiment.times, experiment.lifts, experiment.lowers, experiment.uppers):
            turn = clock.turn_at(datetime.fromisoformat(at + "+00:00"))
            if None not in (turn, lift, lower, upper):
                series.ab_bounds.append(ABPoint(turn, experiment.challenger, lift, lower, upper))
    return series


def run_demo(settings: Settings, users: PopulationConfig, minutes: float, resume: bool = False) -> int:
    settings = demo_settings(settings, resume)
    if "FEEDLOOP_LOG_LEVEL" not in os.environ:
        # The terminal shows progress and the report; every process logs in full to the run's logs/.
        configure_logging("warning", settings.log_format)

    async def main() -> int:
        # SIGTERM (a supervisor, a test's timeout) stops every process as Ctrl-C does.
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, asyncio.current_task().cancel)
        return await _demo(settings, loop, users, minutes, console)

    console = Console(stderr=True)
    loop = Loop(settings)
    try:
        return asyncio.run(main())
    except (KeyboardInterrupt, asyncio.CancelledError):
        return 130
    finally:
        loop.stop_processes()
