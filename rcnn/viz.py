"""Plots written as PNG files (atomically), with a non-interactive backend."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .store import atomic_write

__all__ = ["png", "plot_history"]


@contextmanager
def png(path: str | Path, size: tuple[float, float] = (6, 4), dpi: int = 110) -> Iterator:
    """``with png(path) as ax:`` draw on ``ax``; on leaving, the figure is gridded, laid out and saved."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=size, dpi=dpi)
    try:
        yield ax
        ax.grid(True, which="both", alpha=0.3)
        fig.tight_layout()
        atomic_write(path, lambda f: fig.savefig(f, format="png"))
    finally:
        plt.close(fig)


def plot_history(history: list[dict], x: str, series: dict[str, str], path: str | Path, title: str, ylabel: str = "") -> Path:
    """Training curves: ``series`` maps a key of each history record to its legend label."""
    with png(path) as ax:
        xs = [h[x] for h in history]
        for key, label in series.items():
            ax.plot(xs, [h[key] for h in history], marker="o" if len(xs) < 100 else None, ms=2, lw=1, label=label)
        ax.set_xlabel(x)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.legend()
    return Path(path)
