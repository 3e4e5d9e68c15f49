"""Results tables for the chapters: an HTML table in the book and in Jupyter, aligned plain text
in a terminal and for nbval (which compares ``text/plain``).

    >>> Table(["model", "error (%)"], [("r=1", 0.341), ("r=3", 0.25)], formats={"error (%)": ".2f"})
    model  error (%)
    -----  ---------
    r=1         0.34
    r=3         0.25
"""

from __future__ import annotations

import html
import numbers
from collections.abc import Iterable, Mapping, Sequence

__all__ = ["Table"]

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
