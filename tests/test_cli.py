"""The `feedloop` command line, run as a user runs it."""

import json

from click.testing import CliRunner

from app.cli import main


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
