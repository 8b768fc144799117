"""The one box convention of the project, and the conversions at its edges.

Every box inside the toolkit is a float ``(x1, y1, x2, y2)`` in continuous pixel coordinates:
the image spans ``[0, W] x [0, H]``, a box's width is ``x2 - x1`` and a one-pixel box at column
``c`` is ``(c, ., c + 1, .)``. Loaders convert at the edge (VOC's 1-based inclusive corners, COCO's
``xywh``) and evaluators convert back for their pixel-inclusive rules.

Arrays are numpy ``float32``/``float64`` of shape ``[N, 4]``; IoU and NMS run in
``torchvision.ops`` and accept numpy arrays or tensors (numpy in, numpy out). Also here: R-CNN's box
coder (``encode``/``decode``: the box regressors' targets) and the test-time rule (``postprocess``: per-class
best boxes, NMS), which the SVM stage's choice of C and detection share.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torchvision import ops

__all__ = [
    "as_boxes",
    "voc_to_xyxy",
    "xyxy_to_voc",
    "xywh_to_xyxy",
    "xyxy_to_xywh",
    "normalize",
    "denormalize",
    "area",
    "clip",
    "is_valid",
    "iou",
    "matches",
    "ioa",
    "encode",
    "decode",
    "postprocess",
    "RCNN_NMS_IOU",
    "nms",
    "batched_nms",
    "top_per_label",
]


def as_boxes(boxes, dtype=np.float32) -> np.ndarray:
    """Any ``[N, 4]``-like input (list, array, empty) -> ``np.ndarray[N, 4]`` of ``dtype``."""
    arr = np.asarray(boxes, dtype=dtype)
    if arr.size == 0:
        return np.zeros((0, 4), dtype=dtype)
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise ValueError(f"boxes must have shape [N, 4], got {arr.shape}")
    return arr


def voc_to_xyxy(boxes) -> np.ndarray:
    """VOC/ILSVRC 1-based inclusive ``(xmin, ymin, xmax, ymax)`` -> continuous ``xyxy``.

    Pixel ``xmin`` (1-based) starts at continuous ``xmin - 1``; pixel ``xmax`` ends at ``xmax``.
    """
    b = as_boxes(boxes, np.float64).copy()
    b[:, :2] -= 1.0
    return b.astype(np.float32)


def xyxy_to_voc(boxes) -> np.ndarray:
    """Continuous ``xyxy`` -> VOC 1-based inclusive corners (inverse of :func:`voc_to_xyxy`)."""
    b = as_boxes(boxes, np.float64).copy()
    b[:, :2] += 1.0
    return b


def xywh_to_xyxy(boxes) -> np.ndarray:
    """COCO ``(x, y, w, h)`` -> ``(x1, y1, x2, y2)``."""
    b = as_boxes(boxes, np.float64)
    return np.concatenate([b[:, :2], b[:, :2] + b[:, 2:]], axis=1).astype(np.float32)


def xyxy_to_xywh(boxes) -> np.ndarray:
    """``(x1, y1, x2, y2)`` -> COCO ``(x, y, w, h)``."""
    b = as_boxes(boxes, np.float64)
    return np.concatenate([b[:, :2], b[:, 2:] - b[:, :2]], axis=1)


def normalize(boxes, width: float, height: float) -> np.ndarray:
    """Pixel ``xyxy`` -> ``xyxy`` in ``[0, 1]`` relative to the image size."""
    scale = np.array([width, height, width, height], dtype=np.float64)
    return (as_boxes(boxes, np.float64) / scale).astype(np.float32)


def denormalize(boxes, width: float, height: float) -> np.ndarray:
    """Normalised ``xyxy`` -> pixel ``xyxy`` (inverse of :func:`normalize`)."""
    scale = np.array([width, height, width, height], dtype=np.float64)
    return (as_boxes(boxes, np.float64) * scale).astype(np.float32)


def area(boxes) -> np.ndarray:
    """``[N, 4]`` -> ``[N]`` areas; boxes with ``x2 < x1`` or ``y2 < y1`` have area 0."""
    b = as_boxes(boxes, np.float64)
    return np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)


def clip(boxes, width: float, height: float) -> np.ndarray:
    """Clip ``[N, 4]`` boxes to the image ``[0, width] x [0, height]`` (returns a new array)."""
    b = as_boxes(boxes).copy()
    b[:, 0::2] = np.clip(b[:, 0::2], 0, width)
    b[:, 1::2] = np.clip(b[:, 1::2], 0, height)
    return b


def is_valid(boxes, min_size: float = 0.0) -> np.ndarray:
    """``[N]`` bool: finite, and both sides strictly longer than ``min_size``."""
    b = as_boxes(boxes, np.float64)
    finite = np.isfinite(b).all(axis=1)
    with np.errstate(invalid="ignore"):
        return finite & (b[:, 2] - b[:, 0] > min_size) & (b[:, 3] - b[:, 1] > min_size)


def _tensor(x) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    return torch.from_numpy(np.ascontiguousarray(x))


def iou(boxes1, boxes2):
    """Pairwise IoU: ``[N, 4]``, ``[M, 4]`` -> ``[N, M]`` (``torchvision.ops.box_iou``).

    Numpy in gives numpy out (float64 inputs stay float64); tensors give tensors.
    """
    numpy_in = not isinstance(boxes1, torch.Tensor)
    if numpy_in:
        boxes1, boxes2 = as_boxes(boxes1, np.float64), as_boxes(boxes2, np.float64)
    out = ops.box_iou(_tensor(boxes1), _tensor(boxes2))
    return out.numpy() if numpy_in else out


def matches(boxes, gt, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """The ``boxes`` above IoU ``threshold`` with a ``gt`` box, and the best such box of each: ``(rows [K],
    best [K])``, int64, rows ascending (R-CNN's rule for a box regressor's training pairs)."""
    b, g = as_boxes(boxes), as_boxes(gt)
    if not len(b) or not len(g):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    overlap = iou(b, g)
    rows = np.flatnonzero(overlap.max(axis=1) > threshold)
    return rows.astype(np.int64), overlap[rows].argmax(axis=1).astype(np.int64)


def ioa(boxes, regions) -> np.ndarray:
    """Pairwise intersection over the first box's own area: ``[N, 4]``, ``[M, 4]`` -> ``[N, M]`` float64
    (COCO's overlap with a crowd region, through ``pycocotools.mask.iou`` with ``iscrowd`` set)."""
    from pycocotools import mask

    b, r = as_boxes(boxes, np.float64), as_boxes(regions, np.float64)
    if not len(b) or not len(r):
        return np.zeros((len(b), len(r)))
    return np.asarray(mask.iou(xyxy_to_xywh(b), xyxy_to_xywh(r), [1] * len(r)), np.float64).reshape(len(b), len(r))


def nms(boxes, scores, iou_threshold: float) -> np.ndarray:
    """Greedy NMS (``torchvision.ops.nms``): indices kept, highest score first, ``[K]`` int64."""
    b, s = as_boxes(boxes), np.asarray(scores, dtype=np.float32).reshape(-1)
    return ops.nms(_tensor(b), _tensor(s), float(iou_threshold)).numpy()


def batched_nms(boxes, scores, labels, iou_threshold: float | Sequence[float]) -> np.ndarray:
    """NMS within each label (``torchvision.ops.batched_nms``): kept indices ``[K]``, by score. ``iou_threshold``:
    one overlap, or one per label (indexed by it)."""
    b, s = as_boxes(boxes), np.asarray(scores, dtype=np.float32).reshape(-1)
    lab = np.asarray(labels, dtype=np.int64).reshape(-1)
    if np.ndim(iou_threshold) == 0:
        return ops.batched_nms(_tensor(b), _tensor(s), _tensor(lab), float(iou_threshold)).numpy()
    per_label = np.asarray(iou_threshold, np.float64)[lab]
    kept = [np.zeros(0, np.int64)]
    for t in np.unique(per_label):  # one batched pass per distinct overlap
        idx = np.flatnonzero(per_label == t)
        kept.append(idx[batched_nms(b[idx], s[idx], lab[idx], t)])
    kept = np.concatenate(kept)
    return kept[np.argsort(-s[kept], kind="stable")]


def top_per_label(scores, labels, k: int) -> np.ndarray:
    """Indices of each label's ``k`` highest scores (ties kept in index order), in index order ``[K]``."""
    s, lab = np.asarray(scores).reshape(-1), np.asarray(labels).reshape(-1)
    order = np.lexsort((-s, lab))  # by label, best first, stable
    sorted_labels = lab[order]
    rank = np.arange(len(order)) - np.searchsorted(sorted_labels, sorted_labels)  # rank within its label
    return np.sort(order[rank < k])


# -- the box coder (R-CNN's box regression targets) ------------------------------------------------

def _centres(boxes: np.ndarray) -> tuple[np.ndarray, ...]:
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    w = boxes[:, 2] - boxes[:, 0]
    h = boxes[:, 3] - boxes[:, 1]
    return boxes[:, 0] + 0.5 * w, boxes[:, 1] + 0.5 * h, w, h


def encode(proposals: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """``[N, 4]`` targets ``(dx, dy, dw, dh)`` that take each proposal onto its ground-truth box."""
    px, py, pw, ph = _centres(proposals)
    gx, gy, gw, gh = _centres(gt)
    return np.stack([(gx - px) / pw, (gy - py) / ph, np.log(gw / pw), np.log(gh / ph)], axis=1)


def decode(proposals: np.ndarray, deltas: np.ndarray) -> np.ndarray:
    """The boxes that ``deltas [..., 4]`` make of ``proposals [N, 4]``; ``deltas`` may be ``[N, C, 4]``
    (one set per class), giving ``[N, C, 4]``. Size offsets are capped at log(1000/16), as detectron2 does,
    so a wild prediction cannot overflow."""
    px, py, pw, ph = _centres(proposals)
    d = np.asarray(deltas, np.float64)
    extra = (slice(None),) + (None,) * (d.ndim - 2)  # broadcast proposals over the class axis
    cap = np.log(1000.0 / 16)
    cx = px[extra] + d[..., 0] * pw[extra]
    cy = py[extra] + d[..., 1] * ph[extra]
    w = pw[extra] * np.exp(np.minimum(d[..., 2], cap))
    h = ph[extra] * np.exp(np.minimum(d[..., 3], cap))
    return np.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], axis=-1).astype(np.float32)


# -- the test-time rule -------------------------------------------------------------------------------

RCNN_NMS_IOU = 0.3  # R-CNN's per-class NMS overlap (rcnn_test.m)


def postprocess(
    boxes: np.ndarray, scores: np.ndarray, deltas: np.ndarray | None, width: int, height: int,
    nms_iou: float | Sequence[float] = RCNN_NMS_IOU, max_per_image: int | None = None,
    score_threshold: float | None = None, max_per_class: int | None = 100,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """Proposals ``[N, 4]`` with class scores ``[N, C]`` (and regression deltas ``[N, C, 4]``) ->
    ``(boxes, scores, labels)``, best first: regressed, clipped; per class its ``max_per_class`` best
    boxes, then NMS at ``nms_iou`` (one overlap, or one a class) (as ``rcnn_test.m``: classes are never ranked
    against each other by their uncalibrated margins); then, only when ``max_per_image`` is set, the image's
    best over all classes."""
    n, c = scores.shape
    if deltas is not None:
        cand = decode(boxes, deltas)  # [N, C, 4]
    else:
        cand = np.broadcast_to(as_boxes(boxes)[:, None, :], (n, c, 4))
    cand = clip(cand.reshape(-1, 4), width, height)
    flat = scores.reshape(-1)
    labels = np.tile(np.arange(c), n)
    keep = np.isfinite(flat) & is_valid(cand)
    if score_threshold is not None:
        keep &= flat >= score_threshold
    idx = np.flatnonzero(keep)
    if max_per_class is not None:
        idx = idx[top_per_label(flat[idx], labels[idx], max_per_class)]
    order = batched_nms(cand[idx], flat[idx], labels[idx], nms_iou)[:max_per_image]
    idx = idx[order]
    return cand[idx].astype(np.float32), flat[idx].astype(np.float64), labels[idx].astype(np.int64)
