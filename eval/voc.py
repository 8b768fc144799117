"""PASCAL VOC and ILSVRC detection AP, with the devkits' matching rules.

Boxes are continuous ``xyxy``; the devkits' pixel-inclusive ``+1`` widths of VOC 1-based corners are
exactly the continuous widths of the same boxes (``rcnn.boxes.voc_to_xyxy``), so IoU is computed on
continuous boxes and equals the devkits' (a test checks this against the ``+1`` formulas).

VOC: detections of a class, best first over all images; each is matched to the ground-truth box of
its image with the highest IoU; IoU >= ``iou_threshold`` and that box not yet taken -> true positive;
taken -> false positive; a match to a "difficult" box is neither. AP: VOC 2007's 11-point mean, or
VOC 2010+'s area under the monotone precision envelope.

ILSVRC: each ground-truth box has its own threshold ``min(0.5, w h / ((w + 10)(h + 10)))``; a detection
takes the not-yet-taken box of its class with the highest IoU that passes that box's threshold;
blacklisted (image, class) pairs are left out (their boxes and detections); AP by the area rule.
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import numpy as np

from .detections import Detections, by_class

__all__ = ["voc_ap", "voc_eval", "voc_rule", "class_matches", "ilsvrc_eval", "ilsvrc_thresholds", "iou_one"]


def iou_one(box: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """IoU of one box ``[4]`` with ``[G, 4]`` boxes -> ``[G]`` (float64; small G, no torch overhead)."""
    iw = np.clip(np.minimum(box[2], gt[:, 2]) - np.maximum(box[0], gt[:, 0]), 0, None)
    ih = np.clip(np.minimum(box[3], gt[:, 3]) - np.maximum(box[1], gt[:, 1]), 0, None)
    inter = iw * ih
    union = (box[2] - box[0]) * (box[3] - box[1]) + (gt[:, 2] - gt[:, 0]) * (gt[:, 3] - gt[:, 1]) - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, inter / union, 0.0)


def voc_ap(rec: np.ndarray, prec: np.ndarray, use_07_metric: bool) -> float:
    """AP from a recall/precision curve: 11-point (VOC 2007) or area under the envelope (2010+)."""
    if use_07_metric:
        return float(np.mean([prec[rec >= t].max() if (rec >= t).any() else 0.0 for t in np.linspace(0, 1, 11)]))
    mrec = np.concatenate([[0.0], rec, [1.0]])
    mpre = np.concatenate([[0.0], prec, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    i = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


def _curve(tp: np.ndarray, fp: np.ndarray, npos: int) -> tuple[np.ndarray, np.ndarray]:
    tp, fp = np.cumsum(tp), np.cumsum(fp)
    rec = tp / npos if npos else np.zeros_like(tp, dtype=float)
    prec = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    return rec, prec


# A rule matches one detection against its image's ground truth of the class:
# (box, gt boxes [G, 4], flags [G] (difficult), thresholds [G], taken [G] bool) -> (tp, fp) and marks taken.
Rule = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray], tuple[int, int]]


def voc_rule(iou_threshold: float) -> Rule:
    def match(box, gt, difficult, _thr, taken):
        if len(gt) == 0:
            return 0, 1
        ov = iou_one(box, gt)
        j = int(np.argmax(ov))
        if ov[j] < iou_threshold:
            return 0, 1
        if difficult[j]:
            return 0, 0
        if taken[j]:
            return 0, 1
        taken[j] = True
        return 1, 0

    return match


def _ilsvrc_rule(box, gt, _difficult, thr, taken):
    if len(gt) == 0:
        return 0, 1
    ov = iou_one(box, gt)
    ok = (~taken) & (ov >= thr)
    if not ok.any():
        return 0, 1
    taken[int(np.argmax(np.where(ok, ov, -np.inf)))] = True
    return 1, 0


def class_matches(
    dets: Detections,
    gts: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]],
    c: int,
    rule: Rule,
    thresholds: Callable[[np.ndarray], np.ndarray] | None = None,
    skip: frozenset | set = frozenset(),
) -> tuple[np.ndarray, np.ndarray, int]:
    """Class ``c``'s detections, best first: true- and false-positive flags ``[d]`` (both 0 for a
    detection the rule ignores) and the number of positives (boxes not flagged difficult)."""
    gt_c = {}
    npos = 0
    for i, (boxes, labels, difficult) in enumerate(gts):
        if (i, c) in skip:
            continue
        sel = labels == c
        if sel.any():
            b = np.asarray(boxes, np.float64)[sel]
            d = np.asarray(difficult, bool)[sel]
            t = thresholds(b) if thresholds else np.zeros(len(b))
            gt_c[i] = (b, d, t, np.zeros(len(b), bool))
            npos += int((~d).sum())
    img, _scores, boxes = by_class(dets, c)
    tp, fp = np.zeros(len(img)), np.zeros(len(img))
    empty = (np.zeros((0, 4)), np.zeros(0, bool), np.zeros(0), np.zeros(0, bool))
    for k in range(len(img)):
        i = int(img[k])
        if (i, c) in skip:
            continue
        tp[k], fp[k] = rule(boxes[k].astype(np.float64), *gt_c.get(i, empty))
    return tp, fp, npos


def _evaluate(
    dets: Detections,
    gts: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]],
    num_classes: int,
    rule: Rule,
    use_07_metric: bool,
    thresholds: Callable[[np.ndarray], np.ndarray] | None = None,
    skip: Iterable[tuple[int, int]] = (),
) -> dict:
    skip = set(skip)
    aps, curves = [], []
    for c in range(num_classes):
        tp, fp, npos = class_matches(dets, gts, c, rule, thresholds, skip)
        rec, prec = _curve(tp, fp, npos)
        aps.append(voc_ap(rec, prec, use_07_metric) if npos else float("nan"))
        curves.append((rec, prec))
    valid = [a for a in aps if not np.isnan(a)]
    return {"ap": aps, "map": float(np.mean(valid)) if valid else float("nan"), "curves": curves}


def voc_eval(dets: Detections, gts, num_classes: int, iou_threshold: float = 0.5, use_07_metric: bool = True) -> dict:
    """VOC AP per class (NaN for a class without positives), their mean, and (recall, precision) curves.

    Args:
        dets: detections on the split. gts: per image ``(boxes [G, 4], labels [G], difficult [G])``.
    """
    return _evaluate(dets, gts, num_classes, voc_rule(iou_threshold), use_07_metric)


def ilsvrc_thresholds(boxes: np.ndarray, pixel_tolerance: float = 10.0) -> np.ndarray:
    """Per ground-truth box: ``min(0.5, w h / ((w + 10)(h + 10)))`` (w, h: pixel-inclusive = continuous)."""
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    return np.minimum(0.5, w * h / ((w + pixel_tolerance) * (h + pixel_tolerance)))


def ilsvrc_eval(dets: Detections, gts, num_classes: int, blacklist: Iterable[tuple[int, int]] = ()) -> dict:
    """ILSVRC detection AP (area rule). ``blacklist``: (image index in the split, label) pairs to leave out.
    ILSVRC has no difficult boxes; any flagged difficult here are counted as ordinary ones."""
    gts = [(b, l, np.zeros(len(l), bool)) for b, l, _ in gts]
    return _evaluate(dets, gts, num_classes, _ilsvrc_rule, False, ilsvrc_thresholds, blacklist)
