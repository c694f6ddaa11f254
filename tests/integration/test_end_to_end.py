"""The whole loop, as `make run` runs it, with shorter settings: nothing mocked, nothing by hand.

`feedloop demo` in its own process on free ports: embedded broker, store, archive, gateway,
a real vLLM server (CPU), and `feedloop worker`, `learn`, `train` and `swap`. The simulated
population talks to the OpenAI-compatible gateway. An adapter must be trained from its
feedback, hot-swapped in, promoted by its A/B test, and serve traffic. No event or PII
canary may be lost or leak.

The demo's quality targets need the full run (`make run`); this test checks the loop.
"""

import json
import os
import subprocess
import sys

import pytest
from sqlalchemy import select

from streams.store import Adapter, make_engine, make_sessionmaker
from streams.archive import iter_archive
from streams.objects import ObjectStore
from streams.topics import EVENTS
from tests.conftest import free_port


@pytest.mark.timeout(1500)  # the loop runs for 11 minutes, plus building the base model
def test_an_adapter_trained_from_feedback_is_promoted_and_serves_traffic(tmp_path):
    data = tmp_path / "data"  # the default, relative data dir, as on a fresh checkout
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("FEEDLOOP_")},
        "FEEDLOOP_EMBEDDED_BROKER_PORT": str(free_port()),
        "FEEDLOOP_GATEWAY_PORT": str(free_port()),
        "FEEDLOOP_VLLM_URLS": f'["http://127.0.0.1:{free_port()}"]',
        # A shorter run than `make run`: smaller batches and a looser A/B level, so that the
        # loop turns (batch, adapter, swap, verdict) well within it. The statistics are
        # tested in tests/learners; here the loop is.
        "FEEDLOOP_PIPELINE__BATCH_SIZE": "100",
        "FEEDLOOP_LEARNERS__AB_ALPHA": "0.2",
    }
    log = open(tmp_path / "demo.log", "w")
    # The users prefer the second style (detailed) from the first turn: the base model answers
    # concisely 85% of the time, so the first adapter trained from their feedback gains over it
    # at once. With a shift mid-run, an adapter trained before it is ended by the drift alarm
    # and the next one continues from it, half in the old style: its test can end
    # inconclusive and nothing is promoted within 11 minutes (seen in `make test` at --drift-at 0.25,
    # and in CI at 0.5 before). The drift's handling is tested in tests/learners and reported by
    # `make run`; here the loop is.
    demo = subprocess.Popen([sys.executable, "-m", "app.cli", "demo", "--events", "1200", "--minutes", "11",
                             "--drift-at", "0"], env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        demo.wait(1350)
    except subprocess.TimeoutExpired:
        demo.terminate()  # the demo stops its broker, vLLM and workers on SIGTERM
        demo.wait(120)
    log.close()
    report_file = tmp_path / "runs" / "latest" / "report.json"
    assert report_file.exists(), (tmp_path / "demo.log").read_text()[-4000:]
    report = json.loads(report_file.read_text())
    assert report["events_lost"] == 0 and report["events_sent"] > 1200
    assert report["pii_canaries_seeded"] > 0 and report["pii_canaries_leaked"] == 0
    assert report["dead_lettered"] >= 3  # the malformed bodies the demo sends on purpose
    assert report["adapters_promoted"] >= 1, report
    assert all((tmp_path / "runs" / "latest" / name).stat().st_size > 0 for name in ("rewards.png", "traffic.png"))

    (state,) = (data / "demo").iterdir()  # the run's own state directory, the only one
    engine = make_engine(f"sqlite:///{state / 'feedloop.db'}")
    archive = ObjectStore(state.as_uri())
    with make_sessionmaker(engine)() as session:
        trained = set(session.scalars(select(Adapter.name)))
        promoted = set(session.scalars(select(Adapter.name).where(Adapter.state.in_(("champion", "retired")))))
        served_by = {json.loads(r.value).get("adapter") for r in iter_archive(session, archive, EVENTS.name)
                     if r.value and b'"interaction"' in r.value}  # fmt: skip
    engine.dispose()
    assert promoted and promoted <= trained & served_by, f"promoted {promoted}, trained {trained}, served {served_by}"
