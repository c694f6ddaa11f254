"""What the demo prints while it runs: plain lines off a terminal, a status that fits on one."""

import io

from rich.console import Console

from demo.progress import Every, Snapshot, plain_line, progress_view, status_text

SNAPSHOT = Snapshot(phase="after drift", turns=1412, total_turns=3000, events=5210, trained=4, promoted=2,
                    rolled_back=1, satisfaction=0.634, elapsed_s=427.9)  # fmt: skip


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_plain_line_says_phase_events_adapters_and_satisfaction():
    assert plain_line(SNAPSHOT) == ("[07:07] after drift: turn 1412/3000, 5210 events | adapters 4 trained, "
                                    "2 promoted, 1 rolled back | satisfied 63% (last 100)")  # fmt: skip


def test_a_plain_line_before_any_answer():
    empty = Snapshot("before drift", 0, 3000, 0, 0, 0, 0, None, 3.0)
    assert plain_line(empty).startswith("[00:03] before drift: turn 0/3000, 0 events")
    assert plain_line(empty).endswith("satisfied - (last 100)")


def test_the_status_fits_any_width_and_keeps_what_it_can():
    for width in range(0, 200):
        assert len(status_text(SNAPSHOT, width)) <= width
    assert status_text(SNAPSHOT, 200).startswith("after drift | adapters 4 trained, 2 promoted, 1 rolled back")
    assert status_text(SNAPSHOT, 40) == "after drift | adapters 4/2/1 | 63%"
    assert status_text(SNAPSHOT, 30) == "after | 4/2/1 | 63%"
    assert "rolled back" in status_text(SNAPSHOT, 80)


def test_every_is_due_once_per_period_of_its_clock():
    clock = FakeClock()
    every = Every(15.0, clock)
    seen = []
    for _ in range(61):  # the driver asks about once a second
        seen.append(every.due())
        clock.now += 1.0
    assert [i for i, due in enumerate(seen) if due] == [0, 15, 30, 45, 60]


def test_off_a_terminal_the_view_prints_plain_lines_at_its_cadence(tmp_path):
    out = io.StringIO()
    console = Console(file=out, force_terminal=False, width=40)
    clock = FakeClock()
    with progress_view(console, 3000, tmp_path / "demo.log", Every(15.0, clock)) as show:
        for _ in range(31):
            show(SNAPSHOT)
            clock.now += 1.0
    lines = out.getvalue().splitlines()
    assert lines == [plain_line(SNAPSHOT)] * 3  # whole lines, not wrapped at the console's 40 columns
    assert (tmp_path / "demo.log").read_text().splitlines() == lines


def test_on_a_terminal_the_plain_lines_go_to_the_log_only(tmp_path):
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=100)
    with progress_view(console, 3000, tmp_path / "demo.log", Every(15.0, FakeClock())) as show:
        show(SNAPSHOT)
    assert plain_line(SNAPSHOT) not in out.getvalue()
    assert "after drift |" in out.getvalue()
    assert (tmp_path / "demo.log").read_text() == plain_line(SNAPSHOT) + "\n"


def test_the_driver_snapshots_the_registry_and_the_traffic():
    from types import SimpleNamespace

    from demo.driver import Served, Traffic, _snapshot
    from streams.contract import AdapterState

    traffic = Traffic(sent_events=9)
    for index in (0, 1, 1, 2):  # a regenerated turn is served twice
        traffic.served.append(Served(index, "c", 0, "base", "a", True, 0.0))
        traffic.recent.append(index != 2)
    rows = [SimpleNamespace(state=state) for state in (AdapterState.CHAMPION, AdapterState.RETIRED,
                                                       AdapterState.ROLLED_BACK, AdapterState.READY)]  # fmt: skip
    snapshot = _snapshot(rows, traffic, SimpleNamespace(shift_index=4), 10, 12.0)
    assert snapshot == Snapshot("before drift", 3, 10, 9, 4, 2, 1, 0.75, 12.0)
