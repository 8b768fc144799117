"""COCO AP through COCOeval (AP over IoU 0.50:0.95, AP50, AP75, by size, AR): faster-coco-eval's C++
port where it is installed, else pycocotools' (the reference; ``eval.coco_backend`` chooses).

Ground truth comes from the dataset's split: category ids are the dataset's (COCO's own for COCO),
``difficult``/crowd boxes become ``iscrowd=1`` (ignored by COCOeval), areas are the annotations' own
(COCO's segmentation areas, which decide small/medium/large) or else box areas, annotation
ids start at 1 (0 means "unmatched" inside COCOeval). Integer image ids are kept; other ids are
numbered 1..N in split order.
"""

from __future__ import annotations

import contextlib
import io

import numpy as np

from rcnn import boxes as B
from rcnn.datasets import DatasetError, DetectionDataset

from .detections import Detections

__all__ = ["coco_eval", "coco_backend", "coco_gt", "coco_api", "coco_results"]

STAT_NAMES = [
    "ap", "ap50", "ap75", "ap_small", "ap_medium", "ap_large",
    "ar1", "ar10", "ar100", "ar_small", "ar_medium", "ar_large",
]  # fmt: skip


def _image_ids(ids: list) -> list[int]:
    if all(isinstance(i, (int, np.integer)) for i in ids):
        return [int(i) for i in ids]
    return list(range(1, len(ids) + 1))


def coco_gt(ds: DetectionDataset, split: str) -> dict:
    """The split's ground truth as a COCO instances dict."""
    ids = ds.image_ids(split)
    coco_ids = _image_ids(ids)
    images, anns = [], []
    for image_id, cid in zip(ids, coco_ids):
        a = ds.annotation(image_id)
        images.append({"id": cid, "width": a.width, "height": a.height})
        xywh = B.xyxy_to_xywh(a.boxes)
        areas = a.area if a.area is not None else xywh[:, 2] * xywh[:, 3]
        for box, label, crowd, area in zip(xywh, a.labels, a.difficult, areas):
            anns.append({
                "id": len(anns) + 1, "image_id": cid, "category_id": int(ds.category_ids[label]),
                "bbox": [float(v) for v in box], "area": float(area), "iscrowd": int(crowd),
            })  # fmt: skip
    cats = [{"id": int(c), "name": n} for c, n in zip(ds.category_ids, ds.classes)]
    # "info" and "licenses" are empty but present: pycocotools 2.0.10's loadRes copies dataset["info"]
    return {"info": {}, "licenses": [], "images": images, "annotations": anns, "categories": cats}


def coco_api(dataset: dict):
    """A pycocotools COCO object over an instances dict (its index built quietly)."""
    from pycocotools.coco import COCO

    api = COCO()
    api.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        api.createIndex()
    return api


def coco_results(dets: Detections, ds: DetectionDataset, split: str) -> list[dict]:
    """Detections as a COCO results list with the ids :func:`coco_gt` gives the split's images."""
    coco_ids = _image_ids(ds.image_ids(split))
    return [
        {"image_id": coco_ids[int(i)], "category_id": int(ds.category_ids[int(c)]),
         "bbox": [float(v) for v in b], "score": float(s)}
        for i, c, b, s in zip(dets.image, dets.labels, B.xyxy_to_xywh(dets.boxes), dets.scores)
    ]  # fmt: skip


def coco_backend(name: str = "auto") -> str:
    """The COCOeval implementation to run: ``faster`` (faster-coco-eval, C++; the default when it is
    installed: the same twelve figures to 1e-12, checked by the tests) or ``pycocotools`` (the reference)."""
    if name == "pycocotools":
        return name
    try:
        import faster_coco_eval  # noqa: F401
    except ImportError:
        if name == "faster":
            raise DatasetError("eval.coco_backend=faster needs faster-coco-eval: pip install -e \".[fast]\" "
                               "(or eval.coco_backend=pycocotools)") from None  # fmt: skip
        return "pycocotools"
    return "faster"


def coco_eval(dets: Detections, ds: DetectionDataset, split: str, backend: str = "auto") -> dict:
    """``{"stats": {ap, ap50, ...}, "per_class_ap": [C] (NaN without ground truth), "summary": text,
    "backend": which ran}`` (``backend``: see :func:`coco_backend`)."""
    backend = coco_backend(backend)
    gt_dict = coco_gt(ds, split)
    results = coco_results(dets, ds, split)
    nan_stats = {name: float("nan") for name in STAT_NAMES}
    if not results or not gt_dict["annotations"]:
        # COCOeval cannot load an empty result list; with nothing detected every AP is 0.
        zero = 0.0 if gt_dict["annotations"] else float("nan")
        per_class = [zero if any(a["category_id"] == c for a in gt_dict["annotations"]) else float("nan")
                     for c in ds.category_ids]  # fmt: skip
        return {"stats": {k: zero for k in nan_stats}, "per_class_ap": per_class, "summary": "", "backend": backend}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        if backend == "faster":
            from faster_coco_eval import COCO as FasterCOCO
            from faster_coco_eval import COCOeval_faster

            gt = FasterCOCO(gt_dict)
            ev = COCOeval_faster(gt, gt.loadRes(results), iouType="bbox", print_function=print)
        else:
            from pycocotools.cocoeval import COCOeval

            gt = coco_api(gt_dict)
            ev = COCOeval(gt, gt.loadRes(results), iouType="bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    stats = {name: (float(v) if v >= 0 else float("nan")) for name, v in zip(STAT_NAMES, ev.stats[:12])}  # -1: undefined
    precision = ev.eval["precision"]  # [T, R, K, A, M]: area "all" is 0, maxDets 100 is the last
    per_class = []
    for k in range(precision.shape[2]):
        p = precision[:, :, k, 0, -1]
        per_class.append(float(p[p > -1].mean()) if (p > -1).any() else float("nan"))
    order = {c: k for k, c in enumerate(ev.params.catIds)}
    per_class = [per_class[order[int(c)]] for c in ds.category_ids]
    return {"stats": stats, "per_class_ap": per_class, "summary": out.getvalue(), "backend": backend}
