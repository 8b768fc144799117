"""Plots written as PNG files (atomically), with a non-interactive backend."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .store import atomic_write

__all__ = ["png", "plot_history", "draw_detections", "write_png"]


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


def _colour(k: int) -> tuple[int, int, int]:
    """A distinct, saturated RGB colour per class index."""
    import colorsys

    r, g, b = colorsys.hsv_to_rgb((k * 0.618034) % 1.0, 0.85, 0.95)
    return int(255 * r), int(255 * g), int(255 * b)


def draw_detections(rgb, boxes, names: list[str], scores, thickness: int = 2):
    """A copy of ``rgb`` with each box drawn and labelled "name score" (one colour per class name)."""
    import cv2
    import numpy as np

    out = np.ascontiguousarray(rgb).copy()
    palette = {n: _colour(k) for k, n in enumerate(sorted(set(names)))}
    for (x1, y1, x2, y2), name, score in zip(np.asarray(boxes).reshape(-1, 4), names, scores):
        p1, p2 = (int(round(x1)), int(round(y1))), (int(round(x2)) - 1, int(round(y2)) - 1)
        colour = palette[name]
        cv2.rectangle(out, p1, p2, colour, thickness)
        text = f"{name} {score:.2f}"
        (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, 0.45, 1)
        top = max(p1[1] - th - base - 2, 0)
        cv2.rectangle(out, (p1[0], top), (p1[0] + tw + 4, top + th + base + 2), colour, -1)
        cv2.putText(out, text, (p1[0] + 2, top + th + 1), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    return out


def write_png(path: str | Path, rgb) -> Path:
    """Write an RGB uint8 image as PNG (atomically)."""
    import cv2

    ok, data = cv2.imencode(".png", rgb[:, :, ::-1])
    if not ok:
        raise OSError(f"{path}: could not encode the image as PNG")
    return atomic_write(path, lambda f: f.write(data.tobytes()))
