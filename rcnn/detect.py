"""``stage=detect``: the detector on the test split (COCO-results JSON for ``stage=eval``), or on
``image=PATH_OR_FOLDER`` (boxes drawn into PNGs).

Test split: every proposal scored by every SVM (several detectors' scores averaged with
``ensemble=[...]``), box regression, clipping, per class its ``detect.max_per_class`` best boxes then NMS, and over the split each class's best
``detect.max_per_class_split`` per image (``rcnn_test.m``'s rules: classes are not ranked against each other).
Per-image results are cached under ``<out>/detect/<key>/`` (a killed run resumes), then written as
``<out>/detect/detections.json`` with the dataset's image and category ids.
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from . import boxes as B
from . import distributed
from .config import asked_scores
from .detector import Detector, DetectorError, check_ensemble, detect_image, ensemble_outputs, postprocess
from .shard import mine, pending
from .store import StageStore, atomic_write, write_json

__all__ = ["run_detect", "detect_split", "detect_files", "image_files", "load_members"]

log = logging.getLogger("detect")

FORMAT_VERSION = 2  # 2: box regression as one matrix product (other float rounding)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


def _file_hash(path: str | Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def detector_files(ctx) -> list[Path]:
    """The detector files to run: ``ensemble``, else ``detector``, else this run's own (trained if needed)."""
    from .stages import run_stage

    cfg = ctx.cfg
    if cfg.ensemble:
        return [Path(p) for p in cfg.ensemble]
    if cfg.detector:
        return [Path(cfg.detector)]
    return [Path(run_stage(ctx, "svm")["detector"])]


def load_members(ctx, files: list[Path]) -> list[Detector]:
    scores = asked_scores(ctx.cfg)  # None: each detector's own
    members = [Detector.load(p, ctx.cfg.device.value, scores) for p in files]
    check_ensemble(members)  # before any work
    return members


def nms_iou(d, members: list[Detector]) -> float | tuple[float, ...]:
    """``detect.nms_iou``, or where it is null the (first) detector's own overlap of each class."""
    return float(d.nms_iou) if d.nms_iou is not None else members[0].nms_iou


def _settings(ctx, members: list[Detector]) -> dict:
    d = ctx.cfg.detect
    return {"nms_iou": nms_iou(d, members), "max_per_image": d.max_per_image, "max_per_class": d.max_per_class,
            "max_per_class_split": d.max_per_class_split, "box_regression": d.box_regression,
            "score_threshold": d.score_threshold, "scores": members[0].scores}  # fmt: skip


def draw_threshold(ctx, members: list[Detector]) -> float:
    """``detect.draw_threshold``, or by the kind of the scores: the SVM margin 0, or a probability of 0.5."""
    t = ctx.cfg.detect.draw_threshold
    return float(t) if t is not None else (0.5 if members[0].scores == "softmax" else 0.0)


def run_detect(ctx) -> dict:
    if ctx.cfg.image:
        return detect_files(ctx)
    return detect_split(ctx)


def _cached_features(ctx, member: Detector, proposals_key: str) -> StageStore | None:
    """The run's feature cache that ``member`` was trained on, when it holds this run's proposals."""
    key = member.features_key
    manifest = ctx.run_dir / "features" / str(key) / "manifest.json"
    if not key or not manifest.exists():
        return None
    store = StageStore.open(ctx.run_dir, "features", key)
    return store if store.identity["inputs"].get("proposals") == proposals_key else None


def detect_split(ctx) -> dict:
    from eval.detections import Detections, save_detections
    from features.stage import rows_entry

    from .stages import found, run_stage

    cfg, ds = ctx.cfg, ctx.dataset
    files = detector_files(ctx)
    members = load_members(ctx, files)
    if members[0].classes != list(ds.classes):
        raise DetectorError(f"{files[0]}: trained on other classes than {ds.name}'s ({members[0].classes[:5]}...)")
    proposals = StageStore.open(ctx.run_dir, "proposals", run_stage(ctx, "proposals")["key"])
    caches = [_cached_features(ctx, m, proposals.key) for m in members]
    store = StageStore(
        ctx.run_dir, "detect", {"detect": _settings(ctx, members), "detectors": [_file_hash(p) for p in files]},
        inputs={"proposals": proposals.key}, version=FORMAT_VERSION,
    )  # fmt: skip
    split = ds.test_split
    ids = ds.image_ids(split)
    todo = store.missing(mine(cfg, ids))  # (a shard's images: rcnn/shard.py)
    if todo or not store.complete:
        ctx.building(store, found(store, ids))
    d = cfg.detect
    start = time.perf_counter()
    bar = tqdm(total=len(todo), desc="detect", unit="img", disable=not cfg.progress)

    def cached(cache, image_id):  # a member's features of every proposal, or None (computed from the image then)
        if cache is None or cache.has(rows_entry(image_id)):  # (a train image's regressor rows only: not every one)
            return None
        return cache.get_array(image_id)

    def inputs(image_id) -> tuple:  # its proposals, and each member's cached features of them (or None)
        return proposals.get(image_id)["boxes"], [cached(c, image_id) for c in caches]

    if ctx.ray is not None and todo:  # executor=ray: Ray actors, one per GPU of the cluster (or per cpus_per_task CPUs)
        where = _ray_detect(ctx, members, store, todo, inputs, bar)
    else:
        where = str(members[0].device)
        for image_id in todo:
            store.put(image_id, detect_entry(members, ds, image_id, *inputs(image_id), d))
            bar.update()
    bar.close()
    seconds = time.perf_counter() - start
    if waiting := pending(cfg, store, ids, "detect"):
        return {**waiting, "images_computed_now": len(todo)}
    computed_now = distributed.total(len(todo))  # under torchrun: every rank's
    parts = [store.get(i) for i in ids]
    dets = Detections(
        image=np.concatenate([np.full(len(p["scores"]), k, np.int64) for k, p in enumerate(parts)] or [np.zeros(0, np.int64)]),
        labels=np.concatenate([p["labels"] for p in parts] or [np.zeros(0, np.int64)]).astype(np.int64),
        scores=np.concatenate([p["scores"] for p in parts] or [np.zeros(0)]).astype(np.float64),
        boxes=np.concatenate([p["boxes"] for p in parts] or [np.zeros((0, 4), np.float32)]).astype(np.float32),
    )  # fmt: skip
    if d.max_per_class_split is not None:
        dets = best_per_class(dets, round(d.max_per_class_split * len(ids)))
    out = save_detections(store.dir / "detections.json", dets, ds, split)
    data = out.read_bytes()
    atomic_write(store.stage_dir / "detections.json", lambda f: f.write(data))
    metrics = {
        "stage": "detect",
        "key": store.key,
        "split": split,
        "detectors": [str(p) for p in files],
        "features": ["cache" if c is not None else "computed" for c in caches],
        "device": where if todo else None,
        "images": len(ids),
        "images_computed_now": computed_now,
        "detections": len(dets),
        "detections_per_image": round(len(dets) / max(len(ids), 1), 2),
        "seconds_per_image": round(seconds / len(todo), 4) if todo else None,
        "detections_file": str(store.stage_dir / "detections.json"),
    }
    store.finish(metrics)
    print(f"detect: {len(ids)} images of {split}, {len(dets)} detections -> {metrics['detections_file']}")
    return metrics


def detect_entry(members: list[Detector], ds, image_id, boxes: np.ndarray, feats: list, d) -> dict:
    """One test image's store entry: its detections on ``boxes`` (its proposals), ``feats[k]`` member k's
    features of them when cached (else computed from the image), under the ``detect`` settings ``d``."""
    a = ds.annotation(image_id)
    rgb = ds.load_image(image_id) if any(f is None for f in feats) else None
    scores, deltas = ensemble_outputs(members, rgb, boxes, feats, d.box_regression)
    b, s, lab = postprocess(boxes, scores, deltas, a.width, a.height, nms_iou(d, members), d.max_per_image,
                            d.score_threshold, d.max_per_class)  # fmt: skip
    return {"boxes": b, "scores": s, "labels": lab}


class DetectActor:
    """A Ray actor holding the detectors (their networks on its GPU, or its CPUs): a test image's proposals
    and cached features in, its detections out."""

    def __init__(self, members: list[tuple[dict, str]], ds, d, threads: int = 1):
        from .parallel import actor_device

        device = actor_device(threads).type
        self.members = [Detector(parts, device, scores) for parts, scores in members]
        self.ds, self.d = ds, d

    def run(self, image_id, boxes: np.ndarray, feats: list) -> tuple:
        return image_id, detect_entry(self.members, self.ds, image_id, boxes, feats, self.d)


def _ray_detect(ctx, members: list[Detector], store: StageStore, todo: list, inputs, bar) -> str:
    """The detections of ``todo`` made by Ray actors (:func:`rcnn.parallel.ray_actors`), written here as
    they arrive; the proposals and cached features go to them from here (the run folder need not be
    shared). Bad data stops the stage with the local error; a dead actor is restarted and its task rerun."""
    from .parallel import on_actors, ray_actors

    parts = [(m.parts, m.scores) for m in members]
    actors = ray_actors(ctx.ray, ctx.workers, DetectActor, parts, ctx.dataset, ctx.cfg.detect)

    def receive(result):
        image_id, entry = result
        store.put(image_id, entry)
        bar.update()

    on_actors(actors, todo, lambda actor, image_id: actor.run.remote(image_id, *inputs(image_id)), receive)
    return actors.where


def best_per_class(dets, limit: int):
    """Each class's ``limit`` best detections over the whole split (ties at the cut kept in file order)."""
    from eval.detections import Detections

    keep = B.top_per_label(dets.scores, dets.labels, limit)
    return Detections(image=dets.image[keep], labels=dets.labels[keep], scores=dets.scores[keep], boxes=dets.boxes[keep])


def image_files(path: str | Path) -> list[Path]:
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise FileNotFoundError(f"{path}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
        return files
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such image or folder")
    return [path]


def _readable(files: list[Path]) -> list[Path]:
    """The files whose image header reads; each other one named in a warning (checked before any work)."""
    from .datasets.base import DatasetError, image_size

    ok = []
    for path in files:
        try:
            image_size(path)
            ok.append(path)
        except DatasetError as e:
            log.warning("skipped: %s", e)
    if not ok:
        raise FileNotFoundError(f"{files[0].parent if len(files) > 1 else files[0]}: no readable image")
    return ok


def detect_files(ctx) -> dict:
    """``image=PATH_OR_FOLDER``: detections.json (COCO results, image_id = file name) and a PNG per image
    with the detections scoring above ``detect.draw_threshold`` drawn. Earlier runs' PNGs are removed;
    an unreadable image is skipped with a warning naming it."""
    from .datasets.base import DatasetError, read_image
    from .viz import draw_detections, write_png

    cfg, d = ctx.cfg, ctx.cfg.detect
    listed = image_files(cfg.image)
    files = _readable(listed)
    members = load_members(ctx, detector_files(ctx))
    threshold = draw_threshold(ctx, members)
    category_ids = list(members[0].parts["category_ids"])
    out_dir = ctx.run_dir / "detect" / "images"
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("*.png"):  # detections.json below covers this run's images only
        old.unlink()
    results, seconds, drawn, skipped = [], [], {}, []
    for path in tqdm(files, desc="detect", unit="img", disable=not cfg.progress):
        try:
            rgb = read_image(path, orient=True)  # as a viewer shows the photo (a phone's EXIF orientation applied)
        except DatasetError as e:  # a header that read, pixels that did not (a truncated file)
            log.warning("skipped: %s", e)
            skipped.append(path.name)
            continue
        t = time.perf_counter()
        det = detect_image(members, rgb, None, nms_iou(d, members), d.max_per_image, d.box_regression, d.score_threshold,
                           d.max_per_class)  # fmt: skip
        seconds.append(time.perf_counter() - t)
        shown = det.scores > threshold
        names = [n for n, keep in zip(det.names, shown) if keep]
        write_png(out_dir / f"{path.stem}.png", draw_detections(rgb, det.boxes[shown], names, det.scores[shown]))
        drawn[path.name] = {"drawn": int(shown.sum()), "best_score": round(float(det.scores.max()), 4) if len(det.scores) else None}
        for b, s, lab, name in zip(det.boxes, det.scores, det.labels, det.names):
            x1, y1, x2, y2 = (float(v) for v in b)
            results.append({"image_id": path.name, "category_id": category_ids[lab], "category": name,
                            "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
                            "score": round(float(s), 5)})  # fmt: skip
    write_json(out_dir / "detections.json", results)
    metrics = {
        "stage": "detect",
        "images": len(drawn),
        "skipped": [p.name for p in listed if p not in files] + skipped,
        "detections": len(results),
        "drawn_per_image": drawn,
        "scores": members[0].scores,
        "draw_threshold": threshold,
        "seconds_per_image": round(float(np.median(seconds)), 3) if seconds else None,
        "output": str(out_dir),
    }
    write_json(out_dir / "metrics.json", metrics)
    for name, r in list(drawn.items())[:20]:
        best = "" if r["drawn"] else f" (best score {r['best_score']})" if r["best_score"] is not None else " (no detections)"
        print(f"  {name}: {r['drawn']} box(es) drawn{best}")
    if len(drawn) > 20:
        print(f"  ... and {len(drawn) - 20} more (metrics.json: drawn_per_image)")
    empty = sum(not r["drawn"] for r in drawn.values())
    print(f"detect: {len(drawn)} image(s), {len(results)} detections; boxes scoring above {threshold} drawn in "
          f"{out_dir}" + (f"; {empty} image(s) with none drawn: lower detect.draw_threshold to see weaker ones" if empty else ""))  # fmt: skip
    return metrics
