"""The default route for a new dataset (``auto=true``): settings chosen from the device and the data.

``python -m rcnn.run dataset=voc dataset.root=DIR`` and nothing else should give the best detector the machine
can train in reasonable time. R-CNN's published settings (the config's defaults) were made for ImageNet
features, a GPU and VOC's objects; on a 2-core CPU and a few hundred photos they cost hours or miss small
objects. :func:`choose` looks at the training boxes (how many, how small, how large the images) and at the
device, and returns one :class:`Choice` per setting with the reason. Only the keys that neither the command line
nor the dataset's own recipe set are applied (``load_config(argv, defaults=...)``: the command line wins); what
was chosen and why is logged at the start and stored in every stage's ``metrics.json`` (``recipe``).

The rules, each measured on roadsigns or the demo (BENCHMARKS.md, "Roadsigns in warp mode", "The demo in 2-3 minutes"):

* image size: selective search on images shrunk to ``SS_MAX_SIDE`` (its time grows faster than the pixels: 29 s
  for a 2000-px photo on a 2-core CPU, 0.8 at 500), crops warped from images shrunk to ``WARP_MAX_SIDE`` (a GPU's
  larger crops from ``WARP_MAX_SIDE_GPU``, unmeasured): photos at 5x roadsigns' size gave 80.3 VOC07 mAP against
  81.6 at their own, in 9.4 minutes against 8.4 (BENCHMARKS.md, "Phone-sized photos"); smaller images untouched.
* proposals: selective search alone on a CPU (MultiBox trains for minutes for a point or two of recall), with
  MultiBox on a GPU, trained while its recall on held-out training images rises; selective search's smallest
  box side follows the small training boxes (the default 20 px drops road signs of 12-20 px).
* features: small warped crops on a CPU (64 px; 96 where it computes bfloat16, +1.2 to +5.5 VOC07 points on
  roadsigns; a random ``CPU_CROPS`` / training images of selective search's boxes an image, within [200, 1000],
  near-duplicates merged first: more objects covered by fewer boxes); the roi path's fine-tuning did not learn
  on small images (the demo 34.9 against 87.8 VOC07 mAP, roadsigns 49.7 against 66.3); R-CNN's warped 224-px
  crops on a GPU.
* fine-tuning: on; ``FT_STEPS`` steps on a CPU whatever the number of boxes (a small dataset's background and
  features need the steps as much as its boxes do: 150 steps cost a 187-box set 7 points), and on a GPU as many
  as see each box about ``FT_PASSES`` times, from ``FT_STEPS`` to ``FT_MAX_GPU``; half of each batch foreground on a CPU
  (R-CNN's quarter cost the demo 11 points), its background the hardest of ``BG_CANDIDATES`` x as many draws
  (the classifier scores on a CPU, and its false positives on background were most of roadsigns' loss).
* detection: per-class NMS at R-CNN's 0.3 unless the training objects of a class overlap each other more (crowds,
  cells, shelves): then, for that class, the least of ``NMS_CHOICES`` at which NMS would remove at most ``NMS_LOSS``
  of them from a perfect detector's boxes (:func:`training_nms_iou`; the detector file carries one overlap a
  class, ``detect.nms_iou=null``); each image's boxes of a class before NMS and the split's detections of a class
  per image raised above R-CNN's 100 and 40 where the training images hold that many objects of a class.
* the SVMs' C: by cross-validation (``svm.C=null``; 2 folds and two Cs on a CPU, where each is a mining pass).
* scores: on a CPU the fine-tuned network's own classifier (``detect.scores=softmax``), which beat the SVMs on
  roadsigns after each of three fine-tunings (Fast R-CNN's finding, against R-CNN's); then no SVMs are trained
  (``svm.classifiers=false``), only the box regressors, and a train image's features only for the proposals they
  learn from (``detect.scores=svm`` on the command line brings the SVMs back).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from .config import DetectConfig, FinetuneConfig, override_value

__all__ = ["Choice", "DataFacts", "data_facts", "choose", "as_overrides", "describe", "route", "log_route", "nms_losses",
           "nms_choice", "class_nms_losses", "training_nms_iou"]

log = logging.getLogger("rcnn")

CPU_LR, GPU_LR = 0.02, 0.01  # fine-tuning's base rate on every layer
RCNN_LR = FinetuneConfig.lr  # R-CNN's own (0.001)
FT_STEPS = 600  # fine-tuning steps on a CPU, and the fewest on a GPU
FT_PASSES, FT_MAX_GPU = 24, 4000  # on a GPU: steps x foreground windows a step ~ this many looks at each box, up to this
CPU_CROP, CPU_CROP_BF16 = 64, 96  # warped crop side on a CPU in fp32, and where it computes bfloat16
CPU_CROPS = 250_000  # warped crops over the training images on a CPU (~8 minutes at 500 crops/s): sets top_n
TOP_N_MIN, TOP_N_MAX = 200, 1000
BG_CANDIDATES = 4  # on a CPU, a fine-tuning step's background windows are the hardest of this many times as many draws
MB_PATIENCE = 3  # on a GPU, MultiBox stops after this many epochs without a gain in held-out recall
SS_MERGE_IOU = 0.7  # on a CPU, selective search's near-duplicates are merged before the top_n cap
SS_MAX_SIDE = 500  # selective search runs on images shrunk to this longer side (R-CNN searched ILSVRC at 500 wide)
WARP_MAX_SIDE, WARP_MAX_SIDE_GPU = 800, 1333  # crops are warped from images shrunk to this (CPU, GPU) longer side
FG_PER_STEP = FinetuneConfig.fg_per_batch  # foreground windows a fine-tuning step (the config's default)
NMS_CHOICES = (0.3, 0.4, 0.5, 0.6, 0.7)  # per-class NMS overlaps, R-CNN's first
NMS_LOSS = 0.01  # the most of the training objects NMS may remove from a perfect detector's boxes
PER_CLASS, PER_CLASS_SPLIT = DetectConfig.max_per_class, DetectConfig.max_per_class_split  # R-CNN's 100 and 40


@dataclass(frozen=True)
class Choice:
    key: str  # a dotted config key
    value: Any
    why: str


@dataclass(frozen=True)
class DataFacts:
    """What the chooser reads of the training split."""

    train_images: int
    train_boxes: int
    classes: int
    median_object_side: float  # sqrt(w * h) of the training boxes, pixels
    small_object_side: float  # its 5th percentile
    median_long_side: float  # the training images' longer side, pixels
    small_object_side_ss: float  # the 5th percentile of the boxes' sides where selective search runs (SS_MAX_SIDE)
    # per class, ((t, the fraction of its training objects NMS at t removes from a perfect detector), ...)
    class_nms_losses: tuple = ()
    class_names: tuple = ()
    most_of_a_class: int = 1  # the most objects of one class in one training image
    densest_per_image: float = 0.0  # the most numerous class's training objects per training image


def nms_losses(boxes_by_group) -> tuple:
    """``((t, fraction), ...)`` for each t of ``NMS_CHOICES``: the fraction of the boxes greedy NMS at overlap t
    would remove if each group (an image's boxes of one class) were a perfect detector's output, larger boxes
    scoring higher (an order fixed by the data alone)."""
    from . import boxes as B

    groups = [np.asarray(g, np.float32) for g in boxes_by_group if len(g) > 1]
    total = sum(len(g) for g in boxes_by_group)
    removed = [sum(len(g) - len(B.nms(g, B.area(g), t)) for g in groups) for t in NMS_CHOICES]
    return tuple((t, r / total if total else 0.0) for t, r in zip(NMS_CHOICES, removed))


def nms_choice(losses) -> float:
    """The least overlap of ``losses`` (:func:`nms_losses`) that removes at most ``NMS_LOSS`` of the objects,
    else the largest tried; R-CNN's 0.3 without objects."""
    return next((t for t, lost in losses if lost <= NMS_LOSS), NMS_CHOICES[-1]) if losses else NMS_CHOICES[0]


def _training_boxes(ds) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(boxes, labels)`` of each image of ``ds``'s train split, as training reads them."""
    from .datasets import gt_for_training

    return [gt_for_training(ds, i) for i in ds.image_ids(ds.train_split)]


def class_nms_losses(pairs, num_classes: int) -> tuple:
    """:func:`nms_losses` of each class's training objects (``pairs``: each image's boxes and labels)."""
    return tuple(nms_losses([b[lab == c] for b, lab in pairs if (lab == c).any()]) for c in range(num_classes))


def training_nms_iou(ds) -> list[float]:
    """Each class's NMS overlap for a detector trained on ``ds``'s train split (:func:`nms_choice`): R-CNN's 0.3
    where its training objects barely overlap each other (VOC, roadsigns, the demo), more where they crowd."""
    return [nms_choice(lost) for lost in class_nms_losses(_training_boxes(ds), ds.num_classes)]


def data_facts(ds) -> DataFacts:
    """:class:`DataFacts` of ``ds``'s train split (annotations only: no image is decoded)."""
    ids = ds.image_ids(ds.train_split)
    pairs = _training_boxes(ds)
    boxes = [b for b, _ in pairs]
    labels = [np.asarray(lab, np.int64) for _, lab in pairs]
    per_class = np.bincount(np.concatenate(labels), minlength=1) if labels else np.zeros(1)
    longs = np.array([max(a.width, a.height) for a in map(ds.annotation, ids)], np.float64)
    allb = np.concatenate(boxes) if boxes else np.zeros((0, 4), np.float32)
    side = np.sqrt(np.clip(allb[:, 2] - allb[:, 0], 0, None) * np.clip(allb[:, 3] - allb[:, 1], 0, None))
    shrink = np.minimum(1.0, SS_MAX_SIDE / np.maximum(longs, 1))  # each image's factor where the search runs
    side_ss = side * np.repeat(shrink, [len(b) for b in boxes]) if boxes else side
    return DataFacts(
        train_images=len(ids), train_boxes=int(len(allb)), classes=ds.num_classes,
        median_object_side=float(np.median(side)) if len(side) else 0.0,
        small_object_side=float(np.percentile(side, 5)) if len(side) else 0.0,
        median_long_side=float(np.median(longs)) if len(longs) else 0.0,
        small_object_side_ss=float(np.percentile(side_ss, 5)) if len(side) else 0.0,
        most_of_a_class=max((int(np.bincount(lab).max()) for lab in labels if len(lab)), default=0), densest_per_image=float(per_class.max() / max(len(ids), 1)),
        class_nms_losses=class_nms_losses(pairs, ds.num_classes), class_names=tuple(ds.classes),
    )  # fmt: skip


def choose(facts: DataFacts, device: str, bf16: bool = False, fg_per_step: int = FG_PER_STEP) -> list[Choice]:
    """The recipe for ``facts`` on ``device`` (``cpu`` or ``cuda``), one :class:`Choice` per key; ``bf16``: the
    CPU computes the networks in bfloat16 (``features.precision`` auto or bf16 where that is native);
    ``fg_per_step``: the foreground windows a fine-tuning step (``finetune.fg_per_batch``)."""
    gpu = device == "cuda"
    out: list[Choice] = []

    if gpu:
        out += [
            Choice("proposals.method", "ss_multibox", "a GPU trains MultiBox in minutes; it adds boxes selective search misses"),
            Choice("multibox.patience", MB_PATIENCE, f"trained while its recall@0.5 on held-out training images rises "
                   f"(stopped after {MB_PATIENCE} epochs without a gain; the best epoch kept)"),
        ]  # fmt: skip
    else:
        out.append(Choice("proposals.method", "ss", "on a CPU MultiBox's training costs minutes for a point or two of recall"))
    out.append(Choice("proposals.ss.max_side", SS_MAX_SIDE, f"selective search on images shrunk to {SS_MAX_SIDE} px at "
                      f"most (the training images' longer side: median {facts.median_long_side:.0f} px): its time grows "
                      "faster than the pixels (0.8 s an image at 500 px on a 2-core CPU, 3.6 at 1000, 29 at 2000)"))  # fmt: skip
    small = facts.small_object_side_ss
    min_side = int(np.clip(np.floor(0.8 * small), 8, 20)) if facts.train_boxes else 20
    where = "" if abs(small - facts.small_object_side) < 0.5 else f" where the search runs ({facts.small_object_side:.0f} px at full size)"
    out.append(Choice("proposals.ss.min_box_side", min_side,
                      f"5% of the training objects are under {small:.0f} px{where}: boxes down to {min_side} px kept"))  # fmt: skip

    warp_side = WARP_MAX_SIDE_GPU if gpu else WARP_MAX_SIDE
    photo_mib = warp_side * (warp_side * 3 / 4) * 3 * 4 / 2**20  # a 4:3 photo of that size as floats
    cache = FinetuneConfig.image_cache_mb
    out.append(Choice("features.max_side", warp_side, f"crops warped from images shrunk to {warp_side} px at most (by area "
                      f"averaging, which a warp's sampling lacks): fine-tuning's {cache // 1024}-GiB cache of decoded images "
                      f"then holds {cache / photo_mib:.0f} 4:3 photos, where a phone's 12-MP photo is 146 MB as floats"
                      + ("" if gpu else "; crops of 64-96 px need no more")))  # fmt: skip
    if gpu:
        out += [
            Choice("features.mode", "warp", "R-CNN's warped crops: a GPU affords a pass per proposal"),
            Choice("features.input_size", 224, "GoogLeNet's own input size"),
        ]
    else:
        top_n = int(np.clip(round(CPU_CROPS / max(facts.train_images, 1) / 50) * 50, TOP_N_MIN, TOP_N_MAX))
        size = CPU_CROP_BF16 if bf16 else CPU_CROP
        if bf16:
            why = (f"{size}-px crops where the CPU computes bfloat16: roadsigns 77.3 against 73.7 VOC07 mAP at "
                   f"{CPU_CROP} px (means of seeds 0-2), for 1.5x the fine-tuning's time (objects here: median "
                   f"{facts.median_object_side:.0f} px)")
        else:
            why = (f"{size}-px crops: 0.24 GFLOP each, a CPU's budget in fp32 ({CPU_CROP_BF16} px: +1.2 to +5.5 VOC07 points "
                   f"on roadsigns for 2.25x the networks' arithmetic; objects here: median {facts.median_object_side:.0f} px)")
        out += [
            Choice("features.mode", "warp", "warped crops: the roi path's fine-tuning did not learn on small images "
                   "(roadsigns 49.7 against 66.3 VOC07 mAP)"),
            Choice("features.input_size", size, why),
            Choice("features.padding", size * 16 // 224, f"R-CNN's 16 px of context at 224, scaled to {size}"),
            Choice("proposals.ss.merge_iou", SS_MERGE_IOU, f"near-duplicate boxes (IoU > {SS_MERGE_IOU}) merged before the "
                   "cap: roadsigns' test recall@0.5 0.845 -> 0.884 with 333 boxes an image instead of 394 (71.6 against "
                   "66.3 VOC07 mAP)"),
            Choice("proposals.top_n", top_n, f"a random {top_n} of selective search's boxes an image: about "
                   f"{CPU_CROPS // 1000}k crops over {facts.train_images} training images"),
        ]  # fmt: skip

    if gpu:
        steps = int(np.clip(round(FT_PASSES * facts.train_boxes / fg_per_step / 10) * 10, FT_STEPS, FT_MAX_GPU))
        rule = f"about {FT_PASSES} looks at each box, within {FT_STEPS}-{FT_MAX_GPU} steps"
        lr, lr_why = GPU_LR, f"the CPU's {CPU_LR} is unmeasured at 224 px and thousands of steps"
    else:
        steps = FT_STEPS
        rule = ("fewer steps for fewer boxes cost points (150 steps: a 160-photo COCO set of 187 boxes 74.4 against 81.5 "
                "VOC07 mAP, the shape demo 58.2 against 80.7), more did not pay (roadsigns, 900 steps: 74.4 against 74.7)")
        lr, lr_why = CPU_LR, ("roadsigns, fp32: 77.9 / 76.6 VOC07 mAP over seeds 0 / 1 against 74.8 / 75.0 at 0.01, 77.5 at "
                              "0.04; in bf16 at 96 px 78.7 against 78.8; a 160-photo COCO set 81.6 against 81.0, COCO AP "
                              "45.7 against 41.1; the demo on 320 test images 79.2 against 77.5, seeds 0-2")
    looks = steps * fg_per_step / max(facts.train_boxes, 1)
    why = f"{fg_per_step} foreground windows a step: each of the {facts.train_boxes} training boxes seen about {looks:.0f} times; {rule}"
    out += [
        Choice("finetune.enabled", True, "features from a 10-class (or ImageNet) backbone do not carry over by themselves"),
        Choice("finetune.iterations", steps, why),
        Choice("finetune.lr", lr, f"a short run: {lr / RCNN_LR:.0f}x R-CNN's base rate, on every layer alike ({lr_why})"),
        Choice("finetune.classifier_lr_mult", 1.0, "(with the higher base rate)"),
        Choice("finetune.bias_lr_mult", 1.0, "(with the higher base rate)"),
        Choice("finetune.step_size", max(1, int(steps * 0.8)), "lr x 0.1 for the last fifth of the steps"),
    ]  # fmt: skip
    if not gpu:
        out += [
            Choice("finetune.batch_size", 64, "half of each batch foreground (R-CNN: a quarter): 11 VOC07 points on "
                   "the demo"),
            Choice("finetune.bg_candidates", BG_CANDIDATES, f"each step's background: the hardest of {BG_CANDIDATES}x as many "
                   "draws (roadsigns, bf16: 72.6 -> 77.6 VOC07 mAP, trafficlight 30 -> 42, for 1.5x the fine-tuning's time)"),
            Choice("detect.scores", "softmax", "the fine-tuned classifier scored roadsigns above the SVMs after each of "
                   "three fine-tunings (69.1 / 72.5 / 73.5 against 66.3 / 71.6 / 71.7 VOC07 mAP)"),
            Choice("svm.classifiers", False, "the classifier scores, so no SVMs: only the box regressors, and a train "
                   "image's features only for the proposals they learn from (0.7% of them on roadsigns: the features "
                   "stage 584 -> 168 s, the same 72.5 VOC07 mAP); detect.scores=svm trains the SVMs"),
        ]  # fmt: skip
    out += detection_choices(facts)
    when = "" if gpu else " (where SVMs are trained: detect.scores=svm)"
    out += [
        Choice("svm.C", None, f"chosen by cross-validation over the training images{when}"),
    ]  # fmt: skip
    if gpu:
        out.append(Choice("svm.C_grid", [0.001, 0.01, 0.1], "around R-CNN's 0.001: fine-tuned features want a larger C"))
    else:
        out += [
            Choice("svm.C_grid", [0.01, 0.1], f"smaller Cs leave classes degenerate on fine-tuned features (roadsigns){when}"),
            Choice("svm.folds", 2, f"each (C, fold) is a mining pass of minutes on a CPU{when}"),
        ]  # fmt: skip
    return out


def detection_choices(facts: DataFacts) -> list[Choice]:
    """Per-class NMS, and how many boxes of a class an image and the split keep, from the training objects."""
    names = facts.class_names or tuple(f"class {c}" for c in range(len(facts.class_nms_losses)))
    crowded = []
    for name, losses in zip(names, facts.class_nms_losses):
        if (t := nms_choice(losses)) != NMS_CHOICES[0]:
            lost = dict(losses)
            crowded.append(f"{name} at {t} (R-CNN's {NMS_CHOICES[0]} would remove {lost[NMS_CHOICES[0]]:.1%} of its training "
                           f"objects from a perfect detector's boxes, {t} {lost[t]:.1%})")  # fmt: skip
    why = (f"the detector's own, per class from its training objects: {'; '.join(crowded)}; R-CNN's {NMS_CHOICES[0]} for the "
           "rest" if crowded else f"the detector's own: R-CNN's {NMS_CHOICES[0]} for every class, whose training objects "
           f"barely overlap each other (NMS at {NMS_CHOICES[0]} would remove at most {NMS_LOSS:.0%} of them)")  # fmt: skip
    per_class = max(PER_CLASS, 5 * facts.most_of_a_class)
    split = max(PER_CLASS_SPLIT, float(np.ceil(3 * facts.densest_per_image)))
    return [
        Choice("detect.nms_iou", None, why),
        Choice("detect.max_per_class", per_class, f"each image's {per_class} best boxes of a class before NMS (R-CNN's "
               f"{PER_CLASS}, or 5 for each of the {facts.most_of_a_class} objects of a class a training image holds at most)"),
        Choice("detect.max_per_class_split", split, f"each class's best {split:g} detections per test image over the split "
               f"(R-CNN's {PER_CLASS_SPLIT:g}, or 3x the {facts.densest_per_image:.1f} objects per image of the most "
               "numerous training class)"),
    ]  # fmt: skip


def as_overrides(choices: list[Choice]) -> list[str]:
    """``key=value`` overrides (Hydra's grammar) for ``choices``."""
    return [f"{c.key}={override_value(c.value)}" for c in choices]


def describe(choices: list[Choice], applied: set[str]) -> list[dict]:
    """The choices as recorded in metrics.json: each key, value, reason and whether it was applied (a key the
    command line or the dataset's recipe set is not)."""
    return [{"key": c.key, "value": c.value, "why": c.why, "applied": c.key in applied} for c in choices]


def route(cfg, argv: list[str], ds) -> tuple[list[str], list[dict]]:
    """The default route for ``cfg``'s dataset ``ds``: ``(overrides to apply beneath the dataset's recipe and
    the command line, the record for metrics.json)``. A choice is applied unless the command line or the
    dataset's (or pretraining preset's) recipe sets its key or a section above it."""
    import torch

    from .config import override_keys, preset_recipe
    from .machine import native_bf16

    device = "cuda" if cfg.device.value == "cuda" or (cfg.device.value == "auto" and torch.cuda.is_available()) else "cpu"
    bf16 = device == "cpu" and cfg.features.precision.value in ("auto", "bf16") and native_bf16("cpu")
    choices = choose(data_facts(ds), device, bf16, cfg.finetune.fg_per_batch)
    if cfg.detector or cfg.ensemble:  # detecting with a given detector: it scores as it was trained (image= alone
        choices = [c for c in choices if not c.key.startswith("detect.")]  # detects with this configuration's own)
    given = override_keys(list(argv) + preset_recipe(cfg))
    if "finetune.enabled" in given and not cfg.finetune.enabled:  # no fine-tuned classifier to score with
        choices = [c for c in choices if c.key not in ("detect.scores", "svm.classifiers")]
    if "detect.scores" in given and cfg.detect.scores is not None and cfg.detect.scores.value == "svm":
        choices = [c for c in choices if c.key != "svm.classifiers"]  # the SVMs are asked for
    applied = [c for c in choices if not any(c.key == k or c.key.startswith(k + ".") for k in given)]
    record = describe(choices, {c.key for c in applied})
    return as_overrides(applied), record


def log_route(record: list[dict]) -> None:
    """What the default route chose and why, and what the command line or the dataset's recipe kept."""
    chosen = [r for r in record if r["applied"]]
    kept = [r["key"] for r in record if not r["applied"]]
    lines = [f"  {r['key']}={override_value(r['value'])}  ({r['why']})" for r in chosen]  # as a command line takes it
    log.info("auto: settings chosen from the device and the data (auto=false for R-CNN's defaults; any key=value "
             "overrides one):\n%s%s", "\n".join(lines),
             f"\n  kept as given: {', '.join(kept)}" if kept else "")  # fmt: skip
