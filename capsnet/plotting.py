"""The book's shared matplotlib style: opaque white figures that read in light and dark themes
and at phone width."""

from __future__ import annotations

import matplotlib as mpl

__all__ = ["BOOK_STYLE", "use_book_style", "PALETTE"]

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
    """Apply the book's style to every figure drawn after this call."""
    mpl.rcParams.update(BOOK_STYLE)
