"""``stage=eval``: VOC 2007 / VOC 2010+ / ILSVRC / COCO AP of a detections file on the test split."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import time
from pathlib import Path

from rcnn.datasets.stage import data_store
from rcnn.store import StageStore, StoreError, atomic_write

from .analyze import ANALYSIS_VERSION, MULTIPLES, findings
from .coco import coco_eval
from .detections import ground_truth, load_detections
from .report import markdown, plot_errors, plot_pr, plot_pr_breakdown, plot_sensitivity
from .voc import ilsvrc_eval, voc_eval

FORMAT_VERSION = 1

log = logging.getLogger("rcnn")


def _num(v):
    """NaN (a class without ground truth) -> None, so metrics.json stays strict JSON."""
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else round(float(v), 6)


def detections_path(ctx) -> Path | None:
    """``detections=PATH``, else this configuration's detections on the test split (stage=detect, run
    now unless cached, as every stage builds what it needs); None while a sharded detect waits for
    other shards."""
    if ctx.cfg.detections:
        return Path(ctx.cfg.detections)
    from rcnn.stages import run_stage

    m = run_stage(ctx, "detect")
    return None if m.get("complete") is False else Path(m["detections_file"])


def evaluate(dets, ds, split: str, iou_threshold: float = 0.5, coco_backend: str = "auto") -> dict:
    """Every metric of one detections set on ``ds``'s ``split``; APs as fractions, NaN where undefined
    (``coco_backend``: ``eval.coco_backend``)."""
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
    coco = coco_eval(dets, ds, split, coco_backend)
    times["coco"] = time.perf_counter() - t
    return {"voc07": voc07, "voc": voc, "ilsvrc": ilsvrc, "coco": coco, "seconds": times}


def run_eval(ctx) -> dict:
    cfg, ds = ctx.cfg, ctx.dataset
    split = ds.test_split
    path = detections_path(ctx)
    if path is None:
        log.info("stage eval: stage detect waits for other shards' images; the last shard to finish evaluates")
        return {"stage": "eval", "complete": False}
    dets = load_detections(path, ds, split)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    params = {"detections_sha256": digest, "iou_threshold": cfg.eval.iou_threshold}
    if cfg.eval.analyze:  # (a key without these when it is off: the caches of plain evaluations stay valid)
        params["analysis"] = {"version": ANALYSIS_VERSION, "groups": [list(g) for g in cfg.eval.groups],
                              "top_multiple": cfg.eval.top_multiple, "gallery_size": cfg.eval.gallery_size}  # fmt: skip
    proposals = proposals_detected_on(ctx) if cfg.eval.analyze else None
    if proposals is not None:  # (the analysis tells the objects they missed)
        params["analysis"]["proposals"] = proposals.key
    store = StageStore(ctx.run_dir, "eval", params, inputs={"data": data_store(ctx).key}, version=FORMAT_VERSION)
    outputs = ["report.md", "pr_curves.png"] + (["report.html"] if cfg.eval.analyze else [])
    if store.complete and all((store.dir / name).exists() for name in ["metrics.json", *outputs]):
        # Evaluated before (under torchrun: by rank 0, while this rank waited): read, not recomputed
        metrics = json.loads((store.dir / "metrics.json").read_text())
        _publish(store, outputs, cfg.eval.analyze)
        store.finish(metrics)
        log.info("evaluation of %s cached in %s", path, store.dir)
        print((store.dir / "report.md").read_text().split("\n\n| class")[0])
        return metrics
    r = evaluate(dets, ds, split, cfg.eval.iou_threshold, cfg.eval.coco_backend.value)
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
        "coco_backend": r["coco"]["backend"],
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
    plot_pr(r["voc"]["curves"], r["voc"]["ap"], list(ds.classes), store.dir / "pr_curves.png",
            f"{ds.name} {split}: VOC precision/recall")  # fmt: skip
    if cfg.eval.analyze:
        t = time.perf_counter()
        metrics["analysis"] = analyze_and_report(ctx, dets, metrics, store.dir, proposals)
        metrics["seconds"]["analysis"] = round(time.perf_counter() - t, 3)
    report = markdown(metrics, list(ds.classes))
    atomic_write(store.dir / "report.md", lambda f: f.write(report.encode()))
    _publish(store, outputs, cfg.eval.analyze)
    store.finish(metrics)
    print(report.split("\n\n| class")[0])
    if cfg.eval.analyze:
        print("\n".join(findings(metrics["analysis"])))
        print(f"report: {store.stage_dir / 'report.html'} (open it in a browser), {store.stage_dir / 'report.md'}")
    return metrics


def _publish(store: StageStore, outputs: list[str], analyze: bool) -> None:
    """The evaluation's files in the stage folder (``<out>/eval/``), the latest evaluation's alone: no older
    analysis beside a plain one."""
    for name in outputs:
        shutil.copyfile(store.dir / name, store.stage_dir / name)
    if not analyze:
        (store.stage_dir / "report.html").unlink(missing_ok=True)


def run_analyze(ctx) -> dict:
    """``stage=analyze``: the evaluation with its error analysis."""
    ctx.cfg.eval.analyze = True
    return run_eval(ctx)


def _strict(x):
    """NaN -> None in nested dicts, so metrics.json stays strict JSON."""
    if isinstance(x, dict):
        return {k: _strict(v) for k, v in x.items()}
    if isinstance(x, float) and math.isnan(x):
        return None
    return x


def _backbone_notes(ctx) -> list[str]:
    """A warning for the report when this run's detector was trained on a randomly initialised backbone."""
    if ctx.cfg.detections:
        return []
    svm = ctx.results.get("svm")
    if svm is None:
        try:
            svm = json.loads((ctx.run_dir / "svm" / "metrics.json").read_text())
        except (OSError, ValueError):
            return []
    if svm.get("backbone_weights") == "none":
        return ["The detector's features come from a randomly initialised GoogLeNet (backbone_weights: none): "
                "no ImageNet or pretrained weights. Expect far lower figures than R-CNN's."]  # fmt: skip
    if svm.get("backbone_weights") == "imagenette":
        return [("The detector's features come from the repository's own GoogLeNet, trained on imagenette's 10 "
                 "classes (backbone_weights: imagenette), not ImageNet's 1000: expect lower figures than R-CNN's.")]  # fmt: skip
    return []


def proposals_detected_on(ctx) -> StageStore | None:
    """The proposals store this run's detections were made from, or None where it is not known (detections
    from a file, ``detections=PATH``; the store removed)."""
    if ctx.cfg.detections:
        return None
    from rcnn.stages import run_stage

    try:
        detect = StageStore.open(ctx.run_dir, "detect", run_stage(ctx, "detect")["key"])
        store = StageStore.open(ctx.run_dir, "proposals", detect.identity["inputs"]["proposals"])
        gone = store.missing(ctx.dataset.image_ids(ctx.dataset.test_split))
        why = f"no proposals entry for image {gone[0]!r} in {store.dir}" if gone else None
    except StoreError as e:
        why = str(e)
    if why is None:
        return store
    log.warning("the error analysis goes without the test proposals (%s): it cannot tell which objects none reached", why)
    return None


def analyze_and_report(ctx, dets, metrics: dict, out_dir: Path, proposals: StageStore | None = None) -> dict:
    """The error analysis of ``dets`` (:mod:`eval.analyze`), its plots in ``out_dir/analysis/`` and
    ``out_dir/report.html``; returns the ``analysis`` section of metrics.json. ``proposals``: the store of the
    proposals the detections were made from, when known."""
    from .analyze import analyze
    from .html import galleries, write_html

    cfg, ds = ctx.cfg, ctx.dataset
    split = ds.test_split
    boxes = None if proposals is None else [proposals.get(i)["boxes"] for i in ds.image_ids(split)]
    a = analyze(dets, ds, split, [list(g) for g in cfg.eval.groups], cfg.eval.top_multiple, cfg.eval.iou_threshold,
                boxes)  # fmt: skip
    section = _strict(a.metrics())
    plots_dir = out_dir / "analysis"
    plots_dir.mkdir(exist_ok=True)
    valid = a.pr["classes_with_objects"]
    prec, rec = a.pr["precision"], a.pr["recall"]
    plots = {
        "pr_curves": out_dir / "pr_curves.png",
        "overall_errors": plot_errors(a.curve(valid), MULTIPLES, plots_dir / "errors.png", "all classes: error types"),
        "overall_pr": plot_pr_breakdown(prec[:, :, valid].mean(axis=2) if valid else prec[:, :, :0].sum(axis=2),
                                        rec, plots_dir / "pr_breakdown.png", "all classes: PR breakdown"),
        "sensitivity": plot_sensitivity(a.sensitivity, plots_dir / "sensitivity.png", "all classes: sensitivity"),
    }  # fmt: skip
    for k in valid:
        name = ds.classes[k]
        plots[f"errors_{k}"] = plot_errors(a.curve([k]), MULTIPLES, plots_dir / f"errors_{k}.png", f"{name}: error types")
        plots[f"pr_{k}"] = plot_pr_breakdown(prec[:, :, k], rec, plots_dir / f"pr_{k}.png", f"{name}: PR breakdown")
    thumbs = galleries(a, dets, ds, split, cfg.eval.gallery_size)
    write_html(out_dir / "report.html", {**metrics, "analysis": section}, a, plots, thumbs, _backbone_notes(ctx))
    return section
