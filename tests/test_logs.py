"""Log lines: readable at a terminal, JSON anywhere else, unless FEEDLOOP_LOG_FORMAT says.

A process writing JSON lines to a pipe: tests/test_cli.py (a missing broker)."""

import io

import pytest

from app.logs import renders_console


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(("fmt", "terminal", "console"), [
    ("auto", True, True), ("auto", False, False), ("json", True, False), ("console", False, True)])  # fmt: skip
def test_the_format_follows_the_stream_unless_forced(fmt, terminal, console):
    assert renders_console(fmt, Terminal() if terminal else io.StringIO()) is console

