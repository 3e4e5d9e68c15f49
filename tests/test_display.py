"""capsnet.display: tables and source listings, as the book shows them and as nbval compares them."""

from __future__ import annotations

import pytest

from capsnet.display import Table, source_listing


def test_text_form_aligns_numbers_right_and_text_left():
    table = Table(
        ["model", "error (%)", "runs"],
        [("r=1", 0.341, 3), ("r=3, recon", 0.25, None)],
        formats={"error (%)": ".2f"},
    )
    assert repr(table).splitlines() == [
        "model       error (%)  runs",
        "----------  ---------  ----",
        "r=1              0.34     3",
        "r=3, recon       0.25     -",
    ]
    assert str(table) == repr(table)


def test_caption_is_the_first_line_and_the_html_caption():
    table = Table(["a"], [(1,)], caption="Table: one number")
    assert repr(table).splitlines()[0] == "Table: one number"
    assert "<caption>Table: one number</caption>" in table._repr_html_()


def test_html_escapes_cells_and_right_aligns_numeric_columns():
    page = Table(["name", "value"], [("<b>&", 1.5)], formats={"value": "+.1f"})._repr_html_()
    assert "&lt;b&gt;&amp;" in page and "<b>&" not in page
    assert '<td style="text-align: right">+1.5</td>' in page
    assert "<td>&lt;b&gt;&amp;</td>" in page
    assert page.startswith('<div class="capsnet-table"><table>')


def test_mixed_and_boolean_columns_stay_left_aligned():
    table = Table(["flag", "mixed"], [(True, 1), (False, "n/a")])
    assert table._repr_html_().count("text-align: right") == 0
    assert repr(table).splitlines()[2] == "True   1"


def test_wrong_row_length_says_what_to_do():
    with pytest.raises(ValueError, match=r"row 1 has 1 values but the table has 2 columns .*None"):
        Table(["a", "b"], [(1, 2), (3,)])


def test_format_for_an_unknown_column_is_refused():
    with pytest.raises(ValueError, match="formats name columns the table does not have"):
        Table(["a"], [(1,)], formats={"b": ".2f"})


def helper():
    """A docstring."""
    x = 1  # first
    y = "``` fence"
    return x, y  # last


def test_source_listing_shows_the_whole_source_or_a_slice():
    whole = source_listing(helper)
    assert repr(whole).startswith("def helper():") and repr(whole).endswith("return x, y  # last")
    part = source_listing(helper, "# first", "return")
    assert repr(part) == 'x = 1  # first\ny = "``` fence"\nreturn x, y  # last'
    assert repr(source_listing(helper, "y =")) == 'y = "``` fence"'
    assert repr(source_listing("a = 1\n")) == "a = 1"


def test_source_listing_fence_is_longer_than_any_backticks_inside():
    markdown = source_listing(helper)._repr_markdown_()
    assert markdown.startswith("````python\n") and markdown.endswith("\n````")


def test_source_listing_says_which_marker_is_missing():
    with pytest.raises(ValueError, match="no line of the source contains 'nowhere'"):
        source_listing(helper, "nowhere")
    with pytest.raises(ValueError, match="no line after '# first' contains 'nowhere'"):
        source_listing(helper, "# first", "nowhere")
