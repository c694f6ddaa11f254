"""The embedded broker restarting empty under a running worker, learner and archiver.

The broker comes back with a new cluster id and offsets from zero. Each process must notice
before it acknowledges anything of the new broker life and stop; started again (as compose
would), it reads the new life from its start. Nothing the old life held and the archive took
is lost, and nothing is doubled: the archive holds every event once, the worker's checkpoints
every example once, the learner every example once, and an offline replay of the archive (both
lives) cuts the batches the live worker cut.
"""

import json
from collections import Counter

import pytest
from sqlalchemy import select

from app.broker import ensure_topics
from streams.agents import PIPELINE_RECORD_KEYS
from streams.broker_life import NewBrokerLife
from streams.checkpoint import decode
from streams.learner_agents import STATE_FORMAT as LEARNER_FORMAT
from streams.store import ArchiveSegment, StreamCheckpoint, make_engine, make_sessionmaker
from streams.topics import EVENTS
from tests.conftest import archived_records, make_settings, start_stack
from tests.integration.test_pipeline_live import (
    _examples,
    _examples_done,
    batches,
    post,
    replay_offline,
    start_worker,
    stop_worker,
    traffic,
    wait_for,
)


class Supervisor:
    """Runs `feedloop worker` and `feedloop learn` and starts again whichever exits, as
    compose's `restart: unless-stopped` does; keeps their exit codes."""

    def __init__(self, settings) -> None:
        self.settings = settings
        self.processes = {command: start_worker(settings, command=command) for command in ("worker", "learn")}
        self.exits: list[tuple[str, int]] = []

    def tend(self) -> None:
        for command, process in self.processes.items():
            if process.poll() is not None:
                self.exits.append((command, process.returncode))
                self.processes[command] = start_worker(self.settings, command=command)

    def stop(self) -> None:
        for process in self.processes.values():
            stop_worker(process)


def _learner_examples(settings) -> int:
    with make_sessionmaker(make_engine(settings.store_url))() as session:
        row = session.get(StreamCheckpoint, ("feedloop-learners", 0))
        return -1 if row is None or row.format_version != LEARNER_FORMAT else decode(row, LEARNER_FORMAT).examples


def _archived_event_ids(stack) -> Counter:
    records = archived_records(stack, EVENTS.name)
    return Counter(json.loads(r.value)["event_id"] for r in records if r.key not in PIPELINE_RECORD_KEYS)


async def test_a_broker_restart_under_running_processes_loses_and_doubles_nothing(tmp_path, own_broker):
    settings = make_settings(tmp_path, own_broker.port)
    first, second = traffic(150), traffic(300)[300:]  # the second: interactions 150-299
    stack, stop_stack = await start_stack(settings)
    supervisor = Supervisor(settings)
    try:
        await post(stack.base_url, first)
        await wait_for(lambda: _examples(settings) == 150 and _learner_examples(settings) == 150, 120,
                       "the first traffic through the worker and the learner")  # fmt: skip
        await wait_for(lambda: len(_archived_event_ids(stack)) == len(first), 30, "the first traffic archived")
        old_life = own_broker.cluster_id

        own_broker.stop()
        own_broker.start()  # empty, with a new cluster id
        await ensure_topics(settings)  # as every process does when it starts
        await wait_for(stack.archive_task.done, 60, "the archiver to stop on the new broker")
        with pytest.raises(NewBrokerLife):
            await stop_stack()
        stack, stop_stack = await start_stack(settings)  # the archiver started again

        await post(stack.base_url, second)

        def done() -> bool:
            supervisor.tend()
            return _examples_done(settings, 300) and _learner_examples(settings) >= 300

        await wait_for(done, 180, "the second traffic through the restarted processes")
        await wait_for(lambda: len(_archived_event_ids(stack)) >= len(first + second), 60, "the second archived")
    finally:
        supervisor.stop()
        await stop_stack()

    # Each stopped on the new broker before acknowledging anything of it, and said so.
    assert {command for command, code in supervisor.exits if code != 0} == {"worker", "learn"}, supervisor.exits
    for command in ("worker", "learn"):
        said = [line for line in (settings.data_dir.parent / f"{command}.log").read_text().splitlines()
                if '"event": "broker.new_life"' in line]  # fmt: skip
        assert said and '"unprocessed":' in said[0], command  # what the old life's archive holds beyond it
    with stack.sessions() as session:
        assert set(session.scalars(select(ArchiveSegment.cluster_id))) == {old_life, own_broker.cluster_id}
    ids = _archived_event_ids(stack)
    assert set(ids) == {e["event_id"] for e in first + second} and set(ids.values()) == {1}
    assert _examples(settings) == 300 and _learner_examples(settings) == 300
    live = batches(stack)
    assert live and replay_offline(settings, tmp_path / "replayed") == live
