"""What the chapters display besides figures: results tables and listings of the package's
source. Each renders richly in the book and in Jupyter (an HTML table; a highlighted code block)
and as plain text in a terminal and for nbval, which compares ``text/plain`` and ``text/markdown``
exactly, so a chapter that lists package source fails CI until it is re-executed after the
source changes.

    >>> Table(["model", "error (%)"], [("r=1", 0.341), ("r=3", 0.25)], formats={"error (%)": ".2f"})
    model  error (%)
    -----  ---------
    r=1         0.34
    r=3         0.25
"""

from __future__ import annotations

import html
import inspect
import numbers
import re
import textwrap
from collections.abc import Iterable, Mapping, Sequence

__all__ = ["SourceListing", "Table", "source_listing"]

MISSING = "-"


class Table:
    """A table of results: ``columns`` names, ``rows`` of values (``None`` shows as ``-``).

    ``formats`` maps a column name to a format spec (``".2f"``, ``"+.1%"``, ``","``) used for the
    numbers in that column; other values print with ``str``. Numbers are right-aligned, text
    left-aligned. ``caption`` is shown above the HTML table and as the first line of the text form.
    """

    def __init__(
        self,
        columns: Sequence[str],
        rows: Iterable[Sequence[object]],
        *,
        formats: Mapping[str, str] | None = None,
        caption: str | None = None,
    ) -> None:
        self.columns = [str(c) for c in columns]
        self.rows = [list(row) for row in rows]
        for i, row in enumerate(self.rows):
            if len(row) != len(self.columns):
                raise ValueError(
                    f"row {i} has {len(row)} values but the table has {len(self.columns)} columns "
                    f"({', '.join(self.columns)}): give one value per column (None for an empty cell)"
                )
        unknown = set(formats or {}) - set(self.columns)
        if unknown:
            raise ValueError(f"formats name columns the table does not have: {sorted(unknown)}")
        self.formats = dict(formats or {})
        self.caption = caption

    def _cell(self, column: str, value: object) -> str:
        if value is None:
            return MISSING
        spec = self.formats.get(column)
        if spec is not None and isinstance(value, numbers.Number) and not isinstance(value, bool):
            return format(value, spec)
        return str(value)

    def _numeric(self, j: int) -> bool:
        """A column is right-aligned when every value in it is a number (or missing)."""
        values = [row[j] for row in self.rows if row[j] is not None]
        return bool(values) and all(isinstance(v, numbers.Number) and not isinstance(v, bool) for v in values)

    def cells(self) -> list[list[str]]:
        """The formatted cells, row by row (without the header)."""
        return [[self._cell(c, v) for c, v in zip(self.columns, row, strict=True)] for row in self.rows]

    def __repr__(self) -> str:
        cells = self.cells()
        widths = [max([len(c)] + [len(row[j]) for row in cells]) for j, c in enumerate(self.columns)]
        right = [self._numeric(j) for j in range(len(self.columns))]

        def line(values: Sequence[str]) -> str:
            parts = [v.rjust(w) if r else v.ljust(w) for v, w, r in zip(values, widths, right, strict=True)]
            return "  ".join(parts).rstrip()

        lines = [self.caption] if self.caption else []
        lines += [line(self.columns), line(["-" * w for w in widths])]
        lines += [line(row) for row in cells]
        return "\n".join(lines)

    __str__ = __repr__

    def _repr_html_(self) -> str:
        right = [self._numeric(j) for j in range(len(self.columns))]

        def cell(tag: str, text: str, j: int) -> str:
            style = ' style="text-align: right"' if right[j] else ""
            return f"<{tag}{style}>{html.escape(text)}</{tag}>"

        head = "".join(cell("th", c, j) for j, c in enumerate(self.columns))
        body = "".join(
            "<tr>" + "".join(cell("td", v, j) for j, v in enumerate(row)) + "</tr>" for row in self.cells()
        )
        caption = f"<caption>{html.escape(self.caption)}</caption>" if self.caption else ""
        return (
            '<div class="capsnet-table">'
            f"<table>{caption}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>"
        )


class SourceListing:
    """Python source shown as a code block (Markdown) in the book and as plain text elsewhere."""

    def __init__(self, code: str) -> None:
        self.code = code

    def __repr__(self) -> str:
        return self.code

    def _repr_markdown_(self) -> str:
        longest = max((len(run) for run in re.findall(r"`+", self.code)), default=0)
        fence = "`" * max(3, longest + 1)
        return f"{fence}python\n{self.code}\n{fence}"


def source_listing(obj: object, first: str | None = None, last: str | None = None) -> SourceListing:
    """The source of ``obj`` (a function, class or method; or a string of code) to display.

    With ``first``, only the lines from the first one containing ``first`` up to the next one
    containing ``last`` (just that line when ``last`` is None), dedented.
    """
    code = obj if isinstance(obj, str) else inspect.getsource(obj)
    lines = code.rstrip("\n").splitlines()
    if first is not None:
        start = next((i for i, line in enumerate(lines) if first in line), None)
        if start is None:
            raise ValueError(f"no line of the source contains {first!r}")
        stop = start
        if last is not None:
            stop = next((i for i in range(start, len(lines)) if last in lines[i]), None)
            if stop is None:
                raise ValueError(f"no line after {first!r} contains {last!r}")
        lines = lines[start : stop + 1]
    return SourceListing(textwrap.dedent("\n".join(lines)))
