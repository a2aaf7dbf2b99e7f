"""The import's progress bar: drawn on a terminal, throttled, finished with a newline."""

from __future__ import annotations

import io

from server.cli.common import Progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_bar_shows_the_fraction_and_ends_the_line():
    screen = Terminal()
    progress = Progress("importing codes.csv", stream=screen)
    progress.update(0.5, "50,000 lines")
    progress.update(0.6, "60,000 lines")  # within 0.1 s of the last: not redrawn
    progress.update(1.0, "done", final=True)
    drawn = screen.getvalue()
    assert drawn.count("\r") == 2
    assert "[###############---------------]  50.0% 50,000 lines" in drawn
    assert "60,000" not in drawn
    assert drawn.endswith("100.0% done\n")


def test_nothing_is_drawn_when_stderr_is_not_a_terminal():
    screen = io.StringIO()
    Progress("importing", stream=screen).update(1.0, "done", final=True)
    assert screen.getvalue() == ""
