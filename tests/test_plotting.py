"""capsnet.plotting: the book style and the kernel-free slider."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import pytest

from capsnet.plotting import BOOK_STYLE, frames_player, use_book_style


def test_use_book_style_sets_the_style_outside_ipython():
    use_book_style()
    assert matplotlib.rcParams["figure.facecolor"] == BOOK_STYLE["figure.facecolor"]


def test_frames_player_embeds_one_frame_per_value_and_closes_the_figure():
    fig, ax = plt.subplots(figsize=(2, 2))
    drawn = []

    def draw(value):
        ax.clear()
        ax.plot([0, 1], [0, value])
        drawn.append(value)

    page = frames_player(fig, draw, [0.0, 0.5, 1.0]).data
    assert set(drawn) == {0.0, 0.5, 1.0}
    assert page.count("data:image/png;base64") == 3
    assert 'type="range"' in page  # the slider readers move, without a kernel
    assert "http://" not in page and "https://" not in page, "the player must fetch nothing"
    assert "\u25b7" in page and '<i class="fa' not in page  # its buttons use plain symbols
    assert not plt.fignum_exists(fig.number)


def test_frames_player_needs_values():
    fig = plt.figure()
    with pytest.raises(ValueError, match="at least one value"):
        frames_player(fig, lambda v: None, [])
    plt.close(fig)
