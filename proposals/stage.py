"""``stage=multibox`` (train the proposer) and ``stage=proposals`` (boxes per image, recall figures).

Stores (under the run folder):
  proposals/ss/<key>        selective search boxes per image (in proposals.ss.order) and their seconds
  proposals/multibox/<key>  MultiBox boxes (pixels) and scores per image, best first
  proposals/<key>           the proposals the later stages read: ``boxes`` [N, 4] float32 xyxy,
                            ``source`` [N] uint8 (0 selective search, 1 MultiBox), ``scores`` [N]
                            (MultiBox's; -1 for selective search boxes)
  multibox/<key>            checkpoint.pt (resumable), model.pt, loss.png, metrics.json
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from functools import partial

import numpy as np

from rcnn import boxes as B
from rcnn import distributed
from rcnn.config import ProposalMethod, to_dict
from rcnn.datasets import gt_for_recall, gt_for_training, split_names
from rcnn.datasets.stage import data_store
from rcnn.parallel import process_images
from rcnn.shard import mine, pending
from rcnn.stages import found, run_stage
from rcnn.store import StageStore

from . import recall as R
from .selective_search import image_seed, merge_near_duplicates, resolve_params, selective_search

log = logging.getLogger("proposals")

FORMAT_VERSION = 2  # 2: selective search's shuffle from a canonical order (reproducible under Ray)
MULTIBOX_VERSION = 3  # 2: trained on every ground-truth box, difficult ones included (issue #13); 3: crowd left out
SOURCE_SS, SOURCE_MULTIBOX = 0, 1


def uses_ss(cfg) -> bool:
    return cfg.proposals.method in (ProposalMethod.ss, ProposalMethod.ss_multibox)


def uses_multibox(cfg) -> bool:
    return cfg.proposals.method in (ProposalMethod.multibox, ProposalMethod.ss_multibox)


# -- MultiBox training -----------------------------------------------------------------------------


def multibox_store(ctx) -> StageStore:
    from features.backbone import resolve_weights

    weights = resolve_weights(ctx.cfg.backbone.weights)
    mb = to_dict(ctx.cfg.multibox)
    if mb["patience"] is None:  # every epoch trained on every image: the key of models from before the setting
        del mb["patience"], mb["holdout"]
    return StageStore(
        ctx.run_dir,
        "multibox",
        {"multibox": mb, "backbone": weights.describe(), "seed": ctx.cfg.seed},
        inputs={"data": data_store(ctx).key},
        version=MULTIBOX_VERSION,
    )


def _warped(ds, ids, size: int, progress: bool, desc: str) -> np.ndarray:
    from tqdm import tqdm

    from .multibox import warp_image

    out = np.zeros((len(ids), size, size, 3), np.uint8)
    for k, image_id in enumerate(tqdm(ids, desc=desc, unit="img", disable=not progress)):
        out[k] = warp_image(ds.load_image(image_id), size)
    return out


def run_multibox(ctx) -> dict:
    """Train MultiBox on the train split (or return the cached model's metrics)."""
    from features.backbone import resolve_device, resolve_weights

    from .multibox import cluster_priors, export_model, plot_loss, train_multibox

    cfg, ds = ctx.cfg, ctx.dataset
    store = multibox_store(ctx)
    if store.complete and (store.dir / "model.pt").exists():
        log.info("MultiBox model cached in %s", store.dir)
        metrics = json.loads((store.dir / "metrics.json").read_text())
        store.finish(metrics)  # the stage's latest metrics are this model's
        return metrics
    ctx.building(store)
    mc = cfg.multibox
    start = time.perf_counter()
    ids = ds.image_ids(ds.train_split)
    gts = []
    for image_id in ids:
        boxes, _ = gt_for_training(ds, image_id)
        a = ds.annotation(image_id)
        gts.append(B.normalize(boxes, a.width, a.height))
    images = _warped(ds, ids, mc.input_size, cfg.progress, "multibox inputs")
    heldout, held = None, np.zeros(0, int)
    if mc.patience is not None and len(ids) < 2:
        log.warning("multibox.patience: %d training image(s), none to hold out: every epoch is trained", len(ids))
    elif mc.patience is not None:  # a seeded share of the images measures recall after each epoch, unseen in training
        n = len(ids)
        held = np.sort(np.random.default_rng(cfg.seed).permutation(n)[: min(n - 1, max(1, round(mc.holdout * n)))])
        heldout = (images[held], [gts[k] for k in held])
        train = np.setdiff1d(np.arange(n), held)
        images, gts = images[train], [gts[k] for k in train]
    priors = cluster_priors(np.concatenate(gts), mc.num_priors, seed=cfg.seed)
    weights = resolve_weights(cfg.backbone.weights)
    model, state = train_multibox(
        images, gts, priors, mc, weights, store.dir / "checkpoint.pt", seed=cfg.seed, progress=cfg.progress,
        device=resolve_device(cfg.device.value), heldout=heldout,
    )
    if distributed.rank() != 0:  # under torchrun rank 0 writes the model and the metrics
        distributed.barrier()
        return json.loads((store.dir / "metrics.json").read_text())
    export_model(store.dir / "checkpoint.pt", store.dir / "model.pt")
    plot_loss(state.history, store.dir / "loss.png")
    shutil.copyfile(store.dir / "loss.png", store.stage_dir / "loss.png")
    seconds = time.perf_counter() - start
    metrics = {
        "stage": "multibox",
        "key": store.key,
        "train_images": len(images),
        "train_boxes": int(sum(len(g) for g in gts)),
        "heldout_images": len(held),  # with multibox.patience: not trained on; recall_50 in the history is theirs
        "best_epoch": state.best_epoch if heldout is not None else None,
        "heldout_recall_50": state.best_recall if heldout is not None else None,
        "num_priors": int(len(priors)),
        "input_size": mc.input_size,
        "epochs": state.epoch,
        "epochs_computed_now": state.epoch - state.epochs_before,
        "train_seconds": round(state.seconds, 2),  # every epoch's, across resumes ("seconds": this process)
        "loss_first_epoch": state.history[0]["loss"] if state.history else None,
        "loss_last_epoch": state.history[-1]["loss"] if state.history else None,
        "history": state.history,
        "backbone_weights": weights.kind,
        "seconds": round(seconds, 2),
    }
    store.finish(metrics)
    distributed.barrier()
    kept = f" (the weights of epoch {state.best_epoch}: held-out recall@0.5 {state.best_recall:.3f})" if heldout else ""
    print(f"MultiBox: {len(priors)} priors, {state.epoch} epochs{kept}, loss {metrics['loss_first_epoch']:.3f} -> "
          f"{metrics['loss_last_epoch']:.3f}, {seconds:.0f} s; model in {store.dir}")
    return metrics


# -- proposals ------------------------------------------------------------------------------------


def _ss_one(ds, params, seed: int, image_id) -> dict:
    boxes, seconds = selective_search(ds.load_image(image_id), params, seed=image_seed(seed, image_id))
    return {"boxes": boxes, "seconds": np.float64(seconds)}


def _multibox_boxes(ctx, mb_store: StageStore, model_path, ids: list, desc: str) -> None:
    """MultiBox boxes for the images without an entry: batched in this process, one entry each."""
    import torch

    from features.backbone import resolve_device

    from .multibox import load_model, predict, warp_image

    todo = mb_store.missing(ids)
    if not todo:
        return
    model = load_model(model_path).to(resolve_device(ctx.cfg.device.value))
    size, top_k = ctx.cfg.multibox.input_size, ctx.cfg.multibox.top_k
    from tqdm import tqdm

    bar = tqdm(total=len(ids), initial=len(ids) - len(todo), desc=desc, unit="img", disable=not ctx.cfg.progress)
    batch = 32
    for start in range(0, len(todo), batch):
        chunk = todo[start : start + batch]
        warped = np.stack([warp_image(ctx.dataset.load_image(i), size) for i in chunk])
        # Always a full batch (zeros after the last image): an image's boxes then do not depend on which
        # images share its batch (convolutions may sum in another order at another batch size), so that
        # shards (rcnn/shard.py) and resumed runs give the boxes of a single uninterrupted run.
        warped = np.concatenate([warped, np.zeros((batch - len(chunk), *warped.shape[1:]), warped.dtype)])
        t1 = time.perf_counter()  # decoding is left out of the timing, as for selective search
        with torch.inference_mode():
            boxes, scores = predict(model, warped)
        per_image = (time.perf_counter() - t1) / len(chunk)
        for k, image_id in enumerate(chunk):
            a = ctx.dataset.annotation(image_id)
            px, s = top_boxes(boxes[k], scores[k], top_k, a.width, a.height)
            mb_store.put(image_id, {"boxes": px, "scores": s, "seconds": np.float64(per_image)})
            bar.update()
    bar.close()


def top_boxes(boxes: np.ndarray, scores: np.ndarray, top_k: int, width: int, height: int):
    """One image's MultiBox output (normalised boxes ``[K, 4]``, scores ``[K]``) -> its ``top_k`` best
    boxes in pixels, best first, empty ones dropped: ``(boxes, scores)``."""
    order = np.argsort(-scores, kind="stable")[:top_k]
    px = B.denormalize(boxes[order], width, height)
    valid = B.is_valid(px)
    return px[valid], scores[order][valid]


def combine(ss_boxes, mb_boxes, mb_scores, merge_iou: float) -> dict:
    """MultiBox's boxes (best first) then selective search's (already deduplicated among themselves).

    A MultiBox box whose IoU with a better-scored one is above ``merge_iou`` is dropped, and so is a
    selective search box whose IoU with a kept MultiBox box is above it: duplicates are merged.
    """
    mb_boxes = B.as_boxes(mb_boxes)
    mb_scores = np.asarray(mb_scores, np.float32).reshape(-1)
    if len(mb_boxes):
        keep = merge_near_duplicates(mb_boxes, merge_iou)  # mb_boxes come best-scored first
        mb_boxes, mb_scores = mb_boxes[keep], mb_scores[keep]
    ss_boxes = B.as_boxes(ss_boxes)
    if len(mb_boxes) and len(ss_boxes):
        ss_boxes = ss_boxes[B.iou(ss_boxes, mb_boxes).max(axis=1) <= merge_iou]
    return {
        "boxes": np.concatenate([mb_boxes, ss_boxes]).astype(np.float32),
        "source": np.concatenate([np.full(len(mb_boxes), SOURCE_MULTIBOX), np.full(len(ss_boxes), SOURCE_SS)]).astype(np.uint8),
        "scores": np.concatenate([mb_scores, np.full(len(ss_boxes), -1.0)]).astype(np.float32),
    }


def proposals_store(ctx, ss_key: str | None, mb_key: str | None) -> StageStore:
    pc = ctx.cfg.proposals
    config = {"method": pc.method.value, "top_n": pc.top_n}
    inputs = {"data": data_store(ctx).key}
    if ss_key:
        inputs["ss"] = ss_key
    if mb_key:
        inputs["multibox"] = mb_key
        config["merge_iou"] = pc.merge_iou if ss_key else None
    return StageStore(ctx.run_dir, "proposals", config, inputs=inputs, version=FORMAT_VERSION)


def run_proposals(ctx) -> dict:
    cfg, ds = ctx.cfg, ctx.dataset
    pc = cfg.proposals
    start = time.perf_counter()
    splits = split_names(ctx)
    data_key = data_store(ctx).key
    ss_store = mb_store = None
    computed_now = {}  # images whose boxes this process computed (the rest were found in the store)
    ids = [i for s in splits for i in ds.image_ids(s)]
    if uses_ss(cfg):
        params = resolve_params(pc.ss)
        ss_store = StageStore(
            ctx.run_dir, "proposals/ss", {"ss": params.as_dict(), "seed": cfg.seed}, {"data": data_key}, FORMAT_VERSION
        )
        computed_now["selective_search"] = len(ss_store.missing(ids))
    if uses_multibox(cfg):
        run_stage(ctx, "multibox")  # cached after its first run
        model_store = multibox_store(ctx)
        mb_store = StageStore(
            ctx.run_dir, "proposals/multibox", {"top_k": cfg.multibox.top_k},
            {"multibox": model_store.key, "data": data_key}, FORMAT_VERSION,
        )  # fmt: skip
        computed_now["multibox"] = len(mb_store.missing(ids))
    # (a store with no entries yet is falsy: compare with None)
    store = proposals_store(ctx, None if ss_store is None else ss_store.key, None if mb_store is None else mb_store.key)
    if store.complete and (store.dir / "metrics.json").exists():
        cached = json.loads((store.dir / "metrics.json").read_text())
        if all(split in cached for split in splits) and not store.missing(ids):
            cached = {**cached, "images_computed_now": computed_now}
            store.finish(cached)  # the stage's latest metrics are these
            print(format_summary(cached, splits) + "\n(cached)")
            return cached
    ctx.building(store, found(ss_store if ss_store is not None else mb_store, ids))
    if ss_store is not None:
        for split in splits:
            process_images(
                ss_store, mine(cfg, ds.image_ids(split)), partial(_ss_one, ds, params, cfg.seed),
                workers=ctx.workers, progress=cfg.progress, desc=f"selective search {split}", ray=ctx.ray,
            )  # fmt: skip
    if mb_store is not None:
        for split in splits:
            _multibox_boxes(ctx, mb_store, model_store.dir / "model.pt", mine(cfg, ds.image_ids(split)), f"multibox {split}")
    no_boxes = {"boxes": np.zeros((0, 4), np.float32), "scores": np.zeros(0), "seconds": np.float64(0)}
    for image_id in store.missing(mine(cfg, ids)):
        ss = ss_store.get(image_id) if ss_store else no_boxes
        mb = mb_store.get(image_id) if mb_store else no_boxes
        ss_boxes = ss["boxes"][: pc.top_n] if pc.top_n else ss["boxes"]
        store.put(image_id, combine(ss_boxes, mb["boxes"], mb["scores"], pc.merge_iou))
    if waiting := pending(cfg, store, ids, "proposals"):
        return waiting

    metrics = {"stage": "proposals", "key": store.key, "method": pc.method.value, "images_computed_now": computed_now}
    if ss_store is not None:
        metrics["selective_search"] = params.as_dict()
    metrics["curves"] = {}
    compute = 0.0
    for split in splits:
        ids = ds.image_ids(split)
        seconds, props, sources = [], {}, {}
        for image_id in ids:
            ss = ss_store.get(image_id) if ss_store else no_boxes
            mb = mb_store.get(image_id) if mb_store else no_boxes
            seconds.append(float(ss["seconds"]) + float(mb["seconds"]))
            entry = store.get(image_id)
            props[image_id], sources[image_id] = entry["boxes"], entry["source"]
        items = [(*gt_for_recall(ds, i), props[i]) for i in ids]
        summary = R.recall_summary(items, ds.num_classes)
        if ss_store is not None and mb_store is not None:  # what each source recalls alone: is MultiBox worth it?
            summary["alone"] = {
                name: {k: v for k, v in R.recall_summary(
                    [(gt, lab, p[sources[i] == code]) for i, (gt, lab, p) in zip(ids, items)], ds.num_classes
                ).items() if k in ("recall_50", "recall_70", "mabo", "boxes_per_image")}
                for name, code in (("selective_search", SOURCE_SS), ("multibox", SOURCE_MULTIBOX))
            }  # fmt: skip
        summary["seconds_per_image"] = float(np.mean(seconds)) if seconds else 0.0
        compute += float(np.sum(seconds))
        metrics[split] = summary
        most = max((len(p) for p in props.values()), default=1)
        metrics["curves"][split] = R.recall_curve([(gt, p) for gt, _, p in items], R.default_counts(most))
    plot = R.plot_recall(metrics["curves"], store.dir / "recall.png", f"{ds.name}: {pc.method.value} proposals")
    shutil.copyfile(plot, store.stage_dir / "recall.png")
    metrics["seconds"] = round(time.perf_counter() - start, 2)  # this process's
    metrics["compute_seconds"] = round(compute, 2)  # every image's boxes, across resumes (decoding excluded)
    store.finish(metrics)
    print(format_summary(metrics, splits))
    return metrics


def format_summary(metrics: dict, splits: list[str]) -> str:
    rows = [("split", "boxes/img", "recall@0.5", "recall@0.7", "MABO", "s/img")]
    for s in splits:
        m = metrics[s]
        rows.append((s, f"{m['boxes_per_image']:.0f}", f"{m['recall_50']:.3f}", f"{m['recall_70']:.3f}",
                     f"{m['mabo']:.3f}", f"{m['seconds_per_image']:.2f}"))  # fmt: skip
        for name, a in m.get("alone", {}).items():
            rows.append((f"  {name} alone", f"{a['boxes_per_image']:.0f}", f"{a['recall_50']:.3f}", f"{a['recall_70']:.3f}",
                         f"{a['mabo']:.3f}", ""))  # fmt: skip
    widths = [max(len(r[k]) for r in rows) for k in range(len(rows[0]))]
    return "\n".join("  ".join(v.rjust(w) if k else v.ljust(w) for k, (v, w) in enumerate(zip(r, widths))) for r in rows)
