"""``<out>/eval/report.html``: the evaluation and its error analysis as one self-contained page.

Every image (plots and galleries) is embedded as a data URI: the page opens from disk, offline, and can
be mailed or attached as it is. A script at its end checks that every image decoded and says so in
``#image-check`` (``data-ok="true"``), which the test reads from headless Chromium.
"""

from __future__ import annotations

import base64
import html
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from rcnn import boxes as B
from rcnn.store import atomic_write

from .analyze import ERRORS, PR_LEVELS, Analysis, findings
from .detections import Detections
from .report import ERROR_COLOURS, count_cell, percent_cell

__all__ = ["Thumb", "galleries", "write_html"]

GT_COLOUR = (255, 255, 255)
MISSED_COLOUR = (214, 39, 200)
THUMB = 200  # the longer side of a gallery picture, pixels


@dataclass
class Thumb:
    """One gallery picture: JPEG bytes, the detection or object it shows, a caption."""

    jpeg: bytes
    caption: str
    image_id: object
    box: tuple[float, float, float, float]
    kind: str  # an error type, or "missed"
    score: float | None = None


def _thumb(rgb: np.ndarray, boxes: list[tuple]) -> bytes:
    """The region around ``boxes`` ``(xyxy, rgb colour, label)`` (their union with half its size as
    margin on each side), scaled so its longer side is THUMB px, with the boxes drawn; JPEG bytes."""
    import cv2

    h, w = rgb.shape[:2]
    corners = np.array([b for b, _, _ in boxes], float).reshape(-1, 4)
    x1, y1 = corners[:, :2].min(axis=0)
    x2, y2 = corners[:, 2:].max(axis=0)
    mw, mh = max(x2 - x1, 16) / 2, max(y2 - y1, 16) / 2
    cx1, cy1 = int(max(0, math.floor(x1 - mw))), int(max(0, math.floor(y1 - mh)))
    cx2, cy2 = int(min(w, math.ceil(x2 + mw))), int(min(h, math.ceil(y2 + mh)))
    crop = rgb[cy1:cy2, cx1:cx2]
    scale = THUMB / max(crop.shape[:2])
    out = cv2.resize(crop, (max(1, round(crop.shape[1] * scale)), max(1, round(crop.shape[0] * scale))),
                     interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)  # fmt: skip
    out = np.ascontiguousarray(out)
    for (bx1, by1, bx2, by2), colour, label in boxes:
        p1 = (int(round((bx1 - cx1) * scale)), int(round((by1 - cy1) * scale)))
        p2 = (int(round((bx2 - cx1) * scale)) - 1, int(round((by2 - cy1) * scale)) - 1)
        cv2.rectangle(out, p1, p2, colour, 2)
        if label:
            (tw, th), base = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, 0.4, 1)
            top = min(max(p1[1] - th - base - 2, 0), out.shape[0] - th - base - 2)
            left = min(max(p1[0], 0), max(out.shape[1] - tw - 4, 0))
            cv2.rectangle(out, (left, top), (left + tw + 4, top + th + base + 2), colour, -1)
            cv2.putText(out, label, (left + 2, top + th + 1), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    ok, data = cv2.imencode(".jpg", out[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 85])
    if not ok:
        raise OSError("could not encode a gallery picture as JPEG")
    return data.tobytes()


def galleries(analysis: Analysis, dets: Detections, ds, split: str, size: int) -> dict[int, dict[str, list[Thumb]]]:
    """Per class with objects: ``{"false_positives": [...], "missed": [...]}``: its ``size`` highest-scoring
    detections that are not correct (drawn in their type's colour, with the object that decided the type
    in white) and ``size`` of the objects it never found (largest first, with the class's best-overlapping
    detection in the image, if any)."""
    from .voc import iou_one

    ids = ds.image_ids(split)
    names = list(ds.classes)

    @lru_cache(maxsize=16)
    def image(i: int) -> np.ndarray:
        return ds.load_image(ids[i])

    out = {}
    for e in analysis.errors:
        if not e.npos or size == 0:
            continue
        c = e.label
        fps = []
        for row in np.flatnonzero(e.kind != 0)[:size]:
            k, kind = int(e.det[row]), ERRORS[e.kind[row]]
            box, score = dets.boxes[k].astype(float), float(dets.scores[k])
            i, j = int(dets.image[k]), int(e.gt_box[row])
            ann = ds.annotation(ids[i])
            drawn = [(ann.boxes[j], GT_COLOUR, names[ann.labels[j]])] if j >= 0 else []
            drawn.append((box, ERROR_COLOURS[kind], f"{kind[:3]} {score:.2f} IoU {e.iou[row]:.2f}"))
            with_what = f" with a {names[ann.labels[j]]}" if j >= 0 else ""
            caption = f"{kind}: score {score:.3f}, IoU {e.iou[row]:.2f}{with_what} (image {ids[i]})"
            fps.append(Thumb(_thumb(image(i), drawn), caption, ids[i], tuple(box), kind, score))
        missed = []
        ann_of = {i: ds.annotation(ids[i]) for i, _j in e.missed}
        by_area = sorted(e.missed, key=lambda ij: -float(B.area(ann_of[ij[0]].boxes[ij[1] : ij[1] + 1])[0]))
        for i, j in by_area[:size]:
            gt = ann_of[i].boxes[j].astype(float)
            mine = np.flatnonzero((dets.image == i) & (dets.labels == c))
            drawn, note = [(gt, MISSED_COLOUR, "missed")], "no detection of the class in the image"
            if len(mine):
                ov = iou_one(gt, dets.boxes[mine].astype(np.float64))
                best = mine[int(np.argmax(ov))]
                s = float(dets.scores[best])
                drawn.insert(0, (dets.boxes[best].astype(float), GT_COLOUR, f"{s:.2f} IoU {ov.max():.2f}"))
                note = f"best detection of the class: IoU {ov.max():.2f}, score {s:.3f}"
            if e.proposal_iou is not None:
                best_proposal = e.proposal_iou[(i, j)]
                note += (f"; its best proposal: IoU {best_proposal:.2f}"
                         + (" (none reached it)" if best_proposal < analysis.iou_threshold else ""))  # fmt: skip
            w, h = gt[2] - gt[0], gt[3] - gt[1]
            caption = f"missed {w:.0f} x {h:.0f} px; {note} (image {ids[i]})"
            missed.append(Thumb(_thumb(image(i), drawn), caption, ids[i], tuple(gt), "missed"))
        out[c] = {"false_positives": fps, "missed": missed}
    return out


CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0 auto; max-width: 1180px;
       padding: 0 20px 40px; color: #222; }
h1 { font-size: 22px; margin: 22px 0 4px; } h2 { font-size: 18px; margin-top: 30px; border-bottom: 1px solid #ddd; }
h3 { font-size: 15px; margin: 22px 0 6px; }
.meta, .note { color: #666; } .finding { background: #f6f8fa; border-left: 3px solid #4f82bd; padding: 6px 10px; }
table { border-collapse: collapse; margin: 8px 0; font-variant-numeric: tabular-nums; }
th, td { padding: 3px 9px; border-bottom: 1px solid #eee; text-align: right; } th { background: #fafafa; }
td:first-child, th:first-child { text-align: left; }
.bar { display: inline-block; height: 9px; background: #4f82bd; vertical-align: middle; margin-right: 6px; }
.plots { display: flex; flex-wrap: wrap; gap: 14px; } figure { margin: 0; } figure > img { max-width: 560px; }
figcaption { font-size: 12px; color: #555; max-width: 420px; }
.gallery { display: flex; flex-wrap: wrap; gap: 10px; }
.gallery figure { width: 210px; } .gallery img { border: 1px solid #ccc; }
.gallery figcaption { font-size: 11px; }
.key span { display: inline-block; padding: 0 6px; margin-right: 4px; border-radius: 3px; font-size: 12px; }
a { color: #2a62a8; text-decoration: none; } a:hover { text-decoration: underline; }
#image-check { font-size: 12px; color: #666; margin-top: 30px; }
"""

CHECK_SCRIPT = """
window.addEventListener("load", function () {
  var images = Array.prototype.slice.call(document.images);
  var bad = images.filter(function (im) { return !(im.complete && im.naturalWidth > 0); });
  var el = document.getElementById("image-check");
  el.dataset.ok = bad.length === 0 ? "true" : "false";
  el.textContent = bad.length === 0 ? "all " + images.length + " images loaded"
    : bad.length + " of " + images.length + " images failed to load";
});
"""


def _img(data: bytes, mime: str, alt: str, width: int | None = None) -> str:
    w = f' width="{width}"' if width else ""
    return f'<img src="data:{mime};base64,{base64.b64encode(data).decode()}" alt="{html.escape(alt)}"{w}>'


def _png(path: Path, alt: str, caption: str = "") -> str:
    cap = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
    return f"<figure>{_img(Path(path).read_bytes(), 'image/png', alt)}{cap}</figure>"


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _key() -> str:
    spans = "".join(f'<span style="background: rgb{ERROR_COLOURS[e]}">{e}</span>' for e in ERRORS)
    return (f'<p class="key">Boxes: {spans}<span style="background: rgb{MISSED_COLOUR}; color: #fff">missed</span>'
            '<span style="background: #444; color: #fff">white: the object (or, for a missed one, the best '
            "detection)</span></p>")  # fmt: skip


def _gallery(thumbs: list[Thumb], empty: str) -> str:
    if not thumbs:
        return f'<p class="note">{html.escape(empty)}</p>'
    figs = "".join(f"<figure>{_img(t.jpeg, 'image/jpeg', t.caption)}<figcaption>{html.escape(t.caption)}</figcaption>"
                   "</figure>" for t in thumbs)  # fmt: skip
    return f'<div class="gallery">{figs}</div>'


def write_html(
    path: Path,
    metrics: dict,
    analysis: Analysis,
    plots: dict[str, Path],
    thumbs: dict[int, dict[str, list[Thumb]]],
    notes: list[str] = (),
) -> Path:
    """The page (module docstring). ``metrics``: eval's metrics.json with its ``analysis`` section;
    ``plots``: ``overall_errors``, ``overall_pr``, ``sensitivity``, ``pr_curves`` and per class
    ``errors_<k>``, ``pr_<k>``; ``notes``: lines shown under the title (e.g. a random backbone)."""
    a = metrics["analysis"]
    o = a["overall"]
    coco = metrics.get("coco") or {}
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>Detection report: {html.escape(metrics['dataset'])} / {html.escape(metrics['split'])}</title>",
        f"<style>{CSS}</style></head><body>",
        f"<h1>Detection report: {html.escape(metrics['dataset'])} / {html.escape(metrics['split'])}</h1>",
        f"<p class='meta'>{metrics['detections_count']} detections from {html.escape(metrics['detections'])}; "
        f"{len(a['per_class'])} classes with objects in the split.</p>",
    ]
    parts += [f"<p class='finding'>{html.escape(n)}</p>" for n in notes]
    parts.append("<h2 id='metrics'>Metrics</h2>")
    keys = [("VOC07 mAP", metrics.get("voc07_map")), ("VOC mAP", metrics.get("voc_map")),
            ("ILSVRC mAP", metrics.get("ilsvrc_map")), ("COCO mAP", metrics.get("coco_map")),
            ("AP50", metrics.get("coco_map50")), ("AP75", metrics.get("coco_map75")),
            ("AP small", coco.get("ap_small")), ("AP medium", coco.get("ap_medium")), ("AP large", coco.get("ap_large"))]  # fmt: skip
    parts.append(_table([k for k, _ in keys], [[percent_cell(v) for _, v in keys]]))
    parts.append(f"<p class='note'>Percent. VOC: the devkit's rules at IoU 0.5; COCO: COCOeval "
                 f"({html.escape(str(metrics.get('coco_backend', 'pycocotools')))}), IoU 0.50:0.95.</p>")

    parts.append("<h2 id='errors'>Where the AP goes</h2>")
    parts += [f"<p class='finding'>{html.escape(f)}</p>" for f in findings(a)]
    parts.append("<div class='plots'>")
    parts.append(_png(plots["overall_errors"], "error types of the top-ranked detections",
                      "Hoiem et al.'s error types among the top-ranked detections of every class, as more are "
                      "considered (R-CNN's Figure 5); at 1 each class contributes as many as it has objects."))
    parts.append(_png(plots["overall_pr"], "PR breakdown",
                      "COCO's PR breakdown, averaged over the classes: each area is the AP once that kind of error "
                      "is forgiven (C75, C50: IoU 0.75, 0.5; Loc: 0.1; Sim, Oth: class confusions; BG; FN: the ceiling)."))
    parts.append("</div>")
    rows = [[html.escape("top-ranked detections, shares (%)")] + [percent_cell(o.get(e)) for e in ERRORS]]
    parts.append(_table(["", *ERRORS], rows))
    pr = o.get("pr_breakdown") or {}
    parts.append(_table(["PR breakdown (area, %)", *[lv.upper() for lv in PR_LEVELS]],
                        [["all classes", *[percent_cell(pr.get(lv)) for lv in PR_LEVELS]]]))  # fmt: skip

    s = o["sensitivity"]
    parts.append("<h2 id='sensitivity'>Object size and aspect ratio</h2>")
    parts.append(_png(plots["sensitivity"], "sensitivity", "Normalised AP (Hoiem) per bin of each class's objects, "
                      "by size and by aspect ratio (w/h), at the class's 10th/30th/70th/90th percentiles."))
    parts.append(_table(["", "XS / XT", "S / T", "M", "L / W", "XL / XW", "all"], [
        ["size", *[percent_cell(v) for v in s["size"].values()], percent_cell(s["all"])],
        ["aspect", *[percent_cell(v) for v in s["aspect"].values()], percent_cell(s["all"])],
    ]))  # fmt: skip
    if coco:
        parts.append(f"<p class='note'>COCO's area ranges (AP, IoU 0.50:0.95): small {percent_cell(coco.get('ap_small'))}, "
                     f"medium {percent_cell(coco.get('ap_medium'))}, large {percent_cell(coco.get('ap_large'))}.</p>")  # fmt: skip

    parts.append("<h2 id='classes'>Per class</h2>")
    per = metrics["per_class"]
    order = sorted(a["per_class"], key=lambda n: -(per[n]["voc"] if per[n]["voc"] is not None else -1))
    index = {n: k for k, n in enumerate(analysis.classes)}
    rows = []
    for n in order:
        ap, pc = per[n]["voc"], a["per_class"][n]
        bar = f"<span class='bar' style='width: {int(100 * (ap or 0))}px'></span>"
        rows.append([f"<a href='#class-{index[n]}'>{html.escape(n)}</a>", bar + percent_cell(ap), percent_cell(per[n]["coco"]),
                     str(pc["objects"]), str(pc["missed"]), count_cell(pc.get("unproposed")),
                     *[percent_cell(pc.get(e)) for e in ERRORS]])  # fmt: skip
    parts.append(_table(["class", "VOC AP", "COCO AP", "objects", "missed", "no proposal", *ERRORS], rows))
    parts.append(_png(plots["pr_curves"], "precision/recall curves", "VOC precision/recall, the 20 best classes."))

    parts.append(_key())
    for n in order:
        k, pc = index[n], a["per_class"][n]
        parts.append(f"<h3 id='class-{k}'>{html.escape(n)}</h3>")
        group = f", group {html.escape(str(pc['group']))}" if pc["group"] else ""
        objects = f"{pc['objects']} object{'s' * (pc['objects'] != 1)}"
        unproposed = ("" if pc.get("unproposed") is None else
                      f", {pc['unproposed']} without a proposal at IoU {a.get('iou_threshold', 0.5):g}")  # fmt: skip
        parts.append(f"<p class='meta'>VOC AP {percent_cell(per[n]['voc'])}, COCO AP {percent_cell(per[n]['coco'])}; "
                     f"{objects}, {pc['missed']} never found{unproposed}{group}.</p>")  # fmt: skip
        parts.append("<div class='plots'>")
        if len(analysis.errors[k].det):
            parts.append(_png(plots[f"errors_{k}"], f"{n}: error types"))
        else:
            parts.append("<p class='note'>No detection of this class.</p>")
        parts.append(_png(plots[f"pr_{k}"], f"{n}: PR breakdown"))
        parts.append("</div>")
        if not thumbs:
            parts.append("<p class='note'>Galleries off (eval.gallery_size=0).</p>")
            continue
        parts.append("<p><b>Highest-scoring false positives</b></p>")
        parts.append(_gallery(thumbs[k]["false_positives"], "None."))
        parts.append("<p><b>Missed objects</b> (largest first)</p>")
        parts.append(_gallery(thumbs[k]["missed"], "None: every object was found."))
    parts.append("<p id='image-check' data-ok='pending'>checking images...</p>")
    parts.append(f"<script>{CHECK_SCRIPT}</script></body></html>\n")
    return atomic_write(path, lambda f: f.write("\n".join(parts).encode()))
