"""`feedloop whatif` on a hand-written archive of router decisions (no broker)."""

from __future__ import annotations

import json
from datetime import timedelta

import numpy as np
import pytest
from click.testing import CliRunner

from app.cli import main
from app.settings import Settings
from app.whatif import Candidate
from learners.router import LinUCBRouter
from streams.config import LearnerSettings
from streams.contract import AdapterPinned, AnnotatedExample, Context
from streams.topics import CONTROL, EXAMPLES
from tests.test_overview import T0, seal

# Success probability by adapter and domain: the coder is better on code, worse on chat.
SUCCESS = {"champ": {"code": 0.5, "chat": 0.5}, "coder": {"code": 0.9, "chat": 0.3}}
N = 600


@pytest.fixture
def settings(tmp_path, sessions, monkeypatch) -> Settings:
    monkeypatch.setenv("FEEDLOOP_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("FEEDLOOP_DATABASE_URL", raising=False)
    monkeypatch.setenv("FEEDLOOP_LEARNERS__INITIAL_ARMS", '["champ", "coder"]')
    return Settings(data_dir=tmp_path, learners=LearnerSettings(initial_arms=["champ", "coder"]))


def logged(seed: int) -> list[AnnotatedExample]:
    """Decisions of a router that sent code requests to the coder with probability 0.7 and chat
    requests with 0.3, each with its propensity and the whole distribution logged."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(N):
        domain = ("code", "chat")[i % 2]
        p_coder = 0.7 if domain == "code" else 0.3
        adapter = "coder" if rng.random() < p_coder else "champ"
        reward = float(rng.random() < SUCCESS[adapter][domain])
        at = T0 + timedelta(seconds=i)
        out.append(AnnotatedExample(
            example_id=f"i-{i}", app_id="app", session_id=f"s-{i}", user="p", adapter=adapter,
            propensity=p_coder if adapter == "coder" else 1 - p_coder,
            probabilities={"coder": p_coder, "champ": 1 - p_coder}, cohort="a", domain=domain,
            context=Context(domain=domain), prompt=[{"role": "user", "content": "q"}], response="a",
            rewards={"explicit": reward}, feedback_kinds=["thumbs"], training_consent=True, occurred_at=at,
            closed_at=at, event_ids=[],
        ))  # fmt: skip
    return out


def test_whatif_prints_each_estimate_with_its_interval_and_the_logged_value(sessions, settings):
    seal(sessions, settings, EXAMPLES.name, logged(seed=1))
    result = CliRunner().invoke(main, ["whatif", "--pin", "coder"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == f"what if: pin coder; {N} logged decisions; 95% intervals"
    rows = {line.split()[0]: line for line in lines[2:]}
    assert list(rows) == ["IPS", "SNIPS", "DR", "logged"]
    for line in rows.values():
        value, lower, upper = (float(x.strip("[],")) for x in line.split()[1:])
        assert lower < value < upper

    as_json = json.loads(CliRunner().invoke(main, ["whatif", "--pin", "coder", "--json"]).stdout)
    truth = np.mean([SUCCESS["coder"][d] for d in ("code", "chat")])  # 0.6: what pinning it earns
    for name in ("IPS", "SNIPS", "DR"):
        e = as_json["estimates"][name]
        assert e["lower"] < truth < e["upper"], name
    # The logged router earned 0.7 * 0.9 + 0.3 * 0.5 on code, 0.3 * 0.3 + 0.7 * 0.5 on chat: 0.61.
    assert abs(as_json["estimates"]["logged"]["value"] - 0.61) < 0.06


def test_whatif_of_a_router_setting_and_its_errors(sessions, settings):
    seal(sessions, settings, EXAMPLES.name, logged(seed=2))
    # An operator's pin does not pin the candidate: it is the router with these settings.
    seal(sessions, settings, CONTROL.name, [AdapterPinned(event_id="pin-00000001", occurred_at=T0, source="ops",
                                                          adapter="champ")])  # fmt: skip
    result = CliRunner().invoke(main, ["whatif", "--floor", "0.5", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["candidate"] == "router floor=0.5, as it was at each request" and out["n"] == N
    assert set(out["estimates"]) == {"IPS", "SNIPS", "DR", "logged"}

    refused = CliRunner().invoke(main, ["whatif", "--pin", "coder", "--floor", "0.2"])
    assert refused.exit_code != 0 and "no exploration settings" in refused.output
    empty = CliRunner().invoke(main, ["whatif", "--since", "2030-01-01T00:00:00+00:00"])
    assert empty.exit_code != 0 and "0 logged decision(s)" in empty.output


def test_a_candidate_is_the_router_of_the_moment_with_its_own_settings():
    router = LinUCBRouter(["champ", "coder"], floor=0.1)
    for _ in range(30):
        router.learn_one("coder", {"domain": "code"}, 1.0)
    router.pin("champ")  # an operator's pin: the candidate router does not inherit it
    greedy = Candidate(alpha=0.0, floor=0.6).probabilities(router, {"domain": "code"})
    assert greedy == pytest.approx({"champ": 0.3, "coder": 0.7})
    assert (router.alpha, router.floor, router.pinned) == (1.0, 0.1, "champ"), "the replayed router is left as it was"
    assert Candidate(pin="coder").probabilities(router, {}) == {"coder": 1.0}
    assert Candidate(pin="later-v2").probabilities(router, {}) is None, "not live yet: pinning it was no option"
    assert Candidate().describe() == "router as logged, as it was at each request"
