"""What the demo says while the simulated users talk: one snapshot, written for where it goes.

On a terminal, a live status line beside rich's progress bar, shortened to the terminal's width.
Anywhere else (`make run > log.txt`, CI), a plain line every ``PLAIN_EVERY_S`` seconds, so a log
shows the run moving instead of 14 silent minutes. The plain lines also go to
``data_dir/logs/demo.log`` on a terminal, for `tail -f` from another one.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

PLAIN_EVERY_S = 15.0
DESCRIPTION = "simulated users"
BAR_WIDTH = 24


@dataclass(frozen=True)
class Snapshot:
    phase: str  # "before drift" / "after drift"
    turns: int
    total_turns: int
    events: int
    trained: int
    promoted: int
    rolled_back: int
    satisfaction: float | None  # of the last 100 answers
    elapsed_s: float


def _satisfied(snapshot: Snapshot) -> str:
    return "-" if snapshot.satisfaction is None else f"{snapshot.satisfaction:.0%}"


def plain_line(snapshot: Snapshot) -> str:
    """One self-contained line of plain text for a log."""
    minutes, seconds = divmod(int(snapshot.elapsed_s), 60)
    return (f"[{minutes:02d}:{seconds:02d}] {snapshot.phase}: turn {snapshot.turns}/{snapshot.total_turns}, "
            f"{snapshot.events} events | adapters {snapshot.trained} trained, {snapshot.promoted} promoted, "
            f"{snapshot.rolled_back} rolled back | satisfied {_satisfied(snapshot)} (last 100)")  # fmt: skip


def status_text(snapshot: Snapshot, width: int) -> str:
    """The terminal's status column: the longest form that fits ``width`` characters (the
    bar beside it shows turns and time already)."""
    s, satisfied = snapshot, _satisfied(snapshot)
    forms = (
        f"{s.phase} | adapters {s.trained} trained, {s.promoted} promoted, {s.rolled_back} rolled back | "
        f"satisfied {satisfied} | {s.events} events",
        f"{s.phase} | {s.trained} trained, {s.promoted} promoted, {s.rolled_back} rolled back | satisfied {satisfied}",
        f"{s.phase} | adapters {s.trained}/{s.promoted}/{s.rolled_back} | {satisfied}",
        f"{s.phase.split()[0]} | {s.trained}/{s.promoted}/{s.rolled_back} | {satisfied}",
    )
    return next((form for form in forms if len(form) <= width), forms[-1][: max(width, 0)])


class Every:
    """True from ``due()`` once per ``period_s`` of ``clock``, starting with the first call."""

    def __init__(self, period_s: float = PLAIN_EVERY_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.period_s, self.clock = period_s, clock
        self._next: float | None = None

    def due(self) -> bool:
        now = self.clock()
        if self._next is not None and now < self._next:
            return False
        self._next = now + self.period_s
        return True


@contextmanager
def progress_view(console: Console, total_turns: int, log_path: Path,
                  every: Every | None = None) -> Iterator[Callable[[Snapshot], None]]:  # fmt: skip
    """A ``show(snapshot)`` to call about once a second while the users talk."""
    every = every or Every()
    with open(log_path, "a") as log:

        def plain(snapshot: Snapshot) -> None:
            if every.due():
                line = plain_line(snapshot)
                log.write(line + "\n")
                log.flush()
                if not console.is_terminal:
                    console.out(line, highlight=False)  # no markup, no wrapping at a guessed width

        if not console.is_terminal:
            yield plain
            return
        columns = (TextColumn(f"[bold]{DESCRIPTION}"), BarColumn(bar_width=BAR_WIDTH), MofNCompleteColumn(),
                   TimeElapsedColumn(), TextColumn("{task.fields[status]}", markup=False))  # fmt: skip
        # What the other columns and the spaces between them take of the line.
        taken = len(DESCRIPTION) + BAR_WIDTH + 2 * len(str(total_turns)) + 1 + len("0:00:00") + 4
        with Progress(*columns, console=console) as progress:
            task = progress.add_task(DESCRIPTION, total=total_turns, status="")

            def show(snapshot: Snapshot) -> None:
                plain(snapshot)
                status = status_text(snapshot, console.width - taken - 1)
                progress.update(task, completed=snapshot.turns, status=status)

            yield show
