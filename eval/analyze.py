"""Why a detector fails: Hoiem et al.'s false-positive breakdown, COCO's precision/recall breakdown and
the sensitivity of AP to object size and aspect ratio.

False positives (Hoiem, Chodpathumwan and Dai, "Diagnosing Error in Object Detectors", ECCV 2012; R-CNN's
Figure 5). Each class's detections, best first, are matched as VOC matches them (IoU >= 0.5 with a box
of the class not yet taken); every one that is not correct gets the first type that fits it:

- ``localization``: IoU in [0.1, 0.5) with a box of its class, or a duplicate (IoU >= 0.5, box taken);
- ``similar``: IoU >= 0.1 with a box of a similar class (the same group: COCO's supercategory, VOC's
  animals / vehicles / furniture, or ``eval.groups``);
- ``other``: IoU >= 0.1 with a box of any other class;
- ``background``: none of these.

A detection whose best match is a difficult (or crowd) box of its class is neither right nor wrong
and is left out, as the VOC devkit leaves it out. The shares are of the class's top-ranked
detections: its best N, N the number of its (non-difficult) objects, as Hoiem's pie charts.

PR breakdown (COCO's ``analyze()``, CocoEval.m): per class, the precision/recall curve at IoU 0.75
(``c75``), 0.5 (``c50``), 0.1 (``loc``: localisation errors forgiven), with confusions within the
class's group forgiven (``sim``: the group's other boxes become "ignore" regions, IoU 0.1), with every
class confusion forgiven (``oth``), with background errors forgiven (``bg``: precision 1 wherever the
previous curve has a point) and the false-negative ceiling (``fn``: 1). Each is computed by pycocotools'
COCOeval (101 recall points, 100 detections an image); its area is the mean precision over the recall
points. The ignore regions keep their own IoU (COCOeval's Python port reads ``ignore`` only from
``iscrowd``; :class:`_IgnoreAwareEval` restores the MATLAB reference's ``ignore`` flag).

Sensitivity (Hoiem): each class's objects binned by size (box area) and by aspect ratio (w / h) at the
class's own 10th, 30th, 70th and 90th percentiles (XS S M L XL; XT T M W XW; by percentile rank, so
equal values share a bin); the AP of a bin counts
the bin's objects as positives and leaves out detections of the class's other objects. Precision is
normalised to a common number of objects (``P_N = R N / (R N + FP)``, N the mean number of objects a
class has in the split), so that a bin holding 10% of the objects is not punished for the false
positives of all of them; "all" is the same normalised AP over every object.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from pycocotools.cocoeval import COCOeval
from scipy.stats import rankdata

from rcnn.datasets import DatasetError, DetectionDataset

from .coco import coco_api, coco_gt, coco_results
from .detections import Detections, class_order
from .voc import _curve, class_matches, iou_one, voc_ap, voc_rule

__all__ = [
    "ANALYSIS_VERSION", "MULTIPLES", "Analysis", "analyze", "findings", "ERRORS", "PR_LEVELS", "SIZE_BINS", "ASPECT_BINS", "VOC_GROUPS", "ClassErrors",
    "class_groups", "classify_errors", "error_shares", "error_curve", "pr_breakdown", "sensitivity",
]  # fmt: skip

ANALYSIS_VERSION = 2  # bump when the analysis or its report changes what it computes

ERRORS = ("correct", "localization", "similar", "other", "background")
PR_LEVELS = ("c75", "c50", "loc", "sim", "oth", "bg", "fn")
SIZE_BINS = ("xs", "s", "m", "l", "xl")
ASPECT_BINS = ("xt", "t", "m", "w", "xw")  # extra tall ... extra wide
PERCENTILES = (10, 30, 70, 90)

# Hoiem et al.'s similar classes on PASCAL VOC (R-CNN's Figure 5 shows these three groups).
VOC_GROUPS = {
    "animals": ["bird", "cat", "cow", "dog", "horse", "sheep"],
    "vehicles": ["aeroplane", "bicycle", "boat", "bus", "car", "motorbike", "train"],
    "furniture": ["chair", "diningtable", "sofa"],
}

IGNORED = -1  # a detection matched to a difficult box: left out


def class_groups(ds: DetectionDataset, groups: list[list[str]] | None = None) -> list[str | None]:
    """Each class's group of similar classes: ``groups`` (lists of class names, as ``eval.groups``) where
    given, else the dataset's supercategories (COCO), else VOC's groups for classes with VOC names;
    None = no group."""
    if groups:
        of = {}
        for k, members in enumerate(groups):
            for cls in members:
                if cls not in ds.classes:
                    raise DatasetError(f"eval.groups: group {list(members)} names {cls!r}, not a class of {ds.name} "
                                       f"(classes: {', '.join(ds.classes[:20])})")
                of[cls] = f"group {k + 1}"
        return [of.get(c) for c in ds.classes]
    if any(ds.supercategories):
        return list(ds.supercategories)
    voc = {cls: name for name, members in VOC_GROUPS.items() for cls in members}
    return [voc.get(c) for c in ds.classes]


@dataclass
class ClassErrors:
    """One class's detections, best first, each with its type.

    det: index into the detections [d] (ignored ones left out); kind: index into ERRORS [d];
    gt_box: the box that decided the type (index in the detection's image's ground truth; -1 for
    background); iou: the detection's IoU with that box. npos: the class's non-difficult
    objects. missed: (image index, box index) of those no detection found (IoU >= 0.5). proposal_iou: each
    of those objects' best IoU with its image's proposals, when the proposals are known (else None)."""

    label: int
    det: np.ndarray
    kind: np.ndarray
    gt_box: np.ndarray
    iou: np.ndarray
    npos: int
    missed: list[tuple[int, int]]
    proposal_iou: dict[tuple[int, int], float] | None = None

    def unproposed(self, iou_threshold: float = 0.5) -> list[tuple[int, int]] | None:
        """The objects no proposal overlaps by ``iou_threshold``: beyond any score's reach (box regression
        aside); None when the proposals are not known."""
        if self.proposal_iou is None:
            return None
        return [ij for ij, v in self.proposal_iou.items() if v < iou_threshold]

    def top(self, multiple: float = 1.0) -> np.ndarray:
        """Kinds of the top-ranked detections: the best ``round(multiple * npos)``."""
        return self.kind[: int(round(multiple * self.npos))]


def classify_errors(
    dets: Detections,
    gts,
    num_classes: int,
    groups: list[str | None],
    iou_threshold: float = 0.5,
    loc_iou: float = 0.1,
) -> list[ClassErrors]:
    """Every class's detections typed as Hoiem et al. type them (see the module's docstring)."""
    out = []
    for c in range(num_classes):
        similar = [k for k, g in enumerate(groups) if g is not None and g == groups[c] and k != c]
        order = class_order(dets, c)
        taken = {}  # image -> which of its boxes a detection of class c has taken
        rows = []  # (det, kind, gt box, iou)
        for k in order:
            i = int(dets.image[k])
            boxes, labels, difficult = gts[i]
            labels = np.asarray(labels)
            ov = iou_one(dets.boxes[k].astype(np.float64), np.asarray(boxes, np.float64)) if len(labels) else np.zeros(0)
            own = np.flatnonzero(labels == c)
            if len(own):
                j = own[np.argmax(ov[own])]
                if ov[j] >= iou_threshold:
                    if difficult[j]:
                        continue  # neither right nor wrong
                    seen = taken.setdefault(i, np.zeros(len(labels), bool))
                    rows.append((k, 1 if seen[j] else 0, j, ov[j]))  # a duplicate is a localisation error
                    seen[j] = True
                    continue
                if ov[j] >= loc_iou:
                    rows.append((k, 1, j, ov[j]))
                    continue
            kind, j = 4, -1
            for candidate, members in ((2, np.flatnonzero(np.isin(labels, similar))), (3, np.flatnonzero(labels != c))):
                if len(members) and ov[members].max() >= loc_iou:
                    kind, j = candidate, members[np.argmax(ov[members])]
                    break
            rows.append((k, kind, j, ov[j] if j >= 0 else (ov.max() if len(ov) else 0.0)))
        npos, missed = 0, []
        for i, (_boxes, labels, difficult) in enumerate(gts):
            for j in np.flatnonzero((np.asarray(labels) == c) & ~np.asarray(difficult, bool)):
                npos += 1
                if not taken.get(i, np.zeros(len(labels), bool))[j]:
                    missed.append((i, int(j)))
        cols = list(zip(*rows)) if rows else [[]] * 4
        out.append(ClassErrors(
            label=c, det=np.asarray(cols[0], np.int64), kind=np.asarray(cols[1], np.int64),
            gt_box=np.asarray(cols[2], np.int64), iou=np.asarray(cols[3], np.float64), npos=npos, missed=missed,
        ))  # fmt: skip
    return out


def proposal_overlaps(gts, proposals: Sequence[np.ndarray], num_classes: int) -> list[dict[tuple[int, int], float]]:
    """Per class, ``{(image index, box index): best IoU with the image's proposals}`` of its non-difficult
    objects (``proposals[i]``: image i's boxes ``[P, 4]``, the ones the detections were made from)."""
    from proposals.recall import best_overlaps

    out = [{} for _ in range(num_classes)]
    for i, (boxes, labels, difficult) in enumerate(gts):
        keep = np.flatnonzero(~np.asarray(difficult, bool))
        if not len(keep):
            continue
        best = best_overlaps(np.asarray(boxes, np.float32)[keep], np.asarray(proposals[i], np.float32))
        for j, v in zip(keep, best):
            out[int(labels[j])][(i, int(j))] = float(v)
    return out


def _shares(kinds: np.ndarray) -> dict | None:
    if len(kinds) == 0:
        return None
    counts = np.bincount(kinds, minlength=len(ERRORS))
    return {name: float(n) / len(kinds) for name, n in zip(ERRORS, counts)}


def error_shares(errors: list[ClassErrors], classes: list[str], multiple: float = 1.0) -> dict:
    """``{"overall": shares, "per_class": {class: shares}, "detections": n}``: the share of each type
    among the top-ranked detections (``multiple`` x the class's objects); overall pools every class's
    top-ranked detections. None for a class without objects or detections."""
    tops = {classes[e.label]: e.top(multiple) for e in errors if e.npos}
    pooled = np.concatenate([t for t in tops.values()]) if tops else np.zeros(0, np.int64)
    return {
        "overall": _shares(pooled),
        "per_class": {name: _shares(t) for name, t in tops.items()},
        "detections": int(len(pooled)),
    }


def error_curve(errors: list[ClassErrors], multiples: np.ndarray) -> np.ndarray:
    """Counts ``[M, 5]`` of each type among the top ``multiple x objects`` detections of the given
    classes (pooled), for each multiple: R-CNN's Figure 5 as cumulative counts."""
    out = np.zeros((len(multiples), len(ERRORS)), np.int64)
    for e in errors:
        for m, mult in enumerate(multiples):
            out[m] += np.bincount(e.top(mult), minlength=len(ERRORS))
    return out


class _IgnoreAwareEval(COCOeval):
    """COCOeval whose ground truth keeps an ``ignore`` flag of its own (``ignore_other``), as the MATLAB
    reference's does: the Python port's ``_prepare`` overwrites ``ignore`` with ``iscrowd``. Area "all",
    100 detections an image; ``params`` set the rest."""

    def __init__(self, gt, dt, **params):
        super().__init__(gt, dt, iouType="bbox")
        self.params.maxDets = [100]
        self.params.areaRng = [[0.0, 1e10]]
        self.params.areaRngLbl = ["all"]
        for k, v in params.items():
            setattr(self.params, k, v)

    def _prepare(self):
        super()._prepare()
        for anns in self._gts.values():
            for g in anns:
                g["ignore"] = int(bool(g.get("iscrowd")) or bool(g.get("ignore_other")))


def _precision(ev) -> np.ndarray:
    """Run COCOeval quietly: precision ``[T, R, K]`` (area all, 100 detections), -1 -> 0."""
    with contextlib.redirect_stdout(io.StringIO()):
        ev.evaluate()
        ev.accumulate()
    p = ev.eval["precision"][:, :, :, 0, 0].copy()
    p[p < 0] = 0.0
    return p


def pr_breakdown(dets: Detections, ds: DetectionDataset, split: str, groups: list[str | None]) -> dict:
    """COCO's PR breakdown (module docstring): ``precision`` ``[7, R, C]`` (levels x recall points x
    classes), ``recall`` ``[R]``, ``areas`` ``{class: {level: area}}`` and ``overall`` (the areas
    averaged over the classes with objects in the split; None for the others)."""
    gt_dict = coco_gt(ds, split)
    results = coco_results(dets, ds, split)
    cats = [int(c) for c in ds.category_ids]
    has_gt = {a["category_id"] for a in gt_dict["annotations"] if not a["iscrowd"]}
    rec = np.linspace(0, 1, 101)
    ps = np.zeros((len(PR_LEVELS), len(rec), len(cats)))
    if results and gt_dict["annotations"]:
        gt = coco_api(gt_dict)
        with contextlib.redirect_stdout(io.StringIO()):
            dt = gt.loadRes([dict(r) for r in results])
        ev = _IgnoreAwareEval(gt, dt, iouThrs=np.array([0.75, 0.5, 0.1]), catIds=cats)
        # COCOeval sorts catIds: its class axis is in category-id order, the dataset's may not be
        ps[:3] = _precision(ev)[:, :, np.searchsorted(np.unique(cats), cats)]
        for k, cat in enumerate(cats):
            own = [dict(r) for r in results if r["category_id"] == cat]
            if not own or cat not in has_gt:
                continue
            with contextlib.redirect_stdout(io.StringIO()):
                dt_k = gt.loadRes(own)
            group = groups[k]
            same = {c for c, g in zip(cats, groups) if c == cat or (group is not None and g == group)}
            for level, keep in ((3, lambda a: a["category_id"] in same), (4, lambda a: True)):
                anns = [{**a, "ignore_other": int(a["category_id"] != cat)} for a in gt_dict["annotations"] if keep(a)]
                sub = coco_api({**gt_dict, "annotations": anns})
                ev = _IgnoreAwareEval(sub, dt_k, iouThrs=np.array([0.1]), useCats=0)
                ps[level, :, k] = _precision(ev)[0, :, 0]
        ps[5] = ps[4] > 0
        ps[6] = 1.0
    for k, cat in enumerate(cats):
        if cat not in has_gt:
            ps[:, :, k] = 0.0
    areas = ps.mean(axis=1)  # [7, C]
    valid = [k for k, c in enumerate(cats) if c in has_gt]
    per_class = {
        name: ({lv: float(areas[m, k]) for m, lv in enumerate(PR_LEVELS)} if k in valid else None)
        for k, name in enumerate(ds.classes)
    }
    overall = {lv: float(areas[m, valid].mean()) for m, lv in enumerate(PR_LEVELS)} if valid else None
    return {"precision": ps, "recall": rec, "areas": per_class, "overall": overall, "classes_with_objects": valid}


def percentile_bins(values: np.ndarray) -> np.ndarray:
    """Bin 0..4 of each value by its percentile rank among ``values`` (ties share their mean rank, so
    equal values share a bin): below 10, 10-30, 30-70, 70-90, 90 and above."""
    rank = (rankdata(values, method="average") - 0.5) / len(values) * 100
    return np.searchsorted(PERCENTILES, rank, side="right")


def sensitivity(dets: Detections, gts, num_classes: int, classes: list[str], iou_threshold: float = 0.5) -> dict:
    """Normalised AP per size bin and per aspect-ratio bin (module docstring): ``{"size": {bin: AP_N},
    "aspect": {...}, "all": AP_N, "per_class": {class: {"size", "aspect", "all"}}, "n": N}``; a bin's
    figure is the mean over the classes with objects in it."""
    labels = [np.asarray(l) for _b, l, _d in gts]
    npos = [sum(int(((l == c) & ~np.asarray(d, bool)).sum()) for l, (_b, _l, d) in zip(labels, gts))
            for c in range(num_classes)]  # fmt: skip
    n_norm = float(np.mean([n for n in npos if n])) if any(npos) else 0.0
    rule = voc_rule(iou_threshold)

    def ap_n(c: int, where: list[tuple[int, int]], keep: np.ndarray) -> float:
        """Class c's normalised AP counting as positives only the objects ``where[keep]`` (the others
        become difficult: detections matching them are left out)."""
        flagged = list(gts)
        for (i, j) in [w for w, k in zip(where, keep) if not k]:
            boxes, lab, d = flagged[i]
            d = np.array(d, bool)
            d[j] = True
            flagged[i] = (boxes, lab, d)
        tp, fp, n = class_matches(dets, flagged, c, rule)
        rec, _ = _curve(tp, fp, n)
        prec = rec * n_norm / np.maximum(rec * n_norm + np.cumsum(fp), np.finfo(np.float64).eps)
        return voc_ap(rec, prec, use_07_metric=False)

    per_class = {}
    for c, name in enumerate(classes):
        if not npos[c]:
            per_class[name] = None
            continue
        where = [(i, int(j)) for i, l in enumerate(labels) for j in np.flatnonzero(l == c)]
        boxes = np.array([gts[i][0][j] for i, j in where], np.float64).reshape(-1, 4)
        easy = ~np.array([bool(gts[i][2][j]) for i, j in where])
        w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        entry = {"all": ap_n(c, where, np.ones(len(where), bool))}
        for what, values, names in (("size", w * h, SIZE_BINS), ("aspect", w / np.maximum(h, 1e-9), ASPECT_BINS)):
            b = np.full(len(values), -1)
            b[easy] = percentile_bins(values[easy])
            entry[what] = {bn: ap_n(c, where, b == k) if (b == k).any() else None for k, bn in enumerate(names)}
        per_class[name] = entry

    def mean(get) -> float | None:
        vals = [v for e in per_class.values() if e is not None and (v := get(e)) is not None]
        return float(np.mean(vals)) if vals else None

    return {
        "size": {b: mean(lambda e, b=b: e["size"][b]) for b in SIZE_BINS},
        "aspect": {b: mean(lambda e, b=b: e["aspect"][b]) for b in ASPECT_BINS},
        "all": mean(lambda e: e["all"]),
        "per_class": per_class,
        "n": n_norm,
    }


MULTIPLES = 2.0 ** np.arange(-4, 4.5, 0.5)  # Figure 5's x axis: top-ranked detections, in multiples of the objects


@dataclass
class Analysis:
    """Everything the analysis found on one detections set (see :func:`analyze`)."""

    classes: list[str]
    groups: list[str | None]
    top_multiple: float
    errors: list[ClassErrors]
    shares: dict
    pr: dict
    sensitivity: dict
    iou_threshold: float = 0.5

    def curve(self, labels: list[int] | None = None) -> np.ndarray:
        """Counts ``[len(MULTIPLES), 5]`` of each type among the top-ranked detections of ``labels``
        (default: every class), pooled."""
        chosen = self.errors if labels is None else [self.errors[c] for c in labels]
        return error_curve(chosen, MULTIPLES)

    def metrics(self) -> dict:
        """The ``analysis`` section of eval's metrics.json: ``overall`` and ``per_class.<class>``, each with
        the shares of the top-ranked detections (``correct`` ... ``background``; null without detections),
        ``pr_breakdown`` (the areas ``c75`` ... ``fn``) and ``sensitivity`` (normalised AP per bin)."""
        none = dict.fromkeys(ERRORS)
        sens = self.sensitivity
        unproposed = {e.label: e.unproposed(self.iou_threshold) for e in self.errors}
        known = all(u is not None for u in unproposed.values())
        overall = {
            **(self.shares["overall"] or none),
            "detections": self.shares["detections"],
            "unproposed": sum(len(u) for u in unproposed.values()) if known else None,
            "pr_breakdown": self.pr["overall"],
            "sensitivity": {"size": sens["size"], "aspect": sens["aspect"], "all": sens["all"]},
        }
        per_class = {}
        for e, name in zip(self.errors, self.classes):
            if not e.npos:
                continue
            per_class[name] = {
                **(self.shares["per_class"][name] or none),
                "objects": e.npos,
                "missed": len(e.missed),
                # objects no proposal overlaps by the IoU a match needs, and how many of them were missed
                "unproposed": len(unproposed[e.label]) if known else None,
                "missed_unproposed": len(set(e.missed) & set(unproposed[e.label])) if known else None,
                "group": self.groups[e.label],
                "pr_breakdown": self.pr["areas"][name],
                "sensitivity": sens["per_class"][name],
            }
        return {"top_multiple": self.top_multiple, "iou_threshold": self.iou_threshold, "normalising_objects": sens["n"],
                "overall": overall, "per_class": per_class}  # fmt: skip


def analyze(
    dets: Detections,
    ds: DetectionDataset,
    split: str,
    groups: list[list[str]] | None = None,
    top_multiple: float = 1.0,
    iou_threshold: float = 0.5,
    proposals: Sequence[np.ndarray] | None = None,
) -> Analysis:
    """The whole analysis of ``dets`` on ``ds``'s ``split`` (``groups``: ``eval.groups``); ``proposals``: each
    test image's proposals the detections were made from, in the split's order (to tell which objects no
    proposal reached), when known."""
    from .detections import ground_truth

    gts = ground_truth(ds, split)
    g = class_groups(ds, groups)
    classes = list(ds.classes)
    errors = classify_errors(dets, gts, ds.num_classes, g, iou_threshold)
    if proposals is not None:
        for e, overlaps in zip(errors, proposal_overlaps(gts, proposals, ds.num_classes)):
            e.proposal_iou = overlaps
    return Analysis(
        classes=classes, groups=g, top_multiple=top_multiple, errors=errors,
        shares=error_shares(errors, classes, top_multiple), pr=pr_breakdown(dets, ds, split, g),
        sensitivity=sensitivity(dets, gts, ds.num_classes, classes, iou_threshold), iou_threshold=iou_threshold,
    )  # fmt: skip


def _unproposed_finding(metrics: dict) -> str:
    """The objects no proposal reached, in a sentence: how many, the classes worst off, and their share of
    the objects never detected."""
    pcs = {n: p for n, p in metrics["per_class"].items() if p["objects"]}
    objects = sum(p["objects"] for p in pcs.values())
    missed = sum(p["missed"] for p in pcs.values())
    both = sum(p["missed_unproposed"] for p in pcs.values())
    unproposed = metrics["overall"]["unproposed"]
    iou = f"IoU {metrics.get('iou_threshold', 0.5):g}"
    if not unproposed:
        never = f": the {missed} never detected were proposed but scored too low or suppressed" if missed else ""
        return f"Every object has a proposal at {iou}{never}."
    worst = sorted((n for n in pcs if pcs[n]["unproposed"]), key=lambda n: -pcs[n]["unproposed"] / pcs[n]["objects"])
    where = "; ".join(f"{n} {pcs[n]['unproposed']} of {pcs[n]['objects']}" for n in worst[:3])
    said = (f"{unproposed} of the {objects} objects ({100 * unproposed / max(objects, 1):.0f}%) have no proposal at "
            f"{iou}, beyond any score's reach (box regression aside)")
    said += (f": {where}" if where else "") + f". They are {both} of the {missed} objects never detected"
    rest = missed - both
    if rest:
        return said + f"; the other {rest} {'was' if rest == 1 else 'were'} proposed but scored too low or suppressed."
    return said + "."


def findings(metrics: dict) -> list[str]:
    """What the analysis says, in sentences: where the top-ranked detections go wrong, and how much AP50
    each kind of error costs (the steps of the PR breakdown), largest first."""
    o = metrics["overall"]
    out = []
    if o.get("correct") is not None:
        parts = ", ".join(f"{100 * o[k]:.0f}% {k}" for k in ERRORS[1:])
        out.append(f"Of the {o['detections']} top-ranked detections, {100 * o['correct']:.0f}% are correct; "
                   f"the false positives among them: {parts}.")  # fmt: skip
    pr = o.get("pr_breakdown")
    if pr:
        steps = {
            "localisation errors (IoU 0.1 instead of 0.5)": pr["loc"] - pr["c50"],
            "confusion with similar classes": pr["sim"] - pr["loc"],
            "confusion with other classes": pr["oth"] - pr["sim"],
            "detections on background": pr["bg"] - pr["oth"],
            "objects never detected": pr["fn"] - pr["bg"],
        }
        ranked = sorted(steps.items(), key=lambda kv: -kv[1])
        out.append(f"AP50 is {100 * pr['c50']:.1f} (AP at IoU 0.75: {100 * pr['c75']:.1f}). Forgiving each kind of "
                   "error in turn would add: " + "; ".join(f"{k} +{100 * v:.1f}" for k, v in ranked)
                   + f". The largest loss: {ranked[0][0]}.")  # fmt: skip
    if o.get("unproposed") is not None:
        out.append(_unproposed_finding(metrics))
    s = o.get("sensitivity") or {}
    if s.get("all") is not None:
        size = {k: v for k, v in s["size"].items() if v is not None}
        if size:
            lo, hi = min(size, key=size.get), max(size, key=size.get)
            out.append(f"By size (normalised AP): {' / '.join(f'{k.upper()} {100 * v:.1f}' for k, v in size.items())}; "
                       f"weakest on {lo.upper()}, strongest on {hi.upper()} objects.")  # fmt: skip
    return out
