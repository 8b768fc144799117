"""Time the evaluators on a synthetic problem: ``python -m eval.benchmark [--images 5000] [--detections 100000]``.

Ground truth: 1-5 boxes per image over 20 classes (10% difficult); detections: half jittered copies of
ground-truth boxes, half random boxes, random scores. Prints the median of ``--runs`` runs per rule.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from rcnn.datasets import Annotation, DetectionDataset, ImageRecord

from .detections import Detections
from .stage import evaluate


def synthetic(n_images: int, n_detections: int, n_classes: int = 20, seed: int = 0):
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n_images):
        g = int(rng.integers(1, 6))
        xy, wh = rng.uniform(0, 400, (g, 2)), rng.uniform(10, 200, (g, 2))
        boxes = np.concatenate([xy, xy + wh], 1).astype(np.float32)
        ann = Annotation(boxes, rng.integers(0, n_classes, g), rng.random(g) < 0.1, 640, 640)
        records.append(ImageRecord(i, Path(f"/synthetic/{i}.jpg"), "synthetic", ann))
    classes = [f"class{k}" for k in range(n_classes)]
    ds = DetectionDataset("synthetic", classes, records, {"test": list(range(n_images))}, "test", "test")
    image = rng.integers(0, n_images, n_detections)
    boxes = np.zeros((n_detections, 4), np.float32)
    labels = rng.integers(0, n_classes, n_detections)
    for k in range(n_detections):
        a = records[image[k]].annotation
        if k % 2 == 0:
            j = rng.integers(len(a.boxes))
            boxes[k], labels[k] = a.boxes[j] + rng.normal(0, 5, 4), a.labels[j]
        else:
            xy = rng.uniform(0, 400, 2)
            boxes[k] = [*xy, *(xy + rng.uniform(10, 200, 2))]
    boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 1)
    return ds, Detections(image.astype(np.int64), labels.astype(np.int64), rng.random(n_detections), boxes)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--images", type=int, default=5000)
    ap.add_argument("--detections", type=int, default=100_000)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args(argv)
    ds, dets = synthetic(args.images, args.detections)
    from .coco import coco_backend, coco_eval

    fast = coco_backend("auto") == "faster"
    runs = []
    for _ in range(args.runs):
        start = time.perf_counter()
        out = evaluate(dets, ds, "test", coco_backend="pycocotools")
        runs.append({**out["seconds"], "total": time.perf_counter() - start})
        if fast:
            start = time.perf_counter()
            faster = coco_eval(dets, ds, "test", "faster")
            runs[-1]["coco_faster"] = time.perf_counter() - start
    median = {k: float(np.median([r[k] for r in runs])) for k in runs[0]}
    print(f"{args.detections} detections over {args.images} images, median of {args.runs} runs (seconds):")
    print("  " + ", ".join(f"{k} {v:.2f}" for k, v in median.items()) + " (coco: pycocotools)")
    print(f"  (VOC07 mAP {out['voc07']['map']:.4f}, COCO AP {out['coco']['stats']['ap']:.4f})")
    if fast:
        same = all(np.isclose(out["coco"]["stats"][k], v, atol=1e-12, equal_nan=True) for k, v in faster["stats"].items())
        print(f"  faster-coco-eval: {median['coco_faster']:.2f} s, {median['coco'] / median['coco_faster']:.1f}x "
              f"pycocotools; the twelve figures {'identical' if same else 'DIFFER'}")  # fmt: skip
    else:
        print('  faster-coco-eval is not installed (pip install -e ".[fast]"): pycocotools only')
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
