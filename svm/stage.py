"""``stage=svm``: per-class SVMs (hard-negative mining) and box regressors on the train split's cached
features, saved as one detector file ``<out>/svm/<key>/detector.pt`` (linked as ``<out>/svm/detector.pt``).

Features are read one image at a time (memory-mapped), so the cache is never loaded whole: the miner
keeps only each class's hard negatives, the regressors only their training pairs (float16). With
``svm.classifiers=false`` there is no miner: only the regressors are trained (the fine-tuned classifier scores),
from features computed for their proposals alone.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import replace

import numpy as np
import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from rcnn import boxes as B
from rcnn.config import asked_scores, to_dict
from rcnn.detector_file import write_detector
from rcnn.recipe import training_nms_iou
from rcnn.store import StageStore, temporary_path, torch_save, write_json

from .box_regression import encode, fit_regressor
from .train import HardNegativeMiner, SvmParams, mean_norm_scale

log = logging.getLogger("svm")

FORMAT_VERSION = 7  # 2: the detector file carries the fine-tuned classifier (detect.scores=softmax);
# 3: ground-truth rows mined as negatives of other classes and used as regression examples, difficult boxes kept;
# 4: crowd regions and the proposals inside them left out; 5: C chosen by cross-validation (svm.folds);
# 6: the detector carries an NMS overlap from its training objects; 7: one a class
MIN_REGRESSION_PAIRS = 8  # a class with fewer training pairs keeps its boxes as proposed


def class_max_iou(proposals: np.ndarray, gt: np.ndarray, gt_labels: np.ndarray, num_classes: int) -> np.ndarray:
    """``[N, C]``: each proposal's IoU with the closest ground-truth box of each class (0 without one)."""
    out = np.zeros((len(proposals), num_classes), np.float32)
    if len(proposals) and len(gt):
        ov = B.iou(proposals, gt)
        for c in np.unique(gt_labels):
            out[:, c] = ov[:, gt_labels == c].max(axis=1)
    return out


def training_rows(ds, features, proposals, image_id):
    """One train image as R-CNN's feature cache holds it: ``(features [G + N, D], boxes [G + N, 4],
    max_iou [G + N, C], gt [G, 4], gt labels [G])``, its G ground-truth boxes (difficult ones included,
    as ``roidb_from_voc.m``) then its N proposals. So another class's ground-truth box is a candidate
    negative, a proposal on a difficult object is never its class's negative, and a ground-truth box is
    a regression example (zero targets). Proposals inside a crowd region are left out (N counts the rest);
    where the features hold only the box regressors' proposals (``svm.classifiers=false``), N counts those."""
    from features.stage import gt_entry, rows_entry
    from rcnn.datasets import gt_for_training, in_crowd

    gt, labels = gt_for_training(ds, image_id)
    props = B.as_boxes(proposals.get(image_id)["boxes"])
    if features.has(rows_entry(image_id)):
        props = props[features.get_array(rows_entry(image_id))]
    keep = ~in_crowd(ds, image_id, props)
    raw = np.concatenate([features.get_array(gt_entry(image_id)), features.get_array(image_id)[keep]])
    boxes = np.concatenate([B.as_boxes(gt), props[keep]])
    return raw, boxes, class_max_iou(boxes, gt, labels, ds.num_classes), gt, labels


def _link(src, dst) -> None:
    """``dst`` becomes another name of ``src`` (atomically; a copy where links are not allowed)."""
    import shutil

    if dst.exists() and os.path.samefile(src, dst):
        return  # already linked (os.replace of a link onto the same file would leave the link behind)
    tmp = temporary_path(dst)
    tmp.unlink(missing_ok=True)
    try:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


def _classifier(weights, num_classes: int) -> dict | None:
    """The fine-tuned network's (N+1)-way classifier (``detect.scores=softmax``), when the features came
    from stage=finetune's model.pt; None otherwise."""
    if weights.kind != "file" or not weights.path:
        return None
    try:
        ck = torch.load(weights.path, map_location="cpu", weights_only=True)
    except Exception:  # not a file stage=finetune wrote
        return None
    if not isinstance(ck, dict) or ck.get("source") != "stage=finetune" or "classifier" not in ck:
        return None  # e.g. a pretrained backbone: its classifier is for its own classes
    head = ck["classifier"]
    if head["weight"].shape[0] != num_classes + 1:
        return None
    return {"weight": head["weight"].float(), "bias": head["bias"].float()}


def _proposal_parts(ctx) -> dict:
    """How the detector proposes boxes in a new image: the proposals stage's settings and MultiBox model."""
    from proposals.selective_search import resolve_params
    from proposals.stage import multibox_store, uses_multibox, uses_ss

    cfg = ctx.cfg
    pc = cfg.proposals
    out = {"method": pc.method.value, "top_n": pc.top_n, "merge_iou": pc.merge_iou, "ss": None, "multibox": None}
    if uses_ss(cfg):
        out["ss"] = resolve_params(pc.ss).as_dict()
    if uses_multibox(cfg):
        ck = torch.load(multibox_store(ctx).dir / "model.pt", map_location="cpu", weights_only=False)
        out["multibox"] = {
            "model": ck["model"], "priors": torch.as_tensor(np.asarray(ck["priors"])), "normalization": ck["normalization"],
            "input_size": cfg.multibox.input_size, "top_k": cfg.multibox.top_k,
        }  # fmt: skip
    return out


def _load_checkpoint(path, scale: float) -> dict | None:
    """The mining state saved by a killed run of the same key (None without one)."""
    if not path.exists():
        return None
    state = torch.load(path, map_location="cpu", weights_only=False)  # our own run folder's file
    if not np.isclose(state["scale"], scale):
        raise RuntimeError(f"{path}: saved under another feature scale; delete it to start over")
    return state


def _positives(ds, features, ids: list, scale: float) -> list[np.ndarray]:
    """Per class, the scaled features of its ground-truth boxes in ``ids`` ``[P_c, D]``."""
    from features.stage import gt_entry
    from rcnn.datasets import gt_for_training

    positives: list[list[np.ndarray]] = [[] for _ in range(ds.num_classes)]
    for i in ids:
        _, labels = gt_for_training(ds, i)
        gt_feats = np.asarray(features.get_array(gt_entry(i)), np.float32) * scale
        for c in np.unique(labels):
            positives[c].append(gt_feats[labels == c])
    return [np.concatenate(p) if p else np.zeros((0, 1024), np.float32) for p in positives]


def folds_of(ids: list, folds: int) -> list[list]:
    """The train images cut into ``folds`` interleaved folds: image ``k`` in fold ``k % folds``."""
    return [ids[f::folds] for f in range(folds)]


def select_C(ctx, features, proposals, ids: list, scale: float, store: StageStore, own_nms: list[float]) -> tuple[float, dict]:
    """R-CNN's C was tuned for ImageNet fc7 features; here it is chosen on the training data by K-fold
    cross-validation (``svm.folds``): for each C of ``svm.C_grid`` and each fold, SVMs (hard-negative mining,
    as the final ones) trained on the other folds' cached features score the fold's images by VOC07 mAP (no
    box regression). The C with the best mean wins (ties: the smaller), among the Cs that leave no class
    degenerate when there are such. Every image still trains the final detector (and the network, when it is
    fine-tuned: the folds then score images it has seen, an optimism shared by every C). Each (C, fold)
    result is saved as it completes, so a killed run resumes. The folds are detected as the detector will be:
    ``detect.nms_iou``, else ``own_nms`` (its own overlap a class). Returns ``(C, the selection's record)``."""
    from eval.detections import Detections
    from eval.voc import voc_eval
    from rcnn.boxes import postprocess
    from rcnn.datasets import DatasetError, gt_for_recall

    cfg, ds, sc = ctx.cfg, ctx.dataset, ctx.cfg.svm
    nms = float(cfg.detect.nms_iou) if cfg.detect.nms_iou is not None else own_nms
    path = store.dir / "c_selection.json"
    done: list[dict] = json.loads(path.read_text()) if path.exists() else []
    parts_of = folds_of(ids, min(sc.folds, len(ids)))
    positives: dict[int, list[np.ndarray]] = {}  # per fold, its training part's positives (read once)
    for C in sc.C_grid:
        for f, held in enumerate(parts_of):
            if any(np.isclose(r["C"], C) and r["fold"] == f for r in done):
                continue
            t = time.perf_counter()
            fit = [i for g, part in enumerate(parts_of) if g != f for i in part]
            pos = positives[f] = positives.get(f) or _positives(ds, features, fit, scale)
            miner = HardNegativeMiner(pos, replace(SvmParams.from_config(sc, cfg.seed), C=float(C)), ctx.workers)
            state = {"next": 0, "scale": scale, "miner": miner, "pairs_x": None, "pairs_t": None}
            try:
                _mine(ctx, miner, state, fit, features, proposals, checkpoint=None, desc=f"svm C={C:g} fold {f + 1}/{len(parts_of)}")
            finally:
                miner.close()
            W, b, _ = miner.model()
            parts, gts = [], []
            for k, i in enumerate(held):
                a = ds.annotation(i)
                raw = np.asarray(features.get_array(i), np.float32)
                boxes, scores, labels = postprocess(proposals.get(i)["boxes"], raw @ (W * scale).T + b, None, a.width,
                                                    a.height, nms, cfg.detect.max_per_image,
                                                    max_per_class=cfg.detect.max_per_class)  # fmt: skip
                parts.append((np.full(len(scores), k), labels, scores, boxes))
                gts.append((a.boxes, a.labels, a.difficult))
            dets = Detections(*(np.concatenate([p[j] for p in parts]) for j in range(4)))
            scored = voc_eval(dets, gts, ds.num_classes, use_07_metric=True)
            m = scored["map"]
            objects = sum(len(gt_for_recall(ds, i)[0]) for i in held)
            done.append({"C": float(C), "fold": f, "images": len(held), "objects": objects,
                         "voc07_map": None if np.isnan(m) else round(float(m), 4),
                         "per_class": {ds.classes[c]: round(float(a), 4) for c, a in enumerate(scored["ap"]) if not np.isnan(a)},
                         "degenerate_classes": [ds.classes[c] for c in degenerate_classes(W, b, pos)],
                         "seconds": round(time.perf_counter() - t, 1)})  # fmt: skip
            log.info("C=%g, fold %d of %d: VOC07 mAP %.4f on its %d images", C, f + 1, len(parts_of), m, len(held))
            write_json(path, done)
    rows = []
    for C in sc.C_grid:
        scores = [r["voc07_map"] for r in done if np.isclose(r["C"], C) and r["voc07_map"] is not None]
        if scores:
            rows.append({"C": float(C), "mean_voc07_map": round(float(np.mean(scores)), 4),
                         "std_voc07_map": round(float(np.std(scores)), 4), "folds_scored": len(scores),
                         "degenerate_classes": sorted({c for r in done if np.isclose(r["C"], C) for c in r["degenerate_classes"]})})  # fmt: skip
    if not rows:
        raise DatasetError(f"svm.C=null: no fold of the {len(ids)} train images has a ground-truth box to score C on; "
                           "set svm.C (R-CNN: 0.001)")  # fmt: skip
    sound = [r for r in rows if not r["degenerate_classes"]] or rows
    best = max(sound, key=lambda r: (r["mean_voc07_map"], -r["C"]))
    others = [r["mean_voc07_map"] for r in rows if r is not best]
    record = {
        "rule": f"{len(parts_of)}-fold cross-validation, VOC07 mAP (mean over the folds), Cs with degenerate classes "
                "set aside when others have none",
        "folds": len(parts_of), "per_C": rows, "per_fold": done, "chosen": best["C"],
        # how sure: the winner's lead over the next C, against the spread of its own folds
        "lead_over_next": round(best["mean_voc07_map"] - max(others), 4) if others else None,
        "std_of_chosen": best["std_voc07_map"],
    }  # fmt: skip
    print("SVM C by cross-validation: " + ", ".join(
        f"C={r['C']:g} {r['mean_voc07_map']:.3f}±{r['std_voc07_map']:.3f}" + (" (degenerate)" if r["degenerate_classes"] else "")
        for r in rows) + f" -> C={best['C']:g}")  # fmt: skip
    return best["C"], record


def degenerate_classes(W: np.ndarray, b: np.ndarray, pos: list[np.ndarray]) -> list[int]:
    """Trained classes whose SVM scores fewer than half of its own (scaled) training positives above 0:
    a fit that leaves ``w ~ 0`` because C is too small for these features."""
    out = []
    for c, p in enumerate(pos):
        if len(p) and np.isfinite(b[c]) and float(np.mean(p @ W[c] + b[c] > 0)) < 0.5:
            out.append(c)
    return out


def run_svm(ctx) -> dict:
    from features.backbone import build_googlenet, weights_used
    from features.stage import gt_entry
    from rcnn.stages import run_stage

    cfg, ds = ctx.cfg, ctx.dataset
    if ctx.cfg.proposals.splits and "train" not in ctx.cfg.proposals.splits:
        raise ValueError("stage=svm trains on the train split: proposals.splits must include train")
    features_metrics = run_stage(ctx, "features")
    features = StageStore.open(ctx.run_dir, "features", features_metrics["key"])
    proposals = StageStore.open(ctx.run_dir, "proposals", features.identity["inputs"]["proposals"])
    asked = asked_scores(cfg)  # None: the detector's default, below
    store = StageStore(
        ctx.run_dir, "svm", {"svm": {k: v for k, v in to_dict(cfg.svm).items() if k != "checkpoint_seconds"}, "seed": cfg.seed,
                             "scores": asked},
        inputs={"features": features.key},
        version=FORMAT_VERSION,
    )  # fmt: skip
    path = store.dir / "detector.pt"
    if store.complete and path.exists():
        metrics = json.loads((store.dir / "metrics.json").read_text())
        _link(path, store.stage_dir / "detector.pt")
        store.finish(metrics)
        print(f"SVMs cached: {path}")
        return metrics

    ctx.building(store)
    start = time.perf_counter()
    sc, C = cfg.svm, ds.num_classes
    ids = ds.image_ids(ds.train_split)
    if not ids:
        raise ValueError(f"{ds.name}: the train split '{ds.train_split}' has no images")
    weights = weights_used(features.identity["config"]["backbone"], features_metrics.get("backbone_path"))
    classifier = _classifier(weights, C)
    if not sc.classifiers and classifier is None:
        raise ValueError(f"svm.classifiers=false: the detector would score with the fine-tuned network's classifier, "
                         f"but the features' network ({weights.path or weights.kind}) has none for these {C} classes "
                         "(finetune.enabled=true makes one)")  # fmt: skip
    sample = [ids[int(k)] for k in np.unique(np.linspace(0, len(ids) - 1, min(sc.norm_images, len(ids))).astype(int))]
    if sc.classifiers:
        scale = mean_norm_scale((features.get_array(i) for i in sample), sc.target_norm)
    else:  # the features hold the regressors' proposals only: their rows and the ground truth's set the scale
        scale = mean_norm_scale((np.concatenate([features.get_array(gt_entry(i)), features.get_array(i)]) for i in sample),
                                sc.target_norm)  # fmt: skip

    pos = _positives(ds, features, ids, scale)
    own_nms = training_nms_iou(ds)  # the detector's NMS overlap of each class, from its training objects
    chosen, selection = None, None
    if sc.classifiers:
        chosen, selection = (sc.C, None) if sc.C is not None else select_C(ctx, features, proposals, ids, scale, store, own_nms)
    checkpoint = store.dir / "checkpoint.pt"
    state = _load_checkpoint(checkpoint, scale)
    resumed_at = 0 if state is None else state["next"]
    if state is None:
        miner = None  # svm.classifiers=false: no SVMs, only the regressors' pairs
        if sc.classifiers:
            miner = HardNegativeMiner(pos, replace(SvmParams.from_config(sc, cfg.seed), C=float(chosen)), ctx.workers)
        state = {"next": 0, "scale": scale, "miner": miner,
                 "pairs_x": [[] for _ in range(C)], "pairs_t": [[] for _ in range(C)]}  # fmt: skip
    else:
        log.info("resuming the SVMs at train image %d of %d (%s)", state["next"] + 1, len(ids), checkpoint)
    miner, pairs_x, pairs_t = state["miner"], state["pairs_x"], state["pairs_t"]
    svms = miner is not None
    if svms:
        miner.workers = ctx.workers  # the classes' fits run in this many processes (any number: same result)
    try:
        _mine(ctx, miner, state, ids, features, proposals, checkpoint,
              desc="svm (hard negatives)" if svms else "box regressors' examples")  # fmt: skip
    finally:
        if svms:
            miner.close()
    mining_seconds = time.perf_counter() - start
    W, b, trained = miner.model() if svms else (None, None, np.zeros(C, bool))
    degenerate = [ds.classes[c] for c in degenerate_classes(W, b, pos)] if svms else []
    if degenerate:
        advice = ("svm.C=null chooses C by cross-validation over the train images" if sc.C is not None else
                  f"it was the best of svm.C_grid={list(sc.C_grid)} by cross-validation: the features do not separate "
                  "these classes well (fine-tune them longer, or add larger Cs to the grid)")  # fmt: skip
        log.warning(
            "%d SVMs are degenerate (they score most of their own training positives below 0: w ~ 0): %s. C=%g is "
            "too small for these features; %s", len(degenerate),
            ", ".join(degenerate[:10]) + (" ..." if len(degenerate) > 10 else ""), chosen, advice,
        )  # fmt: skip

    t = time.perf_counter()
    reg_w = np.zeros((C, pos[0].shape[1], 4), np.float32)
    reg_b = np.zeros((C, 4), np.float32)
    reg_pairs = [int(sum(len(x) for x in pairs_x[c])) for c in range(C)]
    for c in range(C):
        if reg_pairs[c] >= MIN_REGRESSION_PAIRS:
            Wc, bc = fit_regressor(np.concatenate(pairs_x[c]).astype(np.float32) * scale, np.concatenate(pairs_t[c]),
                                   sc.regression_lambda)  # fmt: skip
            reg_w[c], reg_b[c] = Wc * scale, bc  # folded: deltas from the raw features
    regression_seconds = time.perf_counter() - t

    net, _ = build_googlenet(weights)
    parts = {
        "classes": list(ds.classes), "category_ids": [int(x) if isinstance(x, (int, np.integer)) else str(x) for x in ds.category_ids],
        "backbone": net.state_dict(), "normalization": weights.normalization,
        "backbone_weights": weights.kind,
        "features": {**to_dict(cfg.features), "precision": features.identity["config"]["features"]["precision"]},
        "feature_scale": float(scale),
        "svm_w": torch.from_numpy(W * scale) if svms else None, "svm_b": torch.from_numpy(b) if svms else None,
        "reg_w": torch.from_numpy(reg_w) if sc.regression else None,
        "reg_b": torch.from_numpy(reg_b) if sc.regression else None,
        "classifier": classifier,
        # how the detector scores where detect.scores is null: as this run asked, where it has the classifier
        "scores": "softmax" if not svms else asked if asked and classifier is not None else "svm",
        "nms_iou": own_nms,  # each class's NMS where detect.nms_iou is null
        "proposals": _proposal_parts(ctx), "features_key": features.key,
        "config": OmegaConf.to_yaml(cfg),
    }  # fmt: skip
    write_detector(path, parts)
    _link(path, store.stage_dir / "detector.pt")
    checkpoint.unlink(missing_ok=True)
    history = miner.history if svms else []
    write_json(store.dir / "history.json", history)

    last = {}
    for rec in history:
        last[rec["class"]] = rec
    if unconverged := [r for r in history if not r.get("converged", True)]:
        log.warning("liblinear stopped at svm.max_iter=%d before converging in %d of %d SVM fits (classes %s): those "
                    "SVMs are approximate; a smaller C converges faster", sc.max_iter, len(unconverged), len(history),
                    ", ".join(sorted({ds.classes[r["class"]] for r in unconverged})))  # fmt: skip
    metrics = {
        "stage": "svm",
        "key": store.key,
        "detector": str(store.stage_dir / "detector.pt"),
        "train_images": len(ids),
        "classes_trained": int(trained.sum()),
        "classes_without_positives": [ds.classes[c] for c in range(C) if not len(pos[c])],
        "feature_scale": round(float(scale), 6),
        "svms": svms,  # svm.classifiers=false: none, only the box regressors
        "C": float(chosen) if svms else None,
        "C_selection": selection,
        "degenerate_classes": degenerate,
        "max_negatives": sc.max_negatives,
        "classes_at_negative_bound": [ds.classes[c] for c in range(C) if svms and miner.classes[c].capped],
        "retrains": len(history),
        # liblinear stopped at svm.max_iter (the final SVMs; said once in a warning, not once per fit)
        "retrains_not_converged": sum(not r.get("converged", True) for r in history),
        "positives": int(sum(len(p) for p in pos)),
        "regression_pairs": int(sum(reg_pairs)),
        "regressors_trained": int(sum(n >= MIN_REGRESSION_PAIRS for n in reg_pairs)) if sc.regression else 0,
        "mining_seconds": round(mining_seconds, 2),  # this process's (C selection included)
        "images_mined_now": len(ids) - resumed_at,
        "mining_seconds_all": round(state.get("seconds", 0.0), 2),  # the final SVMs' pass over the images, across resumes
        "regression_seconds": round(regression_seconds, 2),
        "seconds": round(time.perf_counter() - start, 2),
        "per_class": {
            ds.classes[c]: {"positives": len(pos[c]), "regression_pairs": reg_pairs[c], **({
                "objective": last[c]["total"], "negatives": last[c]["negatives"], "negatives_capped": miner.classes[c].capped,
                "positives_above_zero": round(float(np.mean(pos[c] @ W[c] + b[c] > 0)), 4)} if svms else {})}  # fmt: skip
            for c in (sorted(last) if svms else range(C))
        },
    }
    store.finish(metrics)
    trained_what = (f"{metrics['classes_trained']} of {C} classes trained ({metrics['retrains']} retrains, "
                    f"{metrics['mining_seconds']:.1f} s)" if svms else "none (svm.classifiers=false: the classifier scores)")  # fmt: skip
    print(f"SVMs: {trained_what}; {metrics['regressors_trained']} box regressors; detector {metrics['detector']}")
    return metrics


def _mine(ctx, miner, state: dict, ids: list, features, proposals, checkpoint, desc: str = "svm (hard negatives)") -> None:
    """Stream the train images from ``state["next"]`` through the miner (None: no SVMs), collecting the
    regressors' pairs when ``state`` has room for them, checkpointing every ``svm.checkpoint_seconds`` (unless
    ``checkpoint`` is None); then the miner's last fits."""

    cfg, ds, sc = ctx.cfg, ctx.dataset, ctx.cfg.svm
    pairs_x, pairs_t, scale = state["pairs_x"], state["pairs_t"], state["scale"]
    saved = last = time.perf_counter()
    save_cost = 0.0  # the last checkpoint's seconds: the next waits 10x that at least (at most ~10% of the time)
    bar = tqdm(total=len(ids), initial=state["next"], desc=desc, unit="img", disable=not cfg.progress)
    for k in range(state["next"], len(ids)):
        i = ids[k]
        raw, props, max_iou, gt, labels = training_rows(ds, features, proposals, i)
        if miner is not None:
            miner.add_image(np.asarray(raw, np.float32) * scale, max_iou, last=k == len(ids) - 1)
        if sc.regression and pairs_x is not None:
            rows, best = B.matches(props, gt, sc.regression_iou)
            for c in np.unique(labels[best]):
                mine = labels[best] == c
                pairs_x[c].append(np.asarray(raw[rows[mine]], np.float16))
                pairs_t[c].append(encode(props[rows[mine]], gt[best[mine]]).astype(np.float32))
        state["next"] = k + 1
        now = time.perf_counter()
        state["seconds"], last = state.get("seconds", 0.0) + now - last, now  # mining time, across resumes
        bar.update()
        if checkpoint is not None and now - saved >= max(sc.checkpoint_seconds, 10 * save_cost) and k + 1 < len(ids):
            torch_save(checkpoint, state)  # a killed run resumes after this image
            saved = time.perf_counter()
            save_cost = saved - now
    bar.close()
    if miner is not None:
        miner.finish()
