"""The `feedloop` command line, run as a user runs it."""

import json
import os
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from app.cli import main
from tests.conftest import free_port


def test_db_commands_walk_the_migrations(tmp_path, monkeypatch):
    monkeypatch.setenv("FEEDLOOP_DATABASE_URL", f"sqlite:///{tmp_path / 'cli.db'}")
    runner = CliRunner()
    assert "base" in runner.invoke(main, ["db", "current"]).stdout
    result = runner.invoke(main, ["db", "upgrade"])
    assert result.exit_code == 0 and "revision 0003" in result.stdout
    assert runner.invoke(main, ["db", "current"]).stdout.strip() == "0003"
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


def test_demo_runs_end_to_end_and_reports(tmp_path):
    """What `make run` runs, with a few events, as a separate process on free ports: broker,
    store, archive, gateway and the pipeline worker."""
    env = {
        **os.environ,
        "FEEDLOOP_DATA_DIR": str(tmp_path / "data"),
        "FEEDLOOP_EMBEDDED_BROKER_PORT": str(free_port()),
        "FEEDLOOP_GATEWAY_PORT": str(free_port()),
        "FEEDLOOP_LOG_LEVEL": "warning",
    }
    done = subprocess.run(
        [sys.executable, "-m", "app.cli", "demo", "--events", "60"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=180,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = done.stderr
    assert "events lost" in report and "archive verified" in report
    def row(name: str) -> str:
        return next(line for line in report.splitlines() if name in line).split("│")[2].strip()

    assert row("events lost") == "0"
    assert row("annotated examples") == "60"  # the pipeline worker ran and closed every window
    assert int(row("batches written").split()[0]) >= 1
    assert any(Path(tmp_path / "data" / "archive").rglob("*.jsonl.gz"))
