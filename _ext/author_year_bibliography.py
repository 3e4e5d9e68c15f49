"""A Sphinx extension: label the bibliography's entries the way the text cites them.

The chapters cite author-year (``bibtex_reference_style: author_year``: "Gu and Tresp [2020]"), but
sphinxcontrib-bibtex's default ``alpha`` style labels the bibliography "[GT20]", so a reader who
follows a citation finds a label that matches nothing in the text. This registers a pybtex style,
``author_year``, whose labels read "Gu and Tresp, 2020" (one author: "Hinton, 2011"; three or more:
"Sabour et al., 2017"), sorted by author, year and title.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from pybtex.plugin import register_plugin
from pybtex.style.formatting.unsrt import Style as UnsrtStyle
from pybtex.style.labels import BaseLabelStyle


def _surnames(entry: Any) -> list[str]:
    people = entry.persons.get("author") or entry.persons.get("editor") or []
    return [" ".join(person.last_names).replace("{", "").replace("}", "") for person in people]


def author_year_label(entry: Any) -> str:
    """ "Surname, 2017", "Surname and Other, 2017" or "Surname et al., 2017"."""
    names = _surnames(entry)
    if not names:
        who = entry.fields.get("title", entry.key)
    elif len(names) == 1:
        who = names[0]
    elif len(names) == 2:
        who = f"{names[0]} and {names[1]}"
    else:
        who = f"{names[0]} et al."
    return f"{who}, {entry.fields.get('year', 'n.d.')}"


class AuthorYearLabelStyle(BaseLabelStyle):
    def format_labels(self, sorted_entries: Any) -> Iterator[str]:
        for entry in sorted_entries:
            yield author_year_label(entry)


class AuthorYearStyle(UnsrtStyle):
    default_label_style = AuthorYearLabelStyle
    default_sorting_style = "author_year_title"


def setup(app: Any) -> dict[str, Any]:
    register_plugin("pybtex.style.labels", "author_year", AuthorYearLabelStyle)
    register_plugin("pybtex.style.formatting", "author_year", AuthorYearStyle)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
