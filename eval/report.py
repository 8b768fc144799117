"""The evaluation report: a markdown table and precision/recall curves."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from rcnn.viz import png

__all__ = ["markdown", "plot_pr"]


def percent_cell(v: float | None) -> str:
    """A fraction in a table as a percentage, "-" where it is not known (None or NaN)."""
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"


def count_cell(v: int | None) -> str:
    """A count in a table, "-" where it is not known."""
    return "-" if v is None else str(v)


def markdown(metrics: dict, classes: list[str]) -> str:
    """Summary line and a per-class table (AP in percent; '-' where a class has no ground truth)."""
    keys = ["voc07_map", "voc_map", "ilsvrc_map", "coco_map", "coco_map50", "coco_map75"]
    lines = [
        f"# Evaluation: {metrics['dataset']} / {metrics['split']} ({metrics['detections_count']} detections)",
        "",
        "| " + " | ".join(keys) + " |",
        "|" + "---:|" * len(keys),
        "| " + " | ".join(percent_cell(metrics[k]) for k in keys) + " |",
        "",
        "| class | VOC07 AP | VOC AP | ILSVRC AP | COCO AP |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in classes:
        pc = metrics["per_class"][name]
        lines.append(f"| {name} | {percent_cell(pc['voc07'])} | {percent_cell(pc['voc'])} | {percent_cell(pc['ilsvrc'])} | {percent_cell(pc['coco'])} |")
    if metrics.get("analysis"):
        lines += ["", *analysis_markdown(metrics["analysis"], metrics["per_class"])]
    return "\n".join(lines) + "\n"


def analysis_markdown(a: dict, per_class_ap: dict) -> list[str]:
    """The error analysis's tables (percent): what it finds, the error types of the top-ranked detections
    and the PR-breakdown areas overall and per class (worst VOC AP first), the sensitivity bins."""
    from .analyze import ASPECT_BINS, ERRORS, PR_LEVELS, SIZE_BINS, findings

    o = a["overall"]
    out = ["## Error analysis", "", *[f"- {f}" for f in findings(a)], ""]
    head = ["class", "objects", "missed", "no proposal", *ERRORS, *[lv.upper() for lv in PR_LEVELS]]
    out += ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]

    def row(name, e, objects, missed, unproposed):
        pr = e.get("pr_breakdown") or {}
        return (f"| {name} | {objects} | {missed} | {count_cell(unproposed)} | "
                + " | ".join(percent_cell(e.get(k)) for k in ERRORS) + " | " + " | ".join(percent_cell(pr.get(lv)) for lv in PR_LEVELS)
                + " |")  # fmt: skip

    pcs = a["per_class"]
    out.append(row("**all**", o, sum(p["objects"] for p in pcs.values()), sum(p["missed"] for p in pcs.values()),
                   o.get("unproposed")))  # fmt: skip
    worst = sorted(pcs, key=lambda n: (per_class_ap[n]["voc"] is None, per_class_ap[n]["voc"] or 0))
    out += [row(n, pcs[n], pcs[n]["objects"], pcs[n]["missed"], pcs[n].get("unproposed")) for n in worst]
    s = o["sensitivity"]
    out += ["", "Normalised AP by object size and aspect ratio (each class's own percentiles):", "",
            "| | " + " | ".join(b.upper() for b in SIZE_BINS) + " | all |", "|---|" + "---:|" * 6,
            "| size | " + " | ".join(percent_cell(s["size"][b]) for b in SIZE_BINS) + f" | {percent_cell(s['all'])} |",
            "| | " + " | ".join(b.upper() for b in ASPECT_BINS) + " | |",
            "| aspect | " + " | ".join(percent_cell(s["aspect"][b]) for b in ASPECT_BINS) + f" | {percent_cell(s['all'])} |"]  # fmt: skip
    return out


def plot_pr(curves: list[tuple[np.ndarray, np.ndarray]], aps: list[float], classes: list[str], path: Path, title: str) -> Path:
    """VOC precision/recall curves, one line per class with ground truth (at most 20, best AP first)."""
    shown = sorted((k for k, a in enumerate(aps) if not math.isnan(a)), key=lambda k: -aps[k])[:20]
    with png(path, size=(7, 5)) as ax:
        for k in shown:
            rec, prec = curves[k]
            if len(rec):
                ax.plot(rec, prec, lw=1.2, label=f"{classes[k]} ({100 * aps[k]:.1f})")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("recall")
        ax.set_ylabel("precision")
        ax.set_title(title)
        if shown:
            ax.legend(fontsize=7, loc="lower left", ncol=2)
    return path


# Colours of the error types (RGB 0-255; also the report's boxes) and of the PR-breakdown levels.
ERROR_COLOURS = {
    "correct": (89, 161, 79), "localization": (78, 121, 167), "similar": (242, 142, 43),
    "other": (225, 87, 89), "background": (237, 201, 72),
}  # fmt: skip
PR_COLOURS = ["#9e9e9e", "#d9d9d9", "#4f82bd", "#bf4f4c", "#5ce661", "#8063a3", "#ff9900"]


def plot_errors(counts: np.ndarray, multiples: np.ndarray, path: Path, title: str) -> Path:
    """R-CNN's Figure 5: the share of each error type among the top-ranked detections, stacked, against
    how many are considered (multiples of the objects, log scale)."""
    from .analyze import ERRORS

    total = counts.sum(axis=1, keepdims=True)
    keep = total[:, 0] > 0
    shares = np.where(total > 0, counts / np.maximum(total, 1), 0)[keep]
    with png(path, size=(4.6, 3.2), dpi=90) as ax:
        if keep.any():
            ax.stackplot(multiples[keep], shares.T * 100, labels=[e.replace("localization", "localisation") for e in ERRORS],
                         colors=[np.array(ERROR_COLOURS[e]) / 255 for e in ERRORS], alpha=0.9)  # fmt: skip
            ax.set_xscale("log", base=2)
            ax.legend(fontsize=7, loc="lower left")
        ax.set_ylim(0, 100)
        ax.set_xlabel("top-ranked detections (x the objects)")
        ax.set_ylabel("share of detections (%)")
        ax.set_title(title, fontsize=9)
    return path


def plot_pr_breakdown(precision: np.ndarray, recall: np.ndarray, path: Path, title: str) -> Path:
    """COCO's analysis plot: the PR curves C75 ... FN as stacked areas, each labelled with its area."""
    from .analyze import PR_LEVELS

    areas = precision.mean(axis=1)
    with png(path, size=(4.6, 3.2), dpi=90) as ax:
        below = np.zeros_like(recall)
        for m, level in enumerate(PR_LEVELS):
            ax.fill_between(recall, below, precision[m], color=PR_COLOURS[m], lw=0,
                            label=f"[{areas[m]:.3f}] {level.upper()}")  # fmt: skip
            below = np.maximum(below, precision[m])
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("recall")
        ax.set_ylabel("precision")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7, loc="lower left")
    return path


def plot_sensitivity(sens: dict, path: Path, title: str) -> Path:
    """Normalised AP per size bin and per aspect-ratio bin (bars), with AP_N over all objects (line)."""
    names = [f"size {k.upper()}" for k in sens["size"]] + [f"aspect {k.upper()}" for k in sens["aspect"]]
    values = [v for v in sens["size"].values()] + [v for v in sens["aspect"].values()]
    with png(path, size=(6.0, 3.0), dpi=90) as ax:
        x = np.arange(len(names))
        ax.bar(x, [100 * (v or 0) for v in values], color=["#4f82bd"] * 5 + ["#f28e2b"] * 5)
        if sens["all"] is not None:
            ax.axhline(100 * sens["all"], color="k", lw=1, ls="--", label=f"all objects {100 * sens['all']:.1f}")
            ax.legend(fontsize=7)
        ax.set_xticks(x, names, rotation=40, ha="right", fontsize=7)
        ax.set_ylabel("normalised AP (%)")
        ax.set_title(title, fontsize=9)
    return path
