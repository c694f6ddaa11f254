"""The `feedloop` command line, run as a user runs it."""

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import migrations
from app.cli import main


def test_db_commands_walk_the_migrations(tmp_path, monkeypatch):
    monkeypatch.setenv("FEEDLOOP_DATABASE_URL", f"sqlite:///{tmp_path / 'cli.db'}")
    runner = CliRunner()
    assert "base" in runner.invoke(main, ["db", "current"]).stdout
    head = sorted(p.name.split("_")[0] for p in (Path(migrations.__file__).parent / "versions").glob("[0-9]*.py"))[-1]
    result = runner.invoke(main, ["db", "upgrade"])
    assert result.exit_code == 0 and f"revision {head}" in result.stdout
    assert runner.invoke(main, ["db", "current"]).stdout.strip() == head
    result = runner.invoke(main, ["db", "downgrade", "base"])
    assert result.exit_code == 0 and "base" in result.stdout


def test_schema_export_writes_valid_json_schemas(tmp_path):
    result = CliRunner().invoke(main, ["schema", "export", str(tmp_path)])
    assert result.exit_code == 0
    files = sorted(p.name for p in tmp_path.iterdir())
    assert "interaction.json" in files and "dead_letter.json" in files
    assert json.loads((tmp_path / "feedback.json").read_text())["properties"]["kind"]


def test_invalid_configuration_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("FEEDLOOP_BROKER", "nonsense")
    result = CliRunner().invoke(main, ["db", "current"])
    assert result.exit_code != 0
    assert "invalid configuration" in result.output and "kafka://host:port" in result.output


@pytest.mark.parametrize("private", [True, False])
def test_a_process_keeps_the_data_dir_and_its_files_private(tmp_path, private):
    data = tmp_path / "data"
    data.mkdir(mode=0o755)
    env = {**os.environ, "FEEDLOOP_DATA_DIR": str(data), "FEEDLOOP_PRIVATE_FILES": str(private).lower()}
    env.pop("FEEDLOOP_DATABASE_URL", None)
    subprocess.run([sys.executable, "-m", "app.cli", "db", "upgrade"], env=env, check=True, capture_output=True,
                   umask=0o022)  # fmt: skip
    modes = (stat.S_IMODE(data.stat().st_mode), stat.S_IMODE((data / "feedloop.db").stat().st_mode))
    assert modes == ((0o700, 0o600) if private else (0o755, 0o644))


def test_a_process_without_its_broker_names_the_command_that_starts_one(tmp_path):
    from tests.conftest import free_port

    env = {**os.environ, "FEEDLOOP_DATA_DIR": str(tmp_path / "data"), "FEEDLOOP_EMBEDDED_BROKER_PORT": str(free_port()),
           "FEEDLOOP_GATEWAY_PORT": str(free_port()), "FEEDLOOP_LOG_FORMAT": "json"}  # fmt: skip
    env.pop("FEEDLOOP_DATABASE_URL", None)
    env.pop("FEEDLOOP_BROKER", None)
    done = subprocess.run([sys.executable, "-m", "app.cli", "gateway"], env=env, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    (line,) = [json.loads(line) for line in done.stderr.splitlines() if '"broker.unreachable"' in line]
    assert line["level"] == "error" and "`feedloop broker`" in line["detail"]


def test_erase_names_the_adapters_to_retrain_and_again_answers_the_same_announcing_once(tmp_path, monkeypatch,
                                                                                       own_broker):  # fmt: skip
    from streams.pseudonyms import KeyStore, Pseudonymizer, user_identity
    from streams.store import Erasure, make_engine, make_sessionmaker
    from tests.trainer.test_erasure import adapter, batch, sft

    monkeypatch.setenv("FEEDLOOP_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("FEEDLOOP_BROKER", "embedded")
    monkeypatch.setenv("FEEDLOOP_EMBEDDED_BROKER_PORT", "1")  # nothing listens: the announcement fails
    migrations.upgrade(f"sqlite:///{tmp_path / 'feedloop.db'}")
    sessions = make_sessionmaker(make_engine(f"sqlite:///{tmp_path / 'feedloop.db'}"))
    gone = Pseudonymizer(KeyStore.in_directory(tmp_path / "keys")).pseudonym(user_identity("app-a", "ben"))
    adapter(sessions, "adapter-1")
    batch(sessions, tmp_path, "batch-1", {gone: [sft("g1", "ben")]}, status="trained", adapter="adapter-1")

    runner = CliRunner()
    first = runner.invoke(main, ["erase", "ben", "--app", "app-a"])
    assert first.exit_code == 0, first.output
    assert "erased at" in first.stdout and "to retrain: adapter-1" in first.stdout
    assert "not announced" in first.stderr and "again" in first.stderr, "what to do next"
    monkeypatch.setenv("FEEDLOOP_EMBEDDED_BROKER_PORT", str(own_broker.port))
    for _ in range(2):
        again = runner.invoke(main, ["erase", "ben", "--app", "app-a"])
        assert again.exit_code == 0 and "not announced" not in again.stderr, again.output
        assert again.stdout == first.stdout.replace("'s user erased at", "'s user was erased at")
    with sessions() as session:
        assert session.get(Erasure, gone).announced, "the repeat announced it"
