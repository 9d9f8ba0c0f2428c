"""Saving matplotlib figures: the format follows the file's suffix (.png or .pdf), the Agg backend needs no display."""

from __future__ import annotations

from pathlib import Path

from evalkv.errors import EvalkvError

FORMATS = (".png", ".pdf")
DPI = 100


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


def save_figure(figure, output: str | Path, dpi: int = DPI) -> Path:
    """Write the figure to `output` (PNG or PDF by suffix; labels outside the axes included) and close it."""
    target = check_output(output)
    target.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(target, dpi=dpi, format=target.suffix.lower().lstrip("."), bbox_inches="tight")
    pyplot().close(figure)
    return target
