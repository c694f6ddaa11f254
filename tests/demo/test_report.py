"""The demo's report: statistics against known numbers, the JSON's keys, targets, files and plots."""

import dataclasses
import doctest
import json
from datetime import datetime, timezone

import pytest
from rich.console import Console

import demo.report
from demo.population import AFTER_DRIFT, BEFORE_DRIFT, Population, PopulationConfig
from demo.report import (
    PLOT_FILES,
    ABPoint,
    Decision,
    DemoReport,
    LabelSavings,
    RewardPoint,
    Series,
    WeightPoint,
    drift_detect_delay,
    label_savings,
    recovery_delay,
    loaded_so_far,
    regret_ratio,
    routing_regret,
    wilson_interval,
    win_rate,
    write_report,
)
from demo.synthetic_chats import CONCISE, DETAILED

REQUIRED_KEYS = [
    "events_sent", "events_archived", "events_lost", "dead_lettered", "pii_canaries_seeded", "pii_canaries_leaked",
    "win_rate_live_vs_static", "win_rate_ci95", "regret_ratio_vs_uniform", "drift_detect_delay_events",
    "cohort_win_rates", "rare_skill_accuracy_start", "rare_skill_accuracy_end", "adapters_trained",
    "adapters_promoted", "adapters_rolled_back", "hot_swap_p50_ms", "wall_seconds",
]  # fmt: skip
EXTRA_KEYS = ["regret_ratio_live_arms", "recovery_events", "loss_weights_before_shift", "loss_weights_end",
              "review_labels", "review_label_error_rate_active", "review_label_error_rate_random",
              "random_labels_to_match"]  # measured beside the keys, without a target
TARGETS = ["win_rate", "regret_ratio", "drift_detected", "minority_win_rate", "rare_skill_kept", "zero_events_lost",
           "zero_pii_leaked"]  # fmt: skip
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

GOOD = DemoReport(
    events_sent=12_000, events_archived=12_000, events_lost=0, dead_lettered=4, pii_canaries_seeded=190,
    pii_canaries_leaked=0, win_rate_live_vs_static=0.72, win_rate_ci95=(0.68, 0.76), regret_ratio_vs_uniform=0.31,
    drift_detect_delay_events=85, cohort_win_rates={"a": 0.72, "b": 0.71, "minority": 0.70},
    rare_skill_accuracy_start=0.70, rare_skill_accuracy_end=0.68, adapters_trained=6, adapters_promoted=3,
    adapters_rolled_back=1, hot_swap_p50_ms=140.0, wall_seconds=512.3,
)  # fmt: skip


def test_docstring_examples_run():
    result = doctest.testmod(demo.report)
    assert result.attempted > 0 and result.failed == 0


# --- statistics ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("wins", "n", "expected"),
    [
        (7, 10, (0.3968, 0.8922)),  # Wilson (1927); Newcombe (1998), table I
        (0, 10, (0.0, 0.2775)),
        (10, 10, (0.7225, 1.0)),
        (50, 100, (0.4038, 0.5962)),
        (81, 263, (0.2553, 0.3662)),  # Newcombe (1998): 81/263
        (0, 0, (0.0, 1.0)),
    ],
)
def test_wilson_interval_matches_known_values(wins, n, expected):
    assert wilson_interval(wins, n) == pytest.approx(expected, abs=1e-4)


def test_wilson_interval_narrows_with_n_and_widens_with_z():
    def width(interval):
        return interval[1] - interval[0]

    assert width(wilson_interval(70, 100)) < width(wilson_interval(7, 10))
    low_99, high_99 = wilson_interval(7, 10, z=2.576)
    assert low_99 < 0.3968 and high_99 > 0.8922
    with pytest.raises(ValueError, match=r"wins 11 outside \[0, 10\]"):
        wilson_interval(11, 10)


def test_win_rate_counts_ties_half_and_rejects_bad_judgements():
    rate, (low, high) = win_rate([1] * 70 + [0.5] * 20 + [0] * 10)
    assert rate == 0.8 and (low, high) == wilson_interval(80, 100)
    assert win_rate([0.99, 0.01]) == (0.5, wilson_interval(1.0, 2))
    outside = r"judgements must lie in \[0, 1\]"
    for bad, message in (([], "no judgements"), ([1.2], outside), ([-0.1], outside)):
        with pytest.raises(ValueError, match=message):
            win_rate(bad)


def test_routing_regret_against_the_best_live_arm_and_uniform_routing():
    reward = {("base", 0): 0.5, ("good", 0): 1.0, ("base", 1): 0.5, ("good", 1): 0.0}
    decisions = [
        Decision(0, "base", "a", 0, ("base",)),  # no choice: no regret for anyone
        Decision(1, "good", "a", 0, ("base", "good")),  # router right: 0; uniform 0.25
        Decision(2, "base", "a", 0, ("base", "good")),  # router wrong: 0.5; uniform 0.25
        Decision(3, "good", "a", 1, ("base", "good")),  # after the shift "good" is bad: 0.5; uniform 0.25
    ]
    router, uniform = routing_regret(decisions, lambda arm, cohort, phase: reward[arm, phase])
    assert (router, uniform) == pytest.approx((1.0, 0.75))
    assert regret_ratio(router, uniform) == pytest.approx(4 / 3)
    assert regret_ratio(0.0, 0.0) is None


def test_uniform_routing_keeps_every_arm_loaded_so_far_so_retiring_a_bad_one_counts():
    reward = {"base": 0.5, "good": 1.0}
    live = [
        Decision(0, "base", "a", 0, ("base", "good")),  # a test: router wrong, 0.5; uniform 0.25
        Decision(1, "good", "a", 0, ("good",)),  # promoted, "base" retired
        Decision(2, "good", "a", 0, ("good",)),
    ]
    decisions = loaded_so_far(live)
    assert [d.arms for d in decisions] == [("base", "good")] * 3 and [d.arm for d in decisions] == ["base", "good", "good"]
    # Within the live arms the router did worse than uniform; against uniform over every
    # adapter it had, retiring "base" is what the learning bought.
    assert regret_ratio(*routing_regret(live, lambda arm, c, p: reward[arm])) == pytest.approx(2.0)
    assert regret_ratio(*routing_regret(decisions, lambda arm, c, p: reward[arm])) == pytest.approx(0.5 / 0.75)


def test_regret_with_the_populations_expected_rewards():
    population = Population(PopulationConfig(seed=2, interactions=400, drift_fraction=0.25))
    profiles = {"base": {CONCISE: 0.5, DETAILED: 0.5}, "concise": {CONCISE: 0.95, DETAILED: 0.05},
                "detailed": {CONCISE: 0.05, DETAILED: 0.95}}  # fmt: skip

    def reward_of(arm, cohort, phase):
        return population.profile_reward(cohort, phase, profiles[arm])

    arms = tuple(profiles)
    turns = list(population.turns())
    # An oracle router (concise, then detailed after the shift) against one stuck on "concise".
    oracle = [
        Decision(t.index, "concise" if t.phase == BEFORE_DRIFT else "detailed", t.cohort, t.phase, arms) for t in turns
    ]
    stuck = [Decision(t.index, "concise", t.cohort, t.phase, arms) for t in turns]
    router, uniform = routing_regret(oracle, reward_of)
    assert router == 0 and uniform > 0
    # Stuck: 0.9 regret on each of the 300 turns after the shift; uniform: 0.45 on all 400.
    assert regret_ratio(*routing_regret(stuck, reward_of)) == pytest.approx(270 / 180)
    assert {t.phase for t in turns} == {BEFORE_DRIFT, AFTER_DRIFT}


def test_recovery_delay_waits_for_a_whole_window_back_at_the_old_level():
    before = [(i, 1.0 if i % 5 else 0.0) for i in range(300)]  # level 0.8: the goal is 0.72
    dip = [(300 + i, 0.0) for i in range(200)]
    back = [(500 + i, 1.0 if i % 4 else 0.0) for i in range(300)]  # 0.75 >= 0.72, once the window is past the dip
    delay = recovery_delay(300, before + dip + back, window=100)
    assert delay is not None and 290 <= delay <= 300  # about a window after the dip ends (200)
    assert recovery_delay(300, before + dip, window=100) is None  # never back
    assert recovery_delay(300, before + dip[:50], window=100) is None  # too little served after the shift
    assert recovery_delay(0, dip, window=100) is None  # nothing before the shift to come back to
    # One lucky answer is not a recovery: a window of ones right after the shift is.
    assert recovery_delay(300, before + [(300 + i, 1.0) for i in range(100)], window=100) == 99


def test_drift_detect_delay_ignores_alarms_before_the_shift():
    assert drift_detect_delay(1000, [400, 1100, 1030]) == 30
    assert drift_detect_delay(1000, [1000]) == 0
    assert drift_detect_delay(1000, [400]) is None
    assert drift_detect_delay(1000, []) is None


# --- the report ------------------------------------------------------------------------------


def test_report_json_has_the_required_keys_then_ours_and_the_targets():
    data = GOOD.to_json()
    assert list(data) == [*REQUIRED_KEYS, *EXTRA_KEYS, "targets"]
    assert [f.name for f in dataclasses.fields(DemoReport)] == REQUIRED_KEYS + EXTRA_KEYS
    assert list(data["targets"]) == TARGETS
    assert data["win_rate_ci95"] == [0.68, 0.76] and data["cohort_win_rates"]["minority"] == 0.70
    json.dumps(data)  # serializable as it is


def test_a_good_run_meets_every_target():
    assert GOOD.targets() == dict.fromkeys(TARGETS, True)


@pytest.mark.parametrize(
    ("change", "missed"),
    [
        ({"win_rate_live_vs_static": 0.69}, "win_rate"),
        ({"win_rate_ci95": (0.49, 0.9)}, "win_rate"),
        ({"win_rate_live_vs_static": None, "win_rate_ci95": None}, "win_rate"),
        ({"regret_ratio_vs_uniform": 0.51}, "regret_ratio"),
        ({"regret_ratio_vs_uniform": None}, "regret_ratio"),
        ({"drift_detect_delay_events": None}, "drift_detected"),
        ({"cohort_win_rates": {"a": 0.80, "b": 0.70, "minority": 0.71}}, "minority_win_rate"),
        ({"cohort_win_rates": {"a": 0.80}}, "minority_win_rate"),
        ({"rare_skill_accuracy_end": 0.6799}, "rare_skill_kept"),
        ({"rare_skill_accuracy_start": None}, "rare_skill_kept"),
        ({"events_lost": 1}, "zero_events_lost"),
        ({"pii_canaries_leaked": 1}, "zero_pii_leaked"),
        ({"pii_canaries_seeded": 0}, "zero_pii_leaked"),
    ],
)
def test_each_target_fails_on_its_own_measure(change, missed):
    targets = dataclasses.replace(GOOD, **change).targets()
    assert [name for name, met in targets.items() if not met] == [missed]


def test_the_minority_is_compared_with_every_other_cohort():
    report = dataclasses.replace(GOOD, cohort_win_rates={"a": 0.70, "b": 0.80, "small": 0.71})
    assert report.targets(minority="small")["minority_win_rate"] is False  # 0.71 < 0.9 x 0.80
    assert dataclasses.replace(GOOD, cohort_win_rates={"a": 0.70, "small": 0.64}).targets("small")["minority_win_rate"]


# --- files and plots -----------------------------------------------------------------------


def sample_series() -> Series:
    series = Series(shift_index=200, alarms=[230, 260])
    for i in range(400):
        arm = ("base", "adapter-1")[i % 2] if i < 300 else "adapter-2"
        live = ("base", "adapter-1") if i < 300 else ("base", "adapter-1", "adapter-2")
        series.decisions.append(Decision(i, arm, "a", int(i >= 200), live))
        series.rewards.append(RewardPoint(i, arm, float((i % 3 == 0) != (arm == "adapter-1" and i >= 200))))
        judge = 0.05 if i < 200 else 0.05 + (i - 200) / 1000  # trusted once it agrees, after the shift
        series.weights.append(WeightPoint(i, {"explicit": 0.7 - judge, "implicit": 0.25, "self_eval": judge}))
        if i >= 50:
            bound = 5 / (i - 40)
            series.ab_bounds.append(ABPoint(i, "adapter-1", 0.2, 0.2 - bound, 0.2 + bound))
    series.ab_bounds.insert(0, ABPoint(10, "adapter-1", 0.0, float("-inf"), float("inf")))  # before min samples
    return series


def test_write_report_writes_json_plots_and_a_latest_copy(tmp_path):
    console = Console(record=True, width=120)
    now = datetime(2026, 11, 21, 10, 30, 5, tzinfo=timezone.utc)
    run = write_report(GOOD, tmp_path / "runs", sample_series(), console=console, now=now)

    assert run == tmp_path / "runs" / "20261121T103005Z"
    assert json.loads((run / "report.json").read_text()) == json.loads(json.dumps(GOOD.to_json()))
    for name in PLOT_FILES:
        data = (run / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000, name
    latest = tmp_path / "runs" / "latest"
    assert latest.is_dir() and not latest.is_symlink()
    assert sorted(p.name for p in latest.iterdir()) == sorted(["report.json", *PLOT_FILES])
    assert (latest / "report.json").read_bytes() == (run / "report.json").read_bytes()
    text = console.export_text()
    assert "feedloop end-to-end demo" in text and "win_rate_live_vs_static" in text and "not met" not in text


def test_a_second_run_gets_its_own_directory_and_becomes_latest(tmp_path):
    now = datetime(2026, 11, 21, 10, 30, 5, tzinfo=timezone.utc)
    first = write_report(GOOD, tmp_path, sample_series(), now=now)
    worse = dataclasses.replace(GOOD, events_lost=3)
    second = write_report(worse, tmp_path, Series(), now=now)
    assert first != second and second.name == "20261121T103005Z-2"
    assert json.loads((first / "report.json").read_text())["events_lost"] == 0
    assert json.loads((tmp_path / "latest" / "report.json").read_text())["events_lost"] == 3
    assert not any(p.name.startswith(".latest") for p in tmp_path.iterdir())


def test_latest_replaces_an_old_symlink(tmp_path):
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "latest").symlink_to(tmp_path / "elsewhere")
    run = write_report(GOOD, tmp_path, Series(), now=datetime(2026, 1, 1, tzinfo=timezone.utc))
    assert not (tmp_path / "latest").is_symlink()
    assert (tmp_path / "latest" / "report.json").read_bytes() == (run / "report.json").read_bytes()
    assert (tmp_path / "elsewhere").is_dir()  # the link's target is left alone


def test_plots_of_an_empty_series_are_still_written(tmp_path):
    run = write_report(GOOD, tmp_path, Series(), now=datetime(2026, 1, 1, tzinfo=timezone.utc))
    for name in PLOT_FILES:
        assert (run / name).read_bytes().startswith(PNG_SIGNATURE)


def test_the_table_marks_missed_targets():
    console = Console(record=True, width=120)
    console.print(demo.report.report_table(dataclasses.replace(GOOD, pii_canaries_leaked=2)))
    line = next(line for line in console.export_text().splitlines() if "pii_canaries_leaked" in line)
    assert "not met" in line


def test_label_savings_counts_each_label_once_and_only_of_the_pool():
    wrong = {f"e{i}": i % 10 == 0 for i in range(100)}  # one loop label in ten is wrong
    picked = ["e0", "e10", "e20", "e1", "e0", "elsewhere"]  # a repeat, and an id outside the pool
    savings = label_savings(wrong, picked)
    assert (savings.labels, savings.error_rate_active, savings.error_rate_random) == (4, 0.75, 0.1)
    assert savings.random_labels_to_match == 30  # 4 x 0.75 / 0.1
    assert label_savings(wrong, []) == LabelSavings(0, None, None, None)
    assert label_savings({"e": False}, ["e"]).random_labels_to_match is None  # nothing to fix at all
