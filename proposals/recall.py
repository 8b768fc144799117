"""Proposal quality: recall at IoU thresholds, MABO, and recall against the number of boxes kept.

Ground-truth boxes flagged difficult (VOC) or crowd (COCO) are left out, as the evaluators do.
MABO (Uijlings et al.): the best IoU of each ground-truth box with any proposal, averaged within each
class (ABO), then over the classes present.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from rcnn import boxes as B

__all__ = ["best_overlaps", "recall_summary", "recall_curve", "plot_recall"]


def best_overlaps(gt: np.ndarray, proposals: np.ndarray, counts: Sequence[int] = ()) -> np.ndarray:
    """Best IoU of each ground-truth box with the proposals.

    Args:
        gt: [G, 4]; proposals: [P, 4], best-ranked first; counts: numbers of leading proposals.
    Returns:
        [G] best IoU over all proposals; with ``counts``, [len(counts), G]: best IoU over the first n.
    """
    if len(gt) == 0:
        return np.zeros((len(counts), 0)) if len(counts) else np.zeros(0)
    if len(proposals) == 0:
        return np.zeros((len(counts), len(gt))) if len(counts) else np.zeros(len(gt))
    iou = B.iou(gt, proposals)  # [G, P]
    if not len(counts):
        return iou.max(axis=1)
    running = np.maximum.accumulate(iou, axis=1)
    idx = np.clip(np.asarray(counts) - 1, 0, len(proposals) - 1)
    out = running[:, idx].T
    out[np.asarray(counts) <= 0] = 0
    return out


def recall_summary(items: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]], num_classes: int) -> dict:
    """Recall@0.5, recall@0.7 and MABO over images.

    Args:
        items: per image ``(gt_boxes [G, 4], gt_labels [G], proposals [P, 4])`` (difficult removed).
    Returns: ``{"recall_50", "recall_70", "mabo", "gt_boxes", "boxes_per_image"}``.
    """
    overlaps, labels, n_props, n_images = [], [], 0, 0
    for gt, lab, props in items:
        overlaps.append(best_overlaps(gt, props))
        labels.append(np.asarray(lab))
        n_props += len(props)
        n_images += 1
    ov = np.concatenate(overlaps) if overlaps else np.zeros(0)
    lab = np.concatenate(labels).astype(np.int64) if labels else np.zeros(0, np.int64)
    abo = [ov[lab == c].mean() for c in range(num_classes) if (lab == c).any()]
    return {
        "boxes_per_image": n_props / max(n_images, 1),
        "recall_50": float((ov >= 0.5).mean()) if len(ov) else 0.0,
        "recall_70": float((ov >= 0.7).mean()) if len(ov) else 0.0,
        "mabo": float(np.mean(abo)) if abo else 0.0,
        "gt_boxes": int(len(ov)),
    }


def recall_curve(items: Iterable[tuple[np.ndarray, np.ndarray]], counts: Sequence[int]) -> dict:
    """Recall@0.5 and @0.7 when only the first n proposals of each image are kept, for n in counts."""
    per_gt = [best_overlaps(gt, props, counts) for gt, props in items]
    ov = np.concatenate(per_gt, axis=1) if per_gt else np.zeros((len(counts), 0))
    n = max(ov.shape[1], 1)
    return {
        "counts": [int(c) for c in counts],
        "recall_50": ((ov >= 0.5).sum(axis=1) / n).tolist(),
        "recall_70": ((ov >= 0.7).sum(axis=1) / n).tolist(),
    }


def default_counts(max_boxes: int) -> list[int]:
    grid = [10, 20, 50, 100, 200, 300, 500, 1000, 1500, 2000, 3000, 5000, 10000]
    return [c for c in grid if c < max_boxes] + [max(int(max_boxes), 1)]


def plot_recall(curves: dict[str, dict], path: Path, title: str) -> Path:
    """One PNG: recall@0.5 (solid) and @0.7 (dashed) against proposals kept, a line pair per split."""
    from rcnn.viz import png

    with png(path) as ax:
        for name, c in curves.items():
            line = ax.plot(c["counts"], c["recall_50"], marker="o", ms=3, label=f"{name} IoU 0.5")[0]
            ax.plot(c["counts"], c["recall_70"], ls="--", marker="o", ms=3, color=line.get_color(), label=f"{name} IoU 0.7")
        ax.set_xscale("log")
        ax.set_ylim(0, 1)
        ax.set_xlabel("proposals kept per image (by rank)")
        ax.set_ylabel("recall")
        ax.set_title(title)
        ax.legend(fontsize=8)
    return path
