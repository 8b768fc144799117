"""The evaluation report: a markdown table and precision/recall curves."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from rcnn.viz import png

__all__ = ["markdown", "plot_pr"]


def _fmt(v) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"


def markdown(metrics: dict, classes: list[str]) -> str:
    """Summary line and a per-class table (AP in percent; '-' where a class has no ground truth)."""
    keys = ["voc07_map", "voc_map", "ilsvrc_map", "coco_map", "coco_map50", "coco_map75"]
    lines = [
        f"# Evaluation: {metrics['dataset']} / {metrics['split']} ({metrics['detections_count']} detections)",
        "",
        "| " + " | ".join(keys) + " |",
        "|" + "---:|" * len(keys),
        "| " + " | ".join(_fmt(metrics[k]) for k in keys) + " |",
        "",
        "| class | VOC07 AP | VOC AP | ILSVRC AP | COCO AP |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in classes:
        pc = metrics["per_class"][name]
        lines.append(f"| {name} | {_fmt(pc['voc07'])} | {_fmt(pc['voc'])} | {_fmt(pc['ilsvrc'])} | {_fmt(pc['coco'])} |")
    return "\n".join(lines) + "\n"


def plot_pr(curves: list[tuple[np.ndarray, np.ndarray]], aps: list[float], classes: list[str], path: Path, title: str) -> Path:
    """VOC precision/recall curves, one line per class with ground truth (at most 20, best AP first)."""
    shown = sorted((k for k, a in enumerate(aps) if not math.isnan(a)), key=lambda k: -aps[k])[:20]
    with png(path, size=(7, 5)) as ax:
        for k in shown:
            rec, prec = curves[k]
            if len(rec):
                ax.plot(rec, prec, lw=1.2, label=f"{classes[k]} ({100 * aps[k]:.1f})")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("recall")
        ax.set_ylabel("precision")
        ax.set_title(title)
        if shown:
            ax.legend(fontsize=7, loc="lower left", ncol=2)
    return path
