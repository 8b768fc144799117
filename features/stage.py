"""``stage=features``: the 1024-d GoogLeNet feature of every proposal, cached per image.

Store ``features/<key>``: one ``<image id>.npy`` per image, float16 ``[N, 1024]``, row ``i`` the feature
of proposal ``i`` of that image's ``proposals`` entry; read it memory-mapped with
``StageStore.get_array``. Images of the train split also get the features of their
ground-truth boxes (difficult ones included, as R-CNN), the SVMs' positives, under the entry id :func:`gt_entry` ``(image id)``, rows in
the order of :func:`rcnn.datasets.gt_for_training`. With ``svm.classifiers=false`` (no SVMs to mine negatives for) an
image only of the train split gets only the proposals its box regressors learn from (IoU above ``svm.regression_iou``
with a training box; none without regression): their indices in the proposals entry under :func:`rows_entry`
``(image id)``. The key covers the feature settings, the backbone weights actually loaded, those rows' rule and the
proposals' key, so a new proposal setting or other weights never reuse these features.
"""

from __future__ import annotations

import json
import logging
import time
from typing import NamedTuple

import numpy as np
import torch
from tqdm import tqdm

from rcnn import distributed
from rcnn.config import to_dict
from rcnn.shard import mine, pending
from rcnn.stages import found
from rcnn.store import StageStore, torch_save
from rcnn.training import check_loss
from rcnn.viz import plot_history

from .backbone import (
    LoadedWeights,
    amp_dtype,
    autocast,
    build_googlenet,
    fold_batchnorm,
    precision_name,
    resolve_device,
    resolve_weights,
)
from .extract import RegionFeatures, region_features

log = logging.getLogger("features")

FORMAT_VERSION = 4  # 2: ground-truth features of the train split; 3: difficult ground truth included; 4: crowd not
FINETUNE_VERSION = 5  # 2: BatchNorm statistics frozen (calibrated on the data first when random); 3: R-CNN's
# learning rates (classifier 10x, biases 2x without decay), dropout, whole-image flips in roi mode, difficult boxes;
# 4: crowd regions and the windows inside them left out; 5: every train image (no image held out to choose C)


def gt_entry(image_id) -> tuple:
    """The store id of an image's ground-truth box features."""
    return ("gt", image_id)


def rows_entry(image_id) -> tuple:
    """The store id of the proposal indices an image's features hold, where they hold only some (int64 ``[R]``)."""
    return ("rows", image_id)


def train_rows_rule(svm) -> dict | None:
    """Which of a train image's proposals get features: None for all of them (the SVMs mine their negatives
    there), else the rule for the box regressors' rows (``svm.classifiers=false``)."""
    if svm.classifiers:
        return None
    return {"regression_iou": float(svm.regression_iou) if svm.regression else None}


def regression_rows(ds, boxes: np.ndarray, image_id, iou: float | None) -> np.ndarray:
    """Indices of the proposals ``boxes`` a box regressor learns from: above ``iou`` with a training box of the
    image (none when ``iou`` is None), proposals inside a crowd region left out as the SVM stage leaves them."""
    from rcnn import boxes as B
    from rcnn.datasets import gt_for_training, in_crowd

    if iou is None:
        return np.zeros(0, np.int64)
    rows, _ = B.matches(boxes, gt_for_training(ds, image_id)[0], iou)
    return rows[~in_crowd(ds, image_id, B.as_boxes(boxes)[rows])]


def _proposals_store(ctx) -> StageStore:
    from rcnn.stages import run_stage

    return StageStore.open(ctx.run_dir, "proposals", run_stage(ctx, "proposals")["key"])


def finetune_store(ctx, proposals: StageStore) -> StageStore:
    """Keyed by the fine-tuning settings, the feature geometry, the starting weights and the proposals."""
    cfg = ctx.cfg
    tune = {k: v for k, v in to_dict(cfg.finetune).items() if k not in ("enabled", "checkpoint_every", "image_cache_mb")}
    if tune["bg_candidates"] == 1:  # uniform draws: the key of runs from before the setting existed
        del tune["bg_candidates"]
    geometry = resolved_feature_settings(cfg.features, resolve_device(cfg.device.value))
    geometry.pop("channels_last")
    return StageStore(
        ctx.run_dir, "finetune",
        {"finetune": tune, "features": geometry, "backbone": resolve_weights(cfg.backbone.weights).describe(), "seed": cfg.seed},
        inputs={"proposals": proposals.key}, version=FINETUNE_VERSION,
    )  # fmt: skip


def finetune_images(cfg, ds) -> list:
    """The train images fine-tuning learns from: all of them (C is chosen by cross-validation over cached
    features, which holds no image out of training: ``svm.folds``)."""
    return ds.image_ids(ds.train_split)


def backbone_weights(ctx, proposals: StageStore) -> LoadedWeights:
    """The fine-tuned weights when fine-tuning is on (``finetune.enabled``) and complete for this
    configuration, else ``backbone.weights``. Off means off: a fine-tuned model left in the run folder by
    ``stage=finetune`` is not used, so an ablation without fine-tuning measures the backbone itself."""
    if not ctx.cfg.finetune.enabled:
        return resolve_weights(ctx.cfg.backbone.weights)
    tuned = finetune_store(ctx, proposals)
    path = tuned.dir / "model.pt"
    if tuned.complete and path.exists():
        log.info("features from the fine-tuned weights in %s", path)
        return resolve_weights(str(path))
    return resolve_weights(ctx.cfg.backbone.weights)


def build_model(cfg, weights: LoadedWeights) -> tuple[RegionFeatures, dict, torch.device]:
    net, _ = build_googlenet(weights)
    device = resolve_device(cfg.device.value)
    model = RegionFeatures(fold_batchnorm(net), cfg.features.roi_layer.value).to(device)
    if cfg.features.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, weights.describe(), device


def resolved_feature_settings(fc, device: torch.device) -> dict:
    """The feature settings that shape the features (precision resolved for this machine; the roi-only ones
    left out in warp mode, where they shape nothing)."""
    settings = {k: v for k, v in to_dict(fc).items() if k not in ("batch_size", "loader_workers")}
    settings["precision"] = precision_name(amp_dtype(fc.precision, device))
    if fc.mode.value == "warp":
        settings.pop("roi_layer"), settings.pop("roi_image_size"), settings.pop("roi_max_size")
    if fc.mode.value != "warp" or settings.get("max_side") is None:  # (features from before it keep their key)
        settings.pop("max_side", None)
    return settings


def partial_images(ds, cfg) -> set:
    """The images whose features cover only some proposals under ``svm.classifiers=false``: those of the train
    split that are not detected on (an image of the test split too, where the splits share images, keeps all)."""
    if "train" not in cfg.proposals.splits:
        return set()
    detected = set(ds.image_ids(ds.test_split)) if "test" in cfg.proposals.splits else set()
    return set(ds.image_ids(ds.train_split)) - detected


class ImageBoxes(NamedTuple):
    """The boxes to compute an image's features for: ground truth (``n_gt`` rows; None where the image takes
    none: not a train image) then proposals; ``rows`` the proposals' indices where only some are taken (None: all)."""

    boxes: np.ndarray
    n_gt: int | None
    rows: np.ndarray | None


def image_boxes(ds, proposals: StageStore, image_id, with_gt: bool, rule: dict | None = None) -> ImageBoxes:
    """What to compute for ``image_id``: its ground truth when ``with_gt`` (a train image), and its proposals:
    all of them, or those :func:`regression_rows` picks under ``rule`` (:func:`train_rows_rule`)."""
    from rcnn.datasets import gt_for_training

    boxes = proposals.get(image_id)["boxes"]
    rows = None
    if rule is not None:
        rows = regression_rows(ds, boxes, image_id, rule["regression_iou"])
        boxes = boxes[rows]
    if not with_gt:
        return ImageBoxes(boxes, None, rows)
    gt = gt_for_training(ds, image_id)[0].astype(np.float32)
    return ImageBoxes(np.concatenate([gt, boxes]), len(gt), rows)


def put_features(store: StageStore, image_id, feats: np.ndarray, planned: ImageBoxes) -> None:
    """The ground truth's rows and the proposal indices first (so an image with a proposals entry is
    complete), then the proposals' features."""
    if not np.isfinite(feats).all():
        raise FloatingPointError(
            f"image {image_id!r}: non-finite features (NaN or inf); the backbone weights are broken "
            "(a diverged fine-tuning?) or overflow float16"
        )
    n_gt = planned.n_gt or 0
    if planned.n_gt is not None:
        store.put_array(gt_entry(image_id), feats[:n_gt])
    if planned.rows is not None:
        store.put_array(rows_entry(image_id), planned.rows)
    store.put_array(image_id, feats[n_gt:])


class _Decoded(torch.utils.data.Dataset):
    """The images to do, decoded in DataLoader worker processes: item k is ``(k, uint8 [H, W, 3])``."""

    def __init__(self, ds, ids: list):
        self.ds, self.ids = ds, ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, k: int):
        return k, self.ds.load_image(self.ids[k])


def loader_workers(fc, device: torch.device, cores: int) -> int:
    if fc.loader_workers is not None:
        return int(fc.loader_workers)
    return min(4, max(cores - 1, 0)) if device.type == "cuda" else 0


def _images(ds, ids: list, workers: int):
    """``(image_id, rgb)`` in order: decoded in line, or by ``workers`` processes ahead of the network."""
    if workers == 0:
        for image_id in ids:
            yield image_id, ds.load_image(image_id)
        return
    loader = torch.utils.data.DataLoader(
        _Decoded(ds, ids), batch_size=None, num_workers=workers, multiprocessing_context="forkserver", prefetch_factor=2,
    )  # fmt: skip
    for k, rgb in loader:
        yield ids[k], rgb.numpy()


def compute_features(model: RegionFeatures, fc, precision: str, rgb: np.ndarray, boxes: np.ndarray, device) -> np.ndarray:
    """``[N, 1024]`` float16 features of ``boxes`` of one image, in ``fc.mode``, at ``precision``."""
    with autocast(amp_dtype(precision, device), device):
        return region_features(model, rgb, boxes, fc, device)


class FeatureActor:
    """A Ray actor holding the network on its GPU (or its CPUs): images in, features out."""

    def __init__(self, model: RegionFeatures, ds, fc, precision: str, threads: int = 1):
        from rcnn.parallel import actor_device

        self.device = actor_device(threads)
        self.model = model.to(self.device).eval()
        self.ds, self.fc, self.precision = ds, fc, precision

    def run(self, image_id, boxes: np.ndarray) -> tuple:
        rgb = self.ds.load_image(image_id)
        t = time.perf_counter()
        feats = compute_features(self.model, self.fc, self.precision, rgb, boxes, self.device)
        return image_id, feats, time.perf_counter() - t


def _ray_features(ctx, model, precision: str, store: StageStore, todo: list, plan, bar) -> tuple[float, str]:
    """The features of ``todo`` computed by Ray actors (:func:`rcnn.parallel.ray_actors`: one per GPU of the
    cluster, else one per ``ray.cpus_per_task`` CPUs), written here as they arrive. The precision is the one
    resolved here (it is part of the cache key): on a CPU driver with GPU actors, say
    ``features.precision=fp16`` or ``bf16``. A task that fails on bad data stops the stage with the local
    error; an actor whose worker died is restarted and its task rerun (``ray.max_retries``). ``plan``: an
    image id's :class:`ImageBoxes`. Returns ``(summed network seconds, where they ran)``."""
    from rcnn.parallel import on_actors, ray_actors

    ds = ctx.dataset
    actors = ray_actors(ctx.ray, ctx.workers, FeatureActor, model.cpu(), ds, ctx.cfg.features, precision)
    planned = {}  # image id -> its ImageBoxes, while an actor has it
    net_seconds = 0.0

    def submit(actor, image_id):
        planned[image_id] = plan(image_id)
        return actor.run.remote(image_id, planned[image_id].boxes)

    def receive(result):
        nonlocal net_seconds
        image_id, feats, seconds = result
        done = planned.pop(image_id)
        put_features(store, image_id, feats, done)
        net_seconds += seconds
        bar.update(len(done.boxes))

    on_actors(actors, todo, submit, receive)
    return net_seconds, actors.where


def run_features(ctx) -> dict:
    from rcnn.datasets import split_names
    from rcnn.stages import run_stage

    cfg, ds, fc = ctx.cfg, ctx.dataset, ctx.cfg.features
    proposals = _proposals_store(ctx)
    if cfg.finetune.enabled:  # the features come from the fine-tuned network, whichever stage asked for them
        run_stage(ctx, "finetune")
    loaded = backbone_weights(ctx, proposals)
    model, weights, device = build_model(cfg, loaded)
    settings = resolved_feature_settings(fc, device)
    rule = train_rows_rule(cfg.svm)
    identity = {"features": settings, "backbone": weights, **({"train_rows": rule} if rule else {})}
    store = StageStore(ctx.run_dir, "features", identity, inputs={"proposals": proposals.key}, version=FORMAT_VERSION)
    splits = split_names(ctx)
    ids = [i for split in splits for i in ds.image_ids(split)]
    train = set(ds.image_ids(ds.train_split)) if ds.train_split in splits else set()
    partial = partial_images(ds, cfg) if rule else set()

    def plan(image_id) -> ImageBoxes:
        return image_boxes(ds, proposals, image_id, image_id in train, rule if image_id in partial else None)
    todo = store.missing(mine(cfg, ids))  # (a shard's images: rcnn/shard.py)
    if not todo and store.complete and (store.dir / "metrics.json").exists():
        computed = json.loads((store.dir / "metrics.json").read_text())  # the figures of the run that computed them
        metrics = {**computed, "backbone_path": loaded.path, "images_computed_now": 0, "crops_computed_now": 0}
        store.finish(metrics)
        print(f"features ({fc.mode.value}): {len(ids)} images, all cached ({metrics['crops_per_second']} crops/s when computed)")
        return metrics
    ctx.building(store, found(store, ids))
    crops_total = sum(len(plan(i).boxes) for i in todo)
    start = time.perf_counter()
    net_seconds = 0.0
    bar = tqdm(total=crops_total, desc=f"features ({fc.mode.value})", unit="crop", disable=not cfg.progress)
    if ctx.ray is not None:  # executor=ray: Ray actors, one per GPU of the cluster (or per cpus_per_task CPUs)
        net_seconds, where = _ray_features(ctx, model, settings["precision"], store, todo, plan, bar)
    else:
        where = str(device)
        for image_id, rgb in _images(ds, todo, loader_workers(fc, device, ctx.workers)):
            planned = plan(image_id)
            t = time.perf_counter()
            feats = compute_features(model, fc, settings["precision"], rgb, planned.boxes, device)
            net_seconds += time.perf_counter() - t
            put_features(store, image_id, feats, planned)
            bar.update(len(planned.boxes))
    bar.close()
    seconds = time.perf_counter() - start
    if waiting := pending(cfg, store, ids, "features"):
        return {**waiting, "images_computed_now": len(todo), "crops_computed_now": crops_total}
    sizes = [store.array_path(i).stat().st_size for i in ids]
    crops_per_second = round(crops_total / net_seconds, 2) if net_seconds else None  # this process's
    images_now, crops_now = distributed.total(len(todo)), distributed.total(crops_total)  # under torchrun: every rank's
    metrics = {
        "stage": "features",
        "key": store.key,
        "mode": fc.mode.value,
        "device": where,
        "backbone_weights": weights["kind"],
        "backbone_path": loaded.path,  # where those weights were read (the SVM stage's detector file takes them)
        "images": len(ids),
        "train_rows": rule or "all",  # of a train image's proposals: all, or the box regressors' only
        "images_computed_now": images_now,
        "crops_computed_now": crops_now,
        "crops_per_second": crops_per_second,
        "seconds_per_image": round(net_seconds / len(todo), 3) if todo else None,
        "bytes_per_image": round(float(np.mean(sizes)), 1) if sizes else 0,
        "seconds": round(seconds, 2),
    }
    store.finish(metrics)
    rate = f"{metrics['crops_per_second']} crops/s, " if todo else "all cached, "
    print(f"features ({fc.mode.value}, {metrics['device']}): {len(ids)} images, {rate}{metrics['bytes_per_image'] / 1024:.0f} KiB per image")
    return metrics


def training_windows(ds, ids: list, proposals, fg_iou: float):
    """The fine-tuning windows of the images ``ids``: their training ground truth and proposals, labelled;
    proposals inside a crowd region left out (neither objects nor background)."""
    from rcnn.datasets import gt_for_training, in_crowd

    from .finetune import label_windows

    boxes = [proposals.get(i)["boxes"] for i in ids]
    boxes = [b[~in_crowd(ds, i, b)] for i, b in zip(ids, boxes)]
    return label_windows(boxes, [gt_for_training(ds, i) for i in ids], fg_iou)


def run_finetune(ctx) -> dict:
    """Fine-tune on the train split's proposals (resuming from the last checkpoint), save model.pt."""
    import shutil

    from .finetune import FineTuner

    cfg, ds = ctx.cfg, ctx.dataset
    proposals = _proposals_store(ctx)
    store = finetune_store(ctx, proposals)
    model_path = store.dir / "model.pt"
    if store.complete and model_path.exists():
        log.info("fine-tuned model cached in %s", store.dir)
        metrics = json.loads((store.dir / "metrics.json").read_text())
        store.finish(metrics)
        return metrics
    ctx.building(store)
    ids = finetune_images(cfg, ds)
    windows = training_windows(ds, ids, proposals, cfg.finetune.fg_iou)
    net, start_weights = build_googlenet(resolve_weights(cfg.backbone.weights))
    tuner = FineTuner(net, ds.num_classes, windows, lambda k: ds.load_image(ids[k]), cfg.finetune, cfg.features, cfg.seed,
                      resolve_device(cfg.device.value))  # fmt: skip
    checkpoint = store.dir / "checkpoint.pt"
    if not checkpoint.exists() and start_weights.kind == "none" and cfg.features.mode.value == "roi":
        tuner.calibrate()  # random weights: BatchNorm statistics from the data, then frozen
    if checkpoint.exists():
        tuner.load(checkpoint)
        log.info("resuming fine-tuning at iteration %d of %d", tuner.iteration + 1, cfg.finetune.iterations)
    start = time.perf_counter()
    done_before = tuner.iteration
    lead = distributed.rank() == 0  # under torchrun rank 0 writes the checkpoints, the model and the figures
    bar = tqdm(total=cfg.finetune.iterations, initial=tuner.iteration, desc="finetune", unit="it",
               disable=not cfg.progress or not lead)  # fmt: skip
    while tuner.iteration < cfg.finetune.iterations:
        rec = tuner.step()
        check_loss(rec["loss"], "fine-tuning", f"iteration {tuner.iteration}", "finetune.lr", cfg.finetune.lr, checkpoint)
        bar.update()
        bar.set_postfix(loss=f"{rec['loss']:.3f}", acc=f"{rec['accuracy']:.2f}")
        if lead and (tuner.iteration % cfg.finetune.checkpoint_every == 0 or tuner.iteration == cfg.finetune.iterations):
            tuner.save(checkpoint)
    bar.close()
    seconds = time.perf_counter() - start
    if lead:
        _export(checkpoint, model_path, start_weights.normalization)
        series = {"loss": "loss (softmax)", "accuracy": "batch accuracy"}
        plot_history(tuner.history, "iteration", series, store.dir / "loss.png", "fine-tuning")
        shutil.copyfile(store.dir / "loss.png", store.stage_dir / "loss.png")
    last = tuner.history[-20:]
    metrics = {
        "stage": "finetune",
        "key": store.key,
        "mode": cfg.features.mode.value,
        "iterations": tuner.iteration,
        "train_images": len(ids),
        "windows_foreground": int(len(windows.foreground())),
        "windows_background": int(len(windows.background())),
        "loss_first": tuner.history[0]["loss"],
        "loss_last20": float(np.mean([h["loss"] for h in last])),
        "accuracy_last20": float(np.mean([h["accuracy"] for h in last])),
        "seconds_per_iteration": round(seconds / max(tuner.iteration - done_before, 1), 3),
        "iterations_computed_now": tuner.iteration - done_before,
        "train_seconds": round(tuner.seconds, 2),  # every step's, across resumes
        "model": str(model_path),
    }
    if lead:
        store.finish(metrics)
    distributed.barrier()  # the other ranks go on when the model is written
    print(f"fine-tuned {tuner.iteration} iterations: loss {metrics['loss_first']:.3f} -> {metrics['loss_last20']:.3f}; {model_path}")
    return metrics


def _export(checkpoint, path, normalization: str) -> None:
    """model.pt: the fine-tuned backbone (a state dict under "backbone"), the input normalisation it was
    trained on (that of the weights it started from) and its classifier."""
    from .backbone import WEIGHTS_FORMAT

    ck = torch.load(checkpoint, map_location="cpu", weights_only=False)
    torch_save(path, {"format": WEIGHTS_FORMAT, "backbone": ck["backbone"], "normalization": normalization,
                      "classifier": ck["classifier"], "iteration": ck["iteration"], "source": "stage=finetune"})  # fmt: skip
