"""Heartbeats: a process that beats is up, one that stopped or went silent is down, and
`feedloop health` exits by it (the Docker health check)."""

import asyncio
from datetime import timedelta

from click.testing import CliRunner
from sqlalchemy import select

from app.cli import main
from app.liveness import DOWN, STARTING, UP, Heartbeat, LivenessSettings, process_views, utcnow
from streams.store import ProcessHeartbeat, make_engine, make_sessionmaker

SETTINGS = LivenessSettings(interval_s=0.05, down_after_s=10.0, forget_after_s=3600.0)


def views(sessions, **kwargs):
    with sessions() as session:
        return process_views(session, SETTINGS, **kwargs)


def test_a_beating_process_is_up_with_what_it_reports(sessions):
    Heartbeat("trainer", sessions, SETTINGS, detail=lambda: {"training": "b-1"}, host="h1", pid=7).beat()
    (view,) = views(sessions)
    assert (view.process, view.host, view.pid, view.state, view.why) == ("trainer", "h1", 7, UP, "")
    assert view.detail == {"training": "b-1"} and view.instance == "trainer@h1:7"


def test_a_process_not_ready_is_starting(sessions):
    Heartbeat("worker", sessions, SETTINGS, ready=lambda: False, host="h1", pid=1).beat()
    (view,) = views(sessions)
    assert view.state == STARTING and "not ready" in view.why


def test_a_silent_process_is_down_once_its_last_beat_is_too_old(sessions):
    Heartbeat("learner", sessions, SETTINGS, host="h1", pid=2).beat()
    assert views(sessions, now=utcnow() + timedelta(seconds=9))[0].state == UP
    (late,) = views(sessions, now=utcnow() + timedelta(seconds=11))
    assert late.state == DOWN and "no heartbeat for 11 s" in late.why
    assert views(sessions, now=utcnow() + timedelta(seconds=3601)) == [], "forgotten after forget_after_s"


def test_a_stopped_process_is_down_at_once_and_its_next_run_replaces_it(sessions):
    first = Heartbeat("archiver", sessions, SETTINGS, host="h1", pid=3)
    first.beat()
    first.stopped()
    (view,) = views(sessions)
    assert view.state == DOWN and view.why.startswith("stopped at")
    other_host = Heartbeat("archiver", sessions, SETTINGS, host="h2", pid=3)
    other_host.beat()
    Heartbeat("archiver", sessions, SETTINGS, host="h1", pid=4).beat()
    assert [(v.host, v.pid, v.state) for v in views(sessions)] == [("h1", 4, UP), ("h2", 3, UP)]


def test_run_beats_until_stopped_then_marks_the_row(sessions):
    heartbeat = Heartbeat("swap", sessions, SETTINGS, host="h1", pid=5)

    async def scenario():
        task = asyncio.create_task(heartbeat.run())
        await asyncio.sleep(0.3)
        with sessions() as session:
            beats = session.scalar(select(ProcessHeartbeat.beat_at))
        assert beats is not None and views(sessions)[0].state == UP
        heartbeat.stop()
        await asyncio.wait_for(task, 5)

    asyncio.run(scenario())
    assert views(sessions)[0].state == DOWN


def test_a_beat_that_cannot_reach_the_store_does_not_stop_the_process(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'unmigrated.db'}")  # no tables
    heartbeat = Heartbeat("gateway", make_sessionmaker(engine), SETTINGS, host="h1", pid=6)
    asyncio.run(heartbeat.beat_once())  # logs, does not raise
    heartbeat.stopped()
    engine.dispose()


def test_health_exits_by_the_heartbeat_of_this_host(tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    monkeypatch.setenv("FEEDLOOP_DATABASE_URL", url)
    runner = CliRunner()
    assert runner.invoke(main, ["db", "upgrade"]).exit_code == 0
    missing = runner.invoke(main, ["health", "worker", "--host", "h1"])
    assert missing.exit_code == 1 and "no heartbeat of worker on h1" in missing.output
    engine = make_engine(url)
    heartbeat = Heartbeat("worker", make_sessionmaker(engine), SETTINGS, host="h1", pid=8)
    heartbeat.beat()
    up = runner.invoke(main, ["health", "worker", "--host", "h1"])
    assert up.exit_code == 0 and "worker h1:8 up" in up.output
    heartbeat.stopped()
    engine.dispose()
    down = runner.invoke(main, ["health", "worker", "--host", "h1"])
    assert down.exit_code == 1 and "down" in down.output and "stopped at" in down.output


def test_status_says_what_a_process_does_in_words():
    from app.status import _doing

    assert _doing({"partitions": {"feedloop.events.v1": [0, 2], "feedloop.control.v1": [0]}}) == \
        "partitions feedloop.control.v1 0; feedloop.events.v1 0,2"
    assert _doing({"training": "b-7"}) == "training b-7" and _doing({}) == ""
