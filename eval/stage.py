"""``stage=eval``: VOC 2007 / VOC 2010+ / ILSVRC / COCO AP of a detections file on the test split."""

from __future__ import annotations

import hashlib
import math
import shutil
import time
from pathlib import Path

from rcnn.datasets.stage import data_store
from rcnn.store import StageStore, atomic_write

from .coco import coco_eval
from .detections import ground_truth, load_detections
from .report import markdown, plot_pr
from .voc import ilsvrc_eval, voc_eval

FORMAT_VERSION = 1


def _num(v):
    """NaN (a class without ground truth) -> None, so metrics.json stays strict JSON."""
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else round(float(v), 6)


def detections_path(ctx) -> Path:
    """``detections=PATH``, else this configuration's detections on the test split (stage=detect, run
    now unless cached, as every stage builds what it needs)."""
    if ctx.cfg.detections:
        return Path(ctx.cfg.detections)
    from rcnn.stages import run_stage

    return Path(run_stage(ctx, "detect")["detections_file"])


def evaluate(dets, ds, split: str, iou_threshold: float = 0.5) -> dict:
    """Every metric of one detections set on ``ds``'s ``split``; APs as fractions, NaN where undefined."""
    gts = ground_truth(ds, split)
    index = {image_id: k for k, image_id in enumerate(ds.image_ids(split))}
    blacklist = [(index[i], c) for i, c in ds.blacklist if i in index]
    times = {}
    t = time.perf_counter()
    voc07 = voc_eval(dets, gts, ds.num_classes, iou_threshold, use_07_metric=True)
    times["voc07"] = time.perf_counter() - t
    t = time.perf_counter()
    voc = voc_eval(dets, gts, ds.num_classes, iou_threshold, use_07_metric=False)
    times["voc"] = time.perf_counter() - t
    t = time.perf_counter()
    ilsvrc = ilsvrc_eval(dets, gts, ds.num_classes, blacklist)
    times["ilsvrc"] = time.perf_counter() - t
    t = time.perf_counter()
    coco = coco_eval(dets, ds, split)
    times["coco"] = time.perf_counter() - t
    return {"voc07": voc07, "voc": voc, "ilsvrc": ilsvrc, "coco": coco, "seconds": times}


def run_eval(ctx) -> dict:
    cfg, ds = ctx.cfg, ctx.dataset
    split = ds.test_split
    path = detections_path(ctx)
    dets = load_detections(path, ds, split)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    store = StageStore(
        ctx.run_dir, "eval", {"detections_sha256": digest, "iou_threshold": cfg.eval.iou_threshold},
        inputs={"data": data_store(ctx).key}, version=FORMAT_VERSION,
    )  # fmt: skip
    r = evaluate(dets, ds, split, cfg.eval.iou_threshold)
    coco = r["coco"]["stats"]
    metrics = {
        "stage": "eval",
        "key": store.key,
        "dataset": ds.name,
        "split": split,
        "detections": str(path),
        "detections_count": len(dets),
        "voc07_map": _num(r["voc07"]["map"]),
        "voc_map": _num(r["voc"]["map"]),
        "ilsvrc_map": _num(r["ilsvrc"]["map"]),
        "coco_map": _num(coco["ap"]),
        "coco_map50": _num(coco["ap50"]),
        "coco_map75": _num(coco["ap75"]),
        "coco": {k: _num(v) for k, v in coco.items()},
        "per_class": {
            name: {
                "voc07": _num(r["voc07"]["ap"][k]),
                "voc": _num(r["voc"]["ap"][k]),
                "ilsvrc": _num(r["ilsvrc"]["ap"][k]),
                "coco": _num(r["coco"]["per_class_ap"][k]),
            }
            for k, name in enumerate(ds.classes)
        },
        "seconds": {k: round(v, 3) for k, v in r["seconds"].items()},
    }
    report = markdown(metrics, list(ds.classes))
    atomic_write(store.dir / "report.md", lambda f: f.write(report.encode()))
    plot_pr(r["voc"]["curves"], r["voc"]["ap"], list(ds.classes), store.dir / "pr_curves.png",
            f"{ds.name} {split}: VOC precision/recall")  # fmt: skip
    for name in ("report.md", "pr_curves.png"):
        shutil.copyfile(store.dir / name, store.stage_dir / name)
    store.finish(metrics)
    print(report.split("\n\n| class")[0])
    return metrics
