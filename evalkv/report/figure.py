"""Saving matplotlib figures: the format follows the file's suffix (.png or .pdf), the Agg backend needs no display.

Figures are laid out in inches at 100 dots per inch; `sharper(2)` saves the PNGs drawn inside it with twice the
pixels (the report page shows them at their 100-dpi size, so they stay sharp when zoomed or on dense screens).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

from evalkv.errors import EvalkvError

FORMATS = (".png", ".pdf")
DPI = 100
_scale: ContextVar[int] = ContextVar("figure_scale", default=1)


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def check_output(output: str | Path) -> Path:
    target = Path(output)
    if target.suffix.lower() not in FORMATS:
        raise EvalkvError(f"{target}: a figure is written as .png or .pdf (the suffix picks the format)")
    return target


@contextmanager
def sharper(scale: int) -> Iterator[None]:
    """Figures saved inside have `scale` times the pixels per inch."""
    token = _scale.set(scale)
    try:
        yield
    finally:
        _scale.reset(token)


def saving_dpi() -> int:
    return DPI * _scale.get()


def save_figure(figure, output: str | Path, **savefig) -> Path:
    """Write the figure to `output` (PNG or PDF by suffix; labels outside the axes included unless `savefig` says
    otherwise) and close it."""
    target = check_output(output)
    target.parent.mkdir(parents=True, exist_ok=True)
    options = {"dpi": saving_dpi(), "format": target.suffix.lower().lstrip("."), "bbox_inches": "tight", **savefig}
    figure.savefig(target, **options)
    pyplot().close(figure)
    return target
