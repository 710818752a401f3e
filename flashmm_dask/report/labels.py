"""Name labels for the top points of a plot, kept apart by a few simple offsets.

The labels are annotations next to their points, each at the first of a fixed list of
offsets (right-above, right-below, left-above, left-below, then farther away) where its
text stays inside the axes and overlaps neither an earlier label nor the legend. A point
for which no offset works is left unlabelled. Text extents are measured after one draw of
the figure, so they are those of the final layout (the labels are kept out of the layout).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.text import Annotation
    from matplotlib.transforms import Bbox

#: (dx, dy) in points, horizontal and vertical alignment of the text.
_OFFSETS: tuple[tuple[float, float, str, str], ...] = (
    (5, 5, "left", "bottom"),
    (5, -5, "left", "top"),
    (-5, 5, "right", "bottom"),
    (-5, -5, "right", "top"),
    (12, 16, "left", "bottom"),
    (-12, 16, "right", "bottom"),
    (12, -16, "left", "top"),
    (-12, -16, "right", "top"),
    (0, 26, "center", "bottom"),
    (0, -26, "center", "top"),
)


def _inside(outer: Bbox, inner: Bbox) -> bool:
    return bool(
        outer.x0 <= inner.x0
        and inner.x1 <= outer.x1
        and outer.y0 <= inner.y0
        and inner.y1 <= outer.y1
    )


def label_points(
    ax: Axes,
    x: np.ndarray,
    y: np.ndarray,
    names: Sequence[Any] | np.ndarray,
    n: int = 8,
    *,
    fontsize: float = 7.0,
) -> list[Annotation]:
    """Label the ``n`` points with the largest ``y`` with their names.

    Parameters
    ----------
    ax : the axes the points are drawn in
    x, y : (k,) coordinates of the candidate points (data coordinates)
    names : (k,) their labels
    n : how many to label at most
    fontsize : of the labels

    Returns
    -------
    list of matplotlib.text.Annotation
        The labels placed, highest point first (fewer than ``n`` when some found no free
        place).
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if n <= 0 or x.size == 0:
        return []
    order = np.argsort(-y, kind="stable")[:n]
    from matplotlib.text import Text

    fig = ax.figure
    fig.canvas.draw()  # settle the layout: extents below are final
    renderer = fig.canvas.get_renderer()  # type: ignore[attr-defined]
    frame = ax.get_window_extent(renderer)
    taken = []
    legend = ax.get_legend()
    if legend is not None:
        box = legend.get_window_extent(renderer)
        taken.append(box)
        # pin loc="best" where it is now: the labels must not move the legend
        legend.set_loc(tuple(ax.transAxes.inverted().transform((box.x0, box.y0))))
    placed = []
    for i in order:
        for dx, dy, ha, va in _OFFSETS:
            label = ax.annotate(
                str(names[i]),
                (float(x[i]), float(y[i])),
                xytext=(dx, dy),
                textcoords="offset points",
                ha=ha,
                va=va,
                fontsize=fontsize,
                arrowprops={"arrowstyle": "-", "linewidth": 0.5, "color": "0.35"},
            )
            label.set_in_layout(False)
            label.update_positions(renderer)
            box = Text.get_window_extent(label, renderer)  # the text without its line
            if _inside(frame, box) and not any(box.overlaps(other) for other in taken):
                taken.append(box)
                placed.append(label)
                break
            label.remove()
    return placed


__all__ = ["label_points"]
