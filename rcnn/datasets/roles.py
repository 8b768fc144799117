"""The roles of a dataset's boxes and splits: which boxes training reads, which ones proposals and detections
are scored against, which training boxes a crowd region hides, and which splits a stage works on. Every stage
asks these, so they live here, below the stages."""

from __future__ import annotations

import numpy as np

from .. import boxes as B

__all__ = ["split_names", "gt_for_recall", "gt_for_training", "in_crowd", "CROWD_IOA"]

CROWD_IOA = 0.7  # a training box with this share of its area inside a crowd region is left out (Detectron's)


def split_names(ctx) -> list[str]:
    """``proposals.splits`` (roles ``train``/``test``) -> the dataset's split names."""
    ds = ctx.dataset
    roles = {"train": ds.train_split, "test": ds.test_split}
    return list(dict.fromkeys(roles[r] for r in ctx.cfg.proposals.splits))


def gt_for_recall(ds, image_id) -> tuple[np.ndarray, np.ndarray]:
    """The boxes proposals are scored against (and detections evaluated on): difficult ones left out."""
    a = ds.annotation(image_id)
    keep = ~a.difficult
    return a.boxes[keep], a.labels[keep]


def gt_for_training(ds, image_id) -> tuple[np.ndarray, np.ndarray]:
    """The boxes every training use reads (SVM positives and negatives, regression pairs, fine-tuning
    labels, MultiBox targets): all of them, difficult ones included, as R-CNN's ``roidb_from_voc.m``
    kept them, so that a proposal on a difficult bottle is never mined as a bottle negative. COCO's crowd
    regions are not objects: left out, as Fast R-CNN's and Detectron's COCO loaders left them (the
    training boxes inside one are left out too: :func:`in_crowd`)."""
    a = ds.annotation(image_id)
    keep = ~a.crowd
    return a.boxes[keep], a.labels[keep]


def in_crowd(ds, image_id, boxes: np.ndarray) -> np.ndarray:
    """bool ``[N]``: the boxes with at least ``CROWD_IOA`` of their area inside one of the image's crowd
    regions. Training leaves them out, neither background nor an object (Detectron's crowd filter): a
    proposal on a crowd of people would otherwise be mined as a person negative."""
    a = ds.annotation(image_id)
    if not a.crowd.any() or not len(boxes):
        return np.zeros(len(boxes), bool)
    return (B.ioa(boxes, a.boxes[a.crowd]) >= CROWD_IOA).any(axis=1)
