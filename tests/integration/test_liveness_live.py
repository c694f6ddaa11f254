"""Every long-running process, started as `feedloop <command>`, shows up in `feedloop status`;
stopped (SIGTERM) or killed (SIGKILL), it shows as down within 15 s.

Real processes, broker and store; the swap controller gets a tiny base model of its own and
no vLLM to talk to (its heartbeat does not depend on the replicas it reconciles).
"""

import io
import json
import os
import signal
import time

from click.testing import CliRunner
from rich.console import Console

import migrations

from app.cli import main
from app.liveness import DOWN, UP
from app.overview import OverviewSource
from app.processes import Child, settings_env
from app.status import render_status
from demo.base_model import ToyChats, build_tiny_model
from tests.conftest import free_port, make_settings
from trainer.base_model import BaseModelConfig

COMMANDS = {"worker": ["worker"], "learner": ["learn"], "archiver": ["archive", "run"], "trainer": ["train"],
            "swap": ["swap"], "gateway": ["gateway"]}
KILLED = {"learner", "swap", "gateway"}  # SIGKILL: no chance to say goodbye; the others get SIGTERM
DOWN_WITHIN_S = 15.0


def states(source: OverviewSource) -> dict[str, tuple[str, str]]:
    return {p.process: (p.state, p.why) for p in source.read().processes}


def wait_states(source: OverviewSource, wanted, timeout_s: float) -> dict[str, tuple[str, str]]:
    deadline = time.monotonic() + timeout_s
    while not wanted(seen := states(source)) and time.monotonic() < deadline:
        time.sleep(0.25)
    return seen


def test_every_process_reports_itself_and_shows_down_soon_after_it_stops(tmp_path, own_broker):
    settings = make_settings(tmp_path, own_broker.port, log_format="json", vllm_urls=[f"http://127.0.0.1:{free_port()}"])
    build_tiny_model(settings.model_path, ToyChats(count=40), BaseModelConfig(train_steps=1, log_every=1000))
    migrations.upgrade(settings.store_url)  # the processes migrate too; the test reads before they do
    children = {name: Child(command, settings, tmp_path / f"{name}.log") for name, command in COMMANDS.items()}
    source = OverviewSource(settings)
    try:
        for child in children.values():
            child.start()
        up = wait_states(source, lambda seen: all(seen.get(n, ("",))[0] == UP for n in COMMANDS), timeout_s=240)
        assert {n: up.get(n, ("absent",))[0] for n in COMMANDS} == dict.fromkeys(COMMANDS, UP), \
            {n: children[n].log_tail(5) for n in COMMANDS if up.get(n, ("",))[0] != UP}

        env = settings_env(settings)
        assert CliRunner().invoke(main, ["status"], env=env).exit_code == 0
        console = Console(width=240, record=True, file=io.StringIO())
        render_status(source.read(), console)
        rows = {line.split("│")[1].strip(): line for line in console.export_text().splitlines()
                if line.count("│") > 6 and line.split("│")[1].strip() in COMMANDS}
        assert set(rows) == set(COMMANDS) and all(" up " in row for row in rows.values())
        assert f"feedloop.events.v1 {','.join(map(str, range(settings.topic_partitions)))}" in rows["worker"]

        for name, child in children.items():
            signalled = time.monotonic()
            if name in KILLED:
                os.killpg(child.process.pid, signal.SIGKILL)
                child.process.wait(10)
            else:
                assert child.stop() == 0, child.log_tail()
            seen = wait_states(source, lambda s, n=name: s[n][0] == DOWN, timeout_s=DOWN_WITHIN_S)
            took = time.monotonic() - signalled
            assert seen[name][0] == DOWN, f"{name} still {seen[name]} {took:.0f} s after its signal"
            why = seen[name][1]
            assert why.startswith("no heartbeat") if name in KILLED else why.startswith("stopped at"), why

        shown = json.loads(CliRunner().invoke(main, ["status", "--json"], env=env).output)
        assert {p["process"]: p["state"] for p in shown["processes"]} == dict.fromkeys(COMMANDS, DOWN)
        (worker,) = [p for p in shown["processes"] if p["process"] == "worker"]
        assert worker["detail"]["partitions"]["feedloop.events.v1"] == list(range(settings.topic_partitions))
        health = CliRunner().invoke(main, ["health", "worker"], env=env)
        assert health.exit_code == 1 and "stopped at" in health.output
    finally:
        for child in children.values():
            child.stop()
        source.close()
