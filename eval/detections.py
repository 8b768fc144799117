"""Detections as arrays, and their file format: a COCO-results JSON list.

File: ``[{"image_id", "category_id", "bbox": [x, y, w, h], "score"}, ...]`` with the dataset's own image
ids (ints for COCO, strings for VOC/ILSVRC) and category ids (COCO's own; ``label + 1`` for others).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rcnn import boxes as B
from rcnn.datasets import DatasetError, DetectionDataset
from rcnn.datasets.base import read_json
from rcnn.store import write_json

__all__ = ["Detections", "DetectionsError", "load_detections", "save_detections", "by_class", "class_order"]


class DetectionsError(DatasetError):
    """A detections file that does not fit the dataset; the message names the file and the entry."""


@dataclass(frozen=True)
class Detections:
    """Detections on one split. image: int64 [D] index into the split's image ids; labels int64 [D];
    scores float64 [D]; boxes float32 [D, 4] continuous xyxy."""

    image: np.ndarray
    labels: np.ndarray
    scores: np.ndarray
    boxes: np.ndarray

    @staticmethod
    def empty() -> "Detections":
        return Detections(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0), np.zeros((0, 4), np.float32))

    def __len__(self) -> int:
        return len(self.scores)


def load_detections(path: str | Path, ds: DetectionDataset, split: str) -> Detections:
    """Read and check a COCO-results file against the dataset's split."""
    path = Path(path)
    try:
        data = read_json(path, "detections file")
    except DatasetError as e:
        raise DetectionsError(str(e)) from None
    if not isinstance(data, list):
        raise DetectionsError(f"{path}: expected a JSON list of detections (COCO results format)")
    ids = ds.image_ids(split)
    index = {image_id: k for k, image_id in enumerate(ids)}
    label_of = {cat: k for k, cat in enumerate(ds.category_ids)}
    n = len(data)
    image, labels = np.zeros(n, np.int64), np.zeros(n, np.int64)
    scores, xywh = np.zeros(n), np.zeros((n, 4))
    for k, d in enumerate(data):
        where = f"{path}: detection {k}"
        if not isinstance(d, dict):
            raise DetectionsError(f"{where}: not an object")
        try:
            image_id, cat, bbox, score = d["image_id"], d["category_id"], d["bbox"], d["score"]
        except KeyError as e:
            raise DetectionsError(f"{where}: missing {e.args[0]!r}") from None
        if image_id not in index:
            hint = ""
            if str(image_id) in {str(i) for i in ids[:1000]}:
                hint = " (the dataset's ids are " + type(ids[0]).__name__ + "s)"
            raise DetectionsError(f"{where}: image_id {image_id!r} is not an image of split '{split}'{hint}")
        if cat not in label_of:
            raise DetectionsError(
                f"{where}: category_id {cat!r} is not a category of {ds.name} (ids {list(ds.category_ids)[:10]}...)"
            )
        if not (isinstance(bbox, (list, tuple)) and len(bbox) == 4) or not all(
            isinstance(v, (int, float)) and math.isfinite(v) for v in bbox
        ):
            raise DetectionsError(f"{where}: bbox {bbox!r} is not [x, y, w, h] of finite numbers")
        if bbox[2] < 0 or bbox[3] < 0:
            raise DetectionsError(f"{where}: bbox {bbox!r} has a negative width or height")
        if not isinstance(score, (int, float)) or not math.isfinite(score):
            raise DetectionsError(f"{where}: score {score!r} is not a finite number")
        image[k], labels[k], scores[k], xywh[k] = index[image_id], label_of[cat], score, bbox
    return Detections(image, labels, scores, B.xywh_to_xyxy(xywh))


def save_detections(path: str | Path, dets: Detections, ds: DetectionDataset, split: str) -> Path:
    """Write detections as a COCO-results JSON (atomically)."""
    ids = ds.image_ids(split)
    xywh = B.xyxy_to_xywh(dets.boxes)
    out = [
        {
            "image_id": ids[int(i)],
            "category_id": int(ds.category_ids[int(c)]),
            "bbox": [round(float(v), 2) for v in b],
            "score": round(float(s), 5),
        }
        for i, c, b, s in zip(dets.image, dets.labels, xywh, dets.scores)
    ]
    return write_json(path, out)


def ground_truth(ds: DetectionDataset, split: str) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per image of the split, in order: ``(boxes [G, 4], labels [G], difficult [G])``."""
    out = []
    for image_id in ds.image_ids(split):
        a = ds.annotation(image_id)
        out.append((a.boxes, a.labels, a.difficult))
    return out


def class_order(dets: Detections, label: int) -> np.ndarray:
    """Indices of one class's detections, best score first (stable for ties, as MATLAB's sort)."""
    sel = np.flatnonzero(dets.labels == label)
    return sel[np.argsort(-dets.scores[sel], kind="stable")]


def by_class(dets: Detections, label: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One class's detections, best score first: ``(image [d], scores [d], boxes [d, 4])``."""
    order = class_order(dets, label)
    return dets.image[order], dets.scores[order], dets.boxes[order]
