"""What ``itrain`` prints: rich for a terminal, whole lines for a file or a pipe.

On a terminal, commands print as rich renders them (tables with boxes, colours, progress bars),
fitted to the terminal's width. Anywhere else (``itrain bench > bench.txt``, ``| tee``, a CI log,
a subprocess), rich would fit them to 80 columns, folding long lines and cutting table cells
(``scen…``), and a CI log or a script would read values cut in half. There:

* text is printed as it is, never wrapped, without colours or terminal codes;
* a table is printed as a Markdown (GitHub) pipe table, every cell whole, columns padded so the
  lines read as a table in a log, and paste into a README as they are: its title on a line
  before, its caption on a line after. A cell of several lines (``itrain stats``'s ``eval``)
  continues on rows of its own with the other cells empty.

The choice is made per stream (stdout and stderr apart) when a command prints, by whether that
stream is a terminal (``isatty``); the terminal's width or ``COLUMNS`` play no part off a terminal.
"""

from __future__ import annotations

import sys
from typing import IO, Any

from rich.cells import cell_len
from rich.console import Console, RenderableType
from rich.errors import MarkupError
from rich.table import Table
from rich.text import Text

__all__ = ["UNBOUNDED_WIDTH", "Output", "make_console", "markdown_table"]

#: The width a non-terminal console renders at: wider than any line we print, so nothing that
#: rich lays out (a progress bar's columns) is folded.
UNBOUNDED_WIDTH = 100_000


def make_console(file: IO[str], *, terminal: bool, soft_wrap: bool = False) -> Console:
    """A console writing to ``file``: rich's defaults for a terminal (``soft_wrap``: lines left
    to the terminal to fold, never broken by rich), else unwrapped plain text."""
    if terminal:
        return Console(file=file, soft_wrap=soft_wrap)
    return Console(
        file=file,
        width=UNBOUNDED_WIDTH,
        soft_wrap=True,  # a line longer than the width stays one line
        no_color=True,
        color_system=None,
        highlight=False,
        emoji=False,
        force_terminal=False,
        force_jupyter=False,
    )


class Output:
    """One output stream of the command line (stdout, or stderr with ``stderr=True``; with
    ``soft_wrap=True`` rich does not break its lines on a terminal either: one-line errors).

    Looks at the stream each time it prints (tests and callers may swap ``sys.stdout``) and keeps
    one console per stream object.
    """

    def __init__(self, *, stderr: bool = False, soft_wrap: bool = False) -> None:
        self._stderr = stderr
        self._soft_wrap = soft_wrap
        self._made: tuple[IO[str], bool, Console] | None = None

    @property
    def file(self) -> IO[str]:
        return sys.stderr if self._stderr else sys.stdout

    @property
    def is_terminal(self) -> bool:
        try:
            return bool(self.file.isatty())
        except (AttributeError, ValueError):  # no isatty, or closed: not a terminal
            return False

    @property
    def console(self) -> Console:
        """The console for the stream as it is now (for rich's progress bars)."""
        file, terminal = self.file, self.is_terminal
        if self._made is None or self._made[0] is not file or self._made[1] != terminal:
            self._made = (file, terminal, make_console(file, terminal=terminal, soft_wrap=self._soft_wrap))
        return self._made[2]

    def print(self, *objects: Any, **kwargs: Any) -> None:
        """``Console.print``; off a terminal, tables come out as Markdown lines."""
        console = self.console
        if self.is_terminal or not any(isinstance(o, Table) for o in objects):
            console.print(*objects, **kwargs)
            return
        for obj in objects:
            if isinstance(obj, Table):
                console.print(markdown_table(obj), markup=False, highlight=False, soft_wrap=True)
            else:
                console.print(obj, **kwargs)


def markdown_table(table: Table) -> str:
    """``table`` as a Markdown pipe table (title and caption as lines of their own), no cell cut."""
    columns = table.columns
    cells = [[_lines(cell) for cell in column.cells] for column in columns]
    rows: list[list[str]] = []
    for r in range(table.row_count):
        parts = [column[r] if r < len(column) else [""] for column in cells]
        for k in range(max(len(p) for p in parts)):
            rows.append([p[k] if k < len(p) else "" for p in parts])
    # Markdown needs a header row: a table shown without one (``itrain stats``) still names its
    # columns.
    header = [_plain(column.header) for column in columns]
    widths = [max([3, cell_len(header[c]), *(cell_len(row[c]) for row in rows)]) for c in range(len(columns))]
    right = [column.justify == "right" for column in columns]

    def line(values: list[str]) -> str:
        padded = []
        for value, width, to_right in zip(values, widths, right, strict=True):
            pad = " " * (width - cell_len(value))  # cells, not characters: wide glyphs count 2
            padded.append(pad + value if to_right else value + pad)
        return "| " + " | ".join(padded) + " |"

    rule = ["-" * (w - 1) + ":" if r else "-" * w for w, r in zip(widths, right, strict=True)]
    out = []
    if table.title:
        out.append(_plain(table.title))
    out += [line(header), line(rule)]
    out += [line(row) for row in rows]
    if table.caption:
        out.append(_plain(table.caption))
    return "\n".join(out)


def _plain(value: RenderableType | None) -> str:
    """The text of a cell, title or header: markup read as rich would, escapes kept."""
    if value is None:
        return ""
    if isinstance(value, Text):
        return value.plain
    if isinstance(value, str):
        try:
            return Text.from_markup(value).plain
        except MarkupError:
            return value
    return str(value)


def _lines(cell: RenderableType) -> list[str]:
    # A pipe inside a cell would end it; Markdown escapes it with a backslash.
    return [part.replace("|", "\\|") for part in (_plain(cell).splitlines() or [""])]
