"""The book's figures: a shared matplotlib style (opaque white figures that read in light and
dark themes, drawn at twice the pixel density so they stay sharp on phones) and a slider that
works without a kernel (precomputed frames driven by JavaScript in the page)."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import matplotlib as mpl
from matplotlib.figure import Figure

__all__ = ["BOOK_STYLE", "use_book_style", "PALETTE", "frames_player"]

# Colour-blind-safe (Okabe-Ito) colours, in the order plots use them.
PALETTE = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442", "#000000"]

BOOK_STYLE: dict[str, object] = {
    "figure.facecolor": "white",
    "savefig.facecolor": "white",
    "axes.facecolor": "white",
    "figure.figsize": (6.4, 4.0),
    "figure.dpi": 100,
    "figure.constrained_layout.use": True,
    "font.size": 11,
    "axes.titlesize": 12,
    "axes.labelsize": 11,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.prop_cycle": mpl.cycler(color=PALETTE),
    "image.cmap": "gray_r",
    "legend.frameon": False,
}


def use_book_style() -> None:
    """Apply the book's style to every figure drawn after this call; in a notebook, also show
    figures as retina PNGs (twice the pixels at the same displayed size)."""
    mpl.rcParams.update(BOOK_STYLE)
    try:
        from IPython import get_ipython
        from matplotlib_inline.backend_inline import set_matplotlib_formats
    except ImportError:  # not in IPython: nothing is shown inline
        return
    if get_ipython() is not None:
        set_matplotlib_formats("retina")


def frames_player(
    fig: Figure, draw: Callable[[Any], None], values: Sequence[Any], *, interval_ms: int = 500
) -> Any:
    """A slider over ``values`` that needs no kernel: ``draw(value)`` redraws ``fig`` for one
    value (clear what it draws first), every frame is rendered now, and the frames are embedded
    in the notebook's output with a small JavaScript player (matplotlib's ``to_jshtml``), so the
    slider also moves in the HTML book. Returns an ``IPython.display.HTML`` to display; ``fig``
    is closed. Keep ``values`` short (each frame is one PNG in the page)."""
    # Here, not at the top: importing capsnet must not import pyplot (it picks a backend).
    import matplotlib.pyplot as plt
    from IPython.display import HTML
    from matplotlib.animation import FuncAnimation

    if len(values) == 0:
        raise ValueError("frames_player needs at least one value to draw")
    animation = FuncAnimation(
        fig, lambda i: draw(values[i]), frames=len(values), interval=interval_ms, repeat=False
    )
    page = animation.to_jshtml(default_mode="once")
    plt.close(fig)
    return HTML(_offline_player(page))


# matplotlib's player draws its buttons with Font Awesome 4 icons from a CDN; a book read offline
# (and a page that must fetch nothing from elsewhere) gets plain Unicode symbols instead.
_PLAYER_ICONS = {
    "fa fa-minus": "\u2212",
    "fa fa-plus": "+",
    "fa fa-fast-backward": "|\u25c1",
    "fa fa-step-backward": "\u25c1|",
    "fa fa-play fa-flip-horizontal": "\u25c1",
    "fa fa-pause": "\u2016",
    "fa fa-play": "\u25b7",
    "fa fa-step-forward": "|\u25b7",
    "fa fa-fast-forward": "\u25b7|",
}


def _offline_player(page: str) -> str:
    page = re.sub(r"<link[^>]*font-awesome[^>]*>", "", page)
    for icon, symbol in _PLAYER_ICONS.items():
        page = page.replace(f'<i class="{icon}"></i>', symbol)
    if '<i class="fa ' in page or "https://" in page:
        raise RuntimeError(
            "matplotlib's animation player changed: it still loads icons or files from the web; "
            "update capsnet.plotting._PLAYER_ICONS"
        )
    return page
