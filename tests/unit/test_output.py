"""``worker.output``: tables as Markdown lines, text unwrapped, off a terminal; rich on one."""

from __future__ import annotations

import io

import pytest
from rich.table import Table
from rich.text import Text

from worker.output import Output, markdown_table


def test_a_table_becomes_markdown_with_every_cell_whole() -> None:
    # Given a table with a title, a caption, a right-justified column, a cell of two lines, a cell
    # holding a pipe, and a cell far wider than a terminal
    table = Table(title="[bold]figures[/]", caption="what they mean")
    table.add_column("name")
    table.add_column("value", justify="right")
    wide = "w" * 300
    table.add_row(Text("a|b"), "1")
    table.add_row("two", "first\nsecond")
    table.add_row(wide, "3")
    # When it is rendered for a pipe
    lines = markdown_table(table).splitlines()
    # Then the title and caption are lines of their own, the rule marks the right-justified
    # column, a pipe is escaped, the second line of a cell has a row of its own, nothing is cut
    pad = " " * (300 - 4)
    assert lines == [
        "figures",
        f"| name{pad} |  value |",
        f"| {'-' * 300} | -----: |",
        f"| a\\|b{pad} |      1 |",
        f"| two{pad}  |  first |",
        f"| {' ' * 300} | second |",
        f"| {wide} |      3 |",
        "what they mean",
    ]


def test_off_a_terminal_text_is_not_wrapped_and_tables_are_markdown(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given stdout a pipe (a StringIO is no terminal) and COLUMNS saying 20
    monkeypatch.setenv("COLUMNS", "20")
    buffer = io.StringIO()
    monkeypatch.setattr("sys.stdout", buffer)
    out = Output()
    table = Table("k", "v")
    table.add_row("key", "v" * 100)
    # When a long line and a table are printed
    out.print("[bold]model[/] " + "x" * 200)
    out.print(table)
    # Then the line is whole, without markup, and the table is Markdown
    lines = buffer.getvalue().splitlines()
    assert lines[0] == "model " + "x" * 200
    assert lines[1:] == [f"| k   | {'v':<100} |", f"| --- | {'-' * 100} |", f"| key | {'v' * 100} |"]


def test_on_a_terminal_rich_draws_the_table(monkeypatch: pytest.MonkeyPatch) -> None:
    # Given stdout a terminal 40 columns wide
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setenv("COLUMNS", "40")
    monkeypatch.delenv("TTY_COMPATIBLE", raising=False)
    buffer = Tty()
    monkeypatch.setattr("sys.stdout", buffer)
    table = Table("k", "v")
    table.add_row("key", "value")
    # When a table is printed, then rich draws its box
    Output().print(table)
    assert "│ key │ value │" in buffer.getvalue()


def test_errors_stay_one_line_on_a_narrow_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    # Given stderr a terminal 20 columns wide
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setenv("COLUMNS", "20")
    buffer = Tty()
    monkeypatch.setattr("sys.stderr", buffer)
    # When the command line's error stream prints a long error, then it is one line
    Output(stderr=True, soft_wrap=True).print("itrain: " + "e" * 100, markup=False, highlight=False)
    assert buffer.getvalue() == "itrain: " + "e" * 100 + "\n"
