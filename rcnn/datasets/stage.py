"""``stage=data``: load the dataset, decode and check every image, count boxes and classes."""

from __future__ import annotations

import logging
import time
from functools import partial

import numpy as np

from .. import distributed
from ..config import to_dict
from ..parallel import process_images
from ..shard import mine, pending
from ..stages import found
from ..store import StageStore
from .base import DetectionDataset

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: crowd flags


# Where a dataset is, not what it is: left out of the key, which the fingerprint of the contents makes (a copy
# of the tree in another folder or on another machine shares the cache)
LOCATION_KEYS = ("name", "root", "train_json", "train_images", "test_json", "test_images")


def data_store(ctx) -> StageStore:
    """The data stage's store: keyed by the dataset settings (less its location) and a fingerprint of its
    contents (``DetectionDataset.fingerprint``)."""
    ds = ctx.dataset
    settings = {k: v for k, v in to_dict(ctx.cfg.dataset).items() if k not in LOCATION_KEYS}
    settings.update(train_split=ds.train_split, test_split=ds.test_split)  # as chosen where a name is "auto"
    return StageStore(ctx.run_dir, "data", {"dataset": settings, "fingerprint": ds.fingerprint()}, version=FORMAT_VERSION)


def check_image(ds: DetectionDataset, image_id) -> dict[str, np.ndarray]:
    """Decode one image (raising a DatasetError naming it if bad) and return its ground truth."""
    img = ds.load_image(image_id)
    a = ds.annotation(image_id)
    return {
        "boxes": a.boxes,
        "labels": a.labels,
        "difficult": a.difficult,
        "crowd": a.crowd,
        "size": np.array(img.shape[:2], dtype=np.int64),
    }


def format_table(metrics: dict) -> str:
    rows = [("split", "images", "boxes", "classes", "difficult")]
    for split, s in metrics["splits"].items():
        rows.append((split, s["images"], s["boxes"], s["classes"], s["difficult"]))
    widths = [max(len(str(r[k])) for r in rows) for k in range(len(rows[0]))]
    lines = ["  ".join(str(v).rjust(w) if k else str(v).ljust(w) for k, (v, w) in enumerate(zip(r, widths))) for r in rows]
    return "\n".join(lines)


def run(ctx) -> dict:
    start = time.perf_counter()
    ds = ctx.dataset
    store = data_store(ctx)
    splits = list(dict.fromkeys([ds.train_split, ds.test_split]))
    ids = [i for split in splits for i in ds.image_ids(split)]
    if not store.complete or store.missing(ids):
        ctx.building(store, found(store, ids))
    computed = 0
    for split in splits:
        computed += process_images(
            store,
            mine(ctx.cfg, ds.image_ids(split)),
            partial(check_image, ds),
            workers=ctx.workers,
            ray=ctx.ray,
            progress=ctx.cfg.progress,
            desc=f"data {split}",
        )
    if waiting := pending(ctx.cfg, store, ids, "data"):
        return waiting
    computed = distributed.total(computed)  # under torchrun: every rank's
    seconds = time.perf_counter() - start
    metrics = {
        "stage": "data",
        "dataset": ds.name,
        "key": store.key,
        "num_classes": ds.num_classes,
        "classes": list(ds.classes),
        "splits": (stats := {split: ds.split_stats(split) for split in splits}),
        # classes the detector cannot learn: not one box of theirs (difficult or not) in the train split
        "classes_without_training_boxes": [c for c in ds.classes if c not in stats[ds.train_split]["boxes_per_class"]],
        "boxes_clipped": ds.report.clipped,
        "boxes_dropped": ds.report.dropped,
        "images_checked_now": computed,
        "seconds": round(seconds, 3),
    }
    store.finish(metrics)
    print(f"{ds.name}: {ds.num_classes} classes")
    print(format_table(metrics))
    if ds.report.clipped or ds.report.dropped:
        print(f"boxes clipped: {ds.report.clipped}, dropped: {ds.report.dropped} (see the warnings above)")
    if missing := metrics["classes_without_training_boxes"]:
        log.warning("%s: no box in the train split '%s': the detector cannot learn %s (AP 0 where the test split "
                    "has them)", ", ".join(missing), ds.train_split, "it" if len(missing) == 1 else "them")  # fmt: skip
    return metrics
