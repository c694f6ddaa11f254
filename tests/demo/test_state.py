"""Each `feedloop demo` starts from nothing in its own state directory; `--resume` continues the last."""

import doctest
import os
import time

import demo.driver
from app.settings import Settings
from demo.driver import demo_settings


def test_each_run_has_its_own_state_and_shares_the_base_model(tmp_path, monkeypatch):
    for name in [n for n in os.environ if n.startswith("FEEDLOOP_")]:
        monkeypatch.delenv(name)
    settings = Settings(data_dir=tmp_path)
    first = demo_settings(settings)
    first.data_dir.mkdir(parents=True)
    time.sleep(0.01)  # the second run's directory is newer
    second = demo_settings(settings)
    second.data_dir.mkdir(parents=True)

    assert first.data_dir != second.data_dir
    assert {first.data_dir.parent, second.data_dir.parent} == {tmp_path / "demo"}
    # Everything a run writes follows its data directory ...
    for run in (first, second):
        assert run.store_url.endswith(str(run.data_dir / "feedloop.db"))
        assert run.archive_dir.parent == run.keys_path.parent == run.batches_dir.parent == run.data_dir
    # ... except the base model, built once for every run.
    assert first.model_path == second.model_path == tmp_path / "models" / "demo-base"
    assert demo_settings(settings, resume=True).data_dir == second.data_dir


def test_resume_with_no_earlier_run_starts_one(tmp_path, monkeypatch):
    monkeypatch.delenv("FEEDLOOP_DATA_DIR", raising=False)
    resumed = demo_settings(Settings(data_dir=tmp_path), resume=True)
    assert resumed.data_dir.parent == tmp_path / "demo" and not resumed.data_dir.exists()


def test_the_state_example_runs():
    runner = doctest.DocTestRunner()
    for test in doctest.DocTestFinder().find(demo.driver.demo_state, "demo_state", globs=vars(demo.driver)):
        runner.run(test)
    assert runner.tries > 0 and runner.failures == 0
