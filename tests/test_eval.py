import contextlib
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest

from eval.coco import coco_backend, coco_eval
from eval.detections import Detections, DetectionsError, load_detections, save_detections
from eval.stage import evaluate
from eval.voc import ilsvrc_thresholds, voc_ap, voc_eval
from rcnn import boxes as B
from rcnn.config import load_config
from rcnn.datasets import Annotation, DatasetError, DetectionDataset, ImageRecord, build_dataset
from rcnn.run import main

from .fakes import voc_xml, write_image, write_voc
from .test_run import COCO128


def dataset(gt: list[list[tuple]], classes=("a", "b"), ids=None, blacklist=()) -> DetectionDataset:
    """gt: per image, (x1, y1, x2, y2, label[, difficult]) tuples; images are 100 x 80."""
    ids = ids or list(range(1, len(gt) + 1))
    records = []
    for image_id, objs in zip(ids, gt):
        boxes = np.array([o[:4] for o in objs], np.float32).reshape(-1, 4)
        labels = np.array([o[4] for o in objs], np.int64)
        diff = np.array([bool(o[5]) if len(o) > 5 else False for o in objs], bool)
        records.append(ImageRecord(image_id, Path(f"/nonexistent/{image_id}.jpg"), "test", Annotation(boxes, labels, diff, 100, 80)))
    return DetectionDataset("t", classes, records, {"test": ids}, "test", "test", blacklist=blacklist)


def dets(rows) -> Detections:
    """rows: (image index, label, score, x1, y1, x2, y2)."""
    if not rows:
        return Detections.empty()
    a = np.array(rows, np.float64)
    return Detections(a[:, 0].astype(np.int64), a[:, 1].astype(np.int64), a[:, 2], a[:, 3:].astype(np.float32))


def all_metrics(ds, d):
    r = evaluate(d, ds, "test")
    return r["voc07"]["map"], r["voc"]["map"], r["ilsvrc"]["map"], r["coco"]["stats"]["ap"]


def test_perfect_detector_scores_one():
    ds = dataset([[(10, 10, 50, 40, 0), (60, 20, 90, 70, 1)], [(5, 5, 30, 30, 1)]])
    d = dets([(0, 0, 0.9, 10, 10, 50, 40), (0, 1, 0.8, 60, 20, 90, 70), (1, 1, 0.7, 5, 5, 30, 30)])
    assert all_metrics(ds, d) == pytest.approx((1.0, 1.0, 1.0, 1.0))


def test_duplicate_is_a_false_positive():
    ds = dataset([[(10, 10, 50, 40, 0)], [(20, 20, 60, 60, 0)]], classes=("a",))
    d = dets([(0, 0, 0.9, 10, 10, 50, 40), (0, 0, 0.8, 11, 10, 50, 40), (1, 0, 0.7, 20, 20, 60, 60)])
    # tp 1 0 1, fp 0 1 0: recall .5 .5 1, precision 1 .5 2/3.
    r = evaluate(d, ds, "test")
    assert r["voc"]["map"] == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    assert r["voc07"]["map"] == pytest.approx((6 * 1 + 5 * 2 / 3) / 11)


def test_match_to_a_difficult_box_counts_for_nothing():
    ds = dataset([[(10, 10, 50, 40, 0)], [(20, 20, 60, 60, 0, 1)]], classes=("a",))
    d = dets([(1, 0, 0.9, 20, 20, 60, 60), (0, 0, 0.8, 10, 10, 50, 40)])
    assert evaluate(d, ds, "test")["voc"]["map"] == pytest.approx(1.0)
    # Without the difficult flag, the first detection would be a true positive too, and the second
    # ground-truth box a positive: still 1.0; with a wrong box there instead, it would be a false positive.
    d2 = dets([(1, 0, 0.9, 70, 60, 99, 79), (0, 0, 0.8, 10, 10, 50, 40)])
    assert evaluate(d2, ds, "test")["voc"]["map"] == pytest.approx(0.5)


def test_small_box_under_ilsvrc_rule():
    # A 10 x 10 box: threshold min(0.5, 100 / (20 * 20)) = 0.25. A detection with IoU 0.3 passes ILSVRC only.
    np.testing.assert_allclose(ilsvrc_thresholds(np.array([[0, 0, 10, 10], [0, 0, 100, 100]])), [0.25, 0.5])
    ds = dataset([[(10, 10, 20, 20, 0)]], classes=("a",))
    box = np.array([[10, 10, 20, 20]], float)
    det = np.array([[10, 10, 28, 28]], float)  # IoU 100 / 324 = 0.309
    assert B.iou(box, det)[0, 0] == pytest.approx(100 / 324)
    d = dets([(0, 0, 0.9, *det[0])])
    r = evaluate(d, ds, "test")
    assert r["ilsvrc"]["map"] == pytest.approx(1.0) and r["voc"]["map"] == pytest.approx(0.0)


def test_ilsvrc_takes_the_best_unmatched_box():
    ds = dataset([[(0, 0, 40, 40, 0), (20, 0, 60, 40, 0)]], classes=("a",))
    # Both detections overlap box A best; the second one also passes box B's threshold (IoU 0.6 with B).
    d = dets([(0, 0, 0.9, 0, 0, 40, 40), (0, 0, 0.8, 10, 0, 50, 40)])
    r = evaluate(d, ds, "test")
    assert r["ilsvrc"]["map"] == pytest.approx(1.0)  # second takes B
    assert r["voc"]["map"] == pytest.approx(0.5)  # VOC: best box A is taken -> false positive


def test_ilsvrc_blacklist_leaves_out_the_pair():
    ds = dataset([[(10, 10, 50, 40, 0)], [(20, 20, 60, 60, 0)]], classes=("a",), blacklist=[(2, 0)])
    d = dets([(1, 0, 0.9, 70, 60, 99, 79), (0, 0, 0.8, 10, 10, 50, 40)])  # a false positive in image 2
    assert evaluate(d, ds, "test")["ilsvrc"]["map"] == pytest.approx(1.0)
    assert evaluate(d, dataset([[(10, 10, 50, 40, 0)], [(20, 20, 60, 60, 0)]], ("a",)), "test")["ilsvrc"]["map"] < 1


def test_empty_detections_and_empty_ground_truth():
    ds = dataset([[(10, 10, 50, 40, 0)], []])
    r = evaluate(dets([]), ds, "test")
    assert r["voc"]["ap"][0] == 0 and math.isnan(r["voc"]["ap"][1]) and r["voc"]["map"] == 0
    assert r["coco"]["stats"]["ap"] == 0 and r["ilsvrc"]["map"] == 0
    empty = dataset([[], []])
    r = evaluate(dets([(0, 0, 0.5, 1, 1, 9, 9)]), empty, "test")
    assert math.isnan(r["voc"]["map"]) and math.isnan(r["coco"]["stats"]["ap"])


# -- against reference implementations ------------------------------------------------------------


def loop_voc_ap(gt, det_rows, cls, use_07, thr=0.5):
    """A plain per-detection VOC evaluation on VOC 1-based corners with the devkit's +1 arithmetic."""
    npos = sum(1 for objs in gt for o in objs if o[4] == cls and not (len(o) > 5 and o[5]))
    taken = {}
    rows = sorted([r for r in det_rows if r[1] == cls], key=lambda r: -r[2])
    tp, fp = [], []
    for img, _, _, *box in rows:
        bb = B.xyxy_to_voc([box])[0]
        best, jbest = -1.0, -1
        for j, o in enumerate(gt[img]):
            if o[4] != cls:
                continue
            g = B.xyxy_to_voc([o[:4]])[0]
            iw = min(bb[2], g[2]) - max(bb[0], g[0]) + 1
            ih = min(bb[3], g[3]) - max(bb[1], g[1]) + 1
            if iw > 0 and ih > 0:
                inter = iw * ih
                uni = (bb[2] - bb[0] + 1) * (bb[3] - bb[1] + 1) + (g[2] - g[0] + 1) * (g[3] - g[1] + 1) - inter
                if inter / uni > best:
                    best, jbest = inter / uni, j
        if best >= thr:
            o = gt[img][jbest]
            if len(o) > 5 and o[5]:
                tp.append(0), fp.append(0)
            elif not taken.get((img, jbest)):
                taken[(img, jbest)] = True
                tp.append(1), fp.append(0)
            else:
                tp.append(0), fp.append(1)
        else:
            tp.append(0), fp.append(1)
    tp, fp = np.cumsum(tp), np.cumsum(fp)
    rec = tp / npos
    prec = tp / np.maximum(tp + fp, np.finfo(float).eps)
    return voc_ap(rec, prec, use_07)


def devkit_ilsvrc_ap(gt_xml, det_lines, blacklist, num_classes):
    """ILSVRC's eval_detection.m (2014 devkit) in Python, on the raw numbers of its files: ground truth
    as written in the XML (``xmin ymin xmax ymax`` with ``+1`` widths), predictions as its lines
    ``<image> <label> <confidence> <xmin> <ymin> <xmax> <ymax>``; per image, detections best first over
    all classes; each takes the not-yet-detected object of its class with the highest IoU passing the
    object's own threshold; blacklisted (image, label) pairs leave out their detections and objects."""
    tp_all, fp_all, labels_all, conf_all = [], [], [], []
    npos = [0] * num_classes
    for i, objs in enumerate(gt_xml):
        for label, *_ in objs:
            if (i, label) not in blacklist:
                npos[label] += 1
        detected = [False] * len(objs)
        mine = sorted([d for d in det_lines if d[0] == i], key=lambda d: -d[2])
        for _, label, conf, *bb in mine:
            if (i, label) in blacklist:
                continue
            ovmax, kmax = -np.inf, -1
            for k, (glabel, *g) in enumerate(objs):
                if glabel != label or detected[k]:
                    continue
                gw, gh = g[2] - g[0] + 1, g[3] - g[1] + 1
                thr = min(0.5, gw * gh / ((gw + 10) * (gh + 10)))
                iw = min(bb[2], g[2]) - max(bb[0], g[0]) + 1
                ih = min(bb[3], g[3]) - max(bb[1], g[1]) + 1
                if iw > 0 and ih > 0:
                    ua = (bb[2] - bb[0] + 1) * (bb[3] - bb[1] + 1) + gw * gh - iw * ih
                    ov = iw * ih / ua
                    if ov >= thr and ov > ovmax:
                        ovmax, kmax = ov, k
            if kmax >= 0:
                detected[kmax] = True
            tp_all.append(int(kmax >= 0)), fp_all.append(int(kmax < 0)), labels_all.append(label), conf_all.append(conf)
    order = np.argsort(-np.array(conf_all), kind="stable")
    tp_all, fp_all, labels_all = (np.array(x)[order] for x in (tp_all, fp_all, labels_all))
    aps = []
    for c in range(num_classes):
        tp, fp = np.cumsum(tp_all[labels_all == c]), np.cumsum(fp_all[labels_all == c])
        if npos[c]:
            aps.append(voc_ap(tp / npos[c], tp / np.maximum(tp + fp, np.finfo(float).eps), False))
    return float(np.mean(aps))


@pytest.mark.parametrize("seed", range(4))
def test_ilsvrc_on_devkit_coordinates_matches_eval_detection_m(tmp_path, seed):
    """Issue #13: ILSVRC DET's coordinates. The devkit's eval_detection.m measures widths as
    ``xmax - xmin + 1`` (pixel-inclusive corners, as PASCAL VOC, whose format its readme names), for the
    overlaps and for each object's threshold. Loading its XML as VOC (1-based inclusive -> continuous) and
    writing predictions the same way gives the devkit's AP exactly, on hand-made annotation files."""
    rng = np.random.default_rng(seed)
    root = tmp_path / "ilsvrc"
    gt_xml, det_lines, ids = [], [], []
    synsets = ["n02084071", "n01443537"]
    for i in range(8):
        objs = []
        for _ in range(rng.integers(0, 4)):
            x1, y1 = (int(v) for v in rng.integers(1, 40, 2))
            objs.append((int(rng.integers(2)), x1, y1, x1 + int(rng.integers(3, 25)), y1 + int(rng.integers(3, 25))))
        gt_xml.append(objs)
        image_id = f"ILSVRC2013_val_{i + 1:08d}"
        ids.append(image_id)
        (root / "Annotations" / "DET" / "val").mkdir(parents=True, exist_ok=True)
        xml = voc_xml(image_id, 64, 64, [(synsets[o[0]], *o[1:]) for o in objs])
        (root / "Annotations" / "DET" / "val" / f"{image_id}.xml").write_text(xml)
        write_image(root / "Data" / "DET" / "val" / f"{image_id}.JPEG", 64, 64, seed=i)
        for o in objs:
            for _ in range(rng.integers(0, 3)):
                j = np.round(rng.normal(0, 2, 4))
                b = np.array(o[1:], float) + j
                b[2:] = np.maximum(b[2:], b[:2])
                det_lines.append((i, o[0], float(rng.random()), *b))
        det_lines.append((i, int(rng.integers(2)), float(rng.random()), 3.0, 3.0, 12.0, 12.0))
    (root / "ImageSets" / "DET").mkdir(parents=True)
    (root / "ImageSets" / "DET" / "val.txt").write_text("".join(f"{d} {k + 1}\n" for k, d in enumerate(ids)))
    (root / "devkit" / "data").mkdir(parents=True)
    (root / "devkit" / "data" / "map_det.txt").write_text("n02084071 1 dog\nn01443537 2 goldfish\n")
    (root / "devkit" / "data" / "ILSVRC2015_det_validation_blacklist.txt").write_text("3 n01443537\n")
    ds = build_dataset(load_config(["dataset=ilsvrc", f"dataset.root={root}", "dataset.train_split=val"]).dataset)
    rows = [(i, label, conf, *B.voc_to_xyxy([bb])[0]) for i, label, conf, *bb in det_lines]
    ours = evaluate(dets(rows), ds, "val")["ilsvrc"]["map"]
    assert ours == pytest.approx(devkit_ilsvrc_ap(gt_xml, det_lines, {(2, 1)}, 2), abs=1e-12)


def random_problem(seed, n_images=12, n_classes=3):
    rng = np.random.default_rng(seed)
    gt, rows = [], []
    for i in range(n_images):
        objs = []
        for _ in range(rng.integers(0, 4)):
            x, y = rng.integers(0, 60), rng.integers(0, 40)
            w, h = rng.integers(5, 40), rng.integers(5, 40)
            objs.append((int(x), int(y), int(x + w), int(y + h), int(rng.integers(n_classes)), int(rng.random() < 0.15)))
        gt.append(objs)
        for o in objs:  # jittered hits, duplicates and misses
            for _ in range(rng.integers(0, 3)):
                j = rng.normal(0, 4, 4)
                rows.append((i, o[4], float(rng.random()), *(np.array(o[:4], float) + j)))
        for _ in range(rng.integers(0, 3)):
            x, y = rng.uniform(0, 70, 2)
            rows.append((i, int(rng.integers(n_classes)), float(rng.random()), x, y, x + rng.uniform(3, 30), y + rng.uniform(3, 30)))
    rows = [r if r[5] > r[3] and r[6] > r[4] else (*r[:5], r[3] + 1, r[4] + 1) for r in rows]
    return gt, rows


@pytest.mark.parametrize("seed", range(6))
def test_voc_matches_a_plain_loop(seed):
    gt, rows = random_problem(seed)
    ds = dataset(gt, classes=("a", "b", "c"))
    for use_07 in (True, False):
        r = voc_eval(dets(rows), [(a.boxes, a.labels, a.difficult) for a in map(ds.annotation, ds.image_ids("test"))], 3, use_07_metric=use_07)
        for c in range(3):
            npos = sum(1 for objs in gt for o in objs if o[4] == c and not o[5])
            if npos == 0:
                assert math.isnan(r["ap"][c])
            else:
                assert r["ap"][c] == pytest.approx(loop_voc_ap(gt, rows, c, use_07), abs=1e-12)


@pytest.mark.parametrize("seed,own_area", [(0, False), (1, False), (2, True), (3, True)])
def test_coco_identical_to_pycocotools(tmp_path, seed, own_area):
    """All twelve figures equal pycocotools' on the same JSON; with ``own_area`` each annotation's ``area``
    (COCO's segmentation area) is not its box's, and decides its size bucket as in COCO's own evaluation."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt, rows = random_problem(seed, n_images=10)
    cats = [{"id": 2, "name": "a"}, {"id": 5, "name": "b"}, {"id": 9, "name": "c"}]
    images = [{"id": 100 + i, "file_name": f"{i}.jpg", "width": 100, "height": 80} for i in range(len(gt))]
    anns = []
    factors = np.random.default_rng(seed).choice([0.2, 0.5, 3.0], size=sum(map(len, gt)))
    for i, objs in enumerate(gt):
        for o in objs:
            w, h = o[2] - o[0], o[3] - o[1]
            area = w * h * float(factors[len(anns)]) if own_area else w * h
            anns.append({"id": len(anns) + 1, "image_id": 100 + i, "category_id": cats[o[4]]["id"],
                         "bbox": [o[0], o[1], w, h], "area": area, "iscrowd": o[5]})  # fmt: skip
    gt_path = tmp_path / "gt.json"
    gt_path.write_text(json.dumps({"info": {}, "images": images, "annotations": anns, "categories": cats}))
    from PIL import Image

    (tmp_path / "img").mkdir()
    for im in images:
        Image.new("RGB", (100, 80)).save(tmp_path / "img" / im["file_name"])
    results = [{"image_id": 100 + r[0], "category_id": cats[r[1]]["id"], "score": r[2],
                "bbox": [r[3], r[4], r[5] - r[3], r[6] - r[4]]} for r in rows]  # fmt: skip
    res_path = tmp_path / "res.json"
    res_path.write_text(json.dumps(results))

    with contextlib.redirect_stdout(io.StringIO()):
        ref_gt = COCO(str(gt_path))
        ev = COCOeval(ref_gt, ref_gt.loadRes(str(res_path)), "bbox")
        ev.evaluate(), ev.accumulate(), ev.summarize()

    paths = [f"dataset.train_json={gt_path}", f"dataset.test_json={gt_path}",
             f"dataset.train_images={tmp_path / 'img'}", f"dataset.test_images={tmp_path / 'img'}"]  # fmt: skip
    ds = build_dataset(load_config(["dataset=coco", *paths]).dataset)
    d = load_detections(res_path, ds, "test")
    ref = [v if v >= 0 else float("nan") for v in ev.stats]
    np.testing.assert_array_equal(list(coco_eval(d, ds, "test", "pycocotools")["stats"].values()), ref)
    if coco_backend() == "faster":  # its C++ averages may differ in the last bit
        np.testing.assert_allclose(list(coco_eval(d, ds, "test", "faster")["stats"].values()), ref, rtol=0, atol=1e-12)


def test_continuous_iou_is_the_devkits_inclusive_iou():
    rng = np.random.default_rng(0)
    voc = rng.integers(1, 50, (20, 2))
    voc = np.concatenate([voc, voc + rng.integers(0, 30, (20, 2))], axis=1).astype(float)
    a, b = voc[:10], voc[10:]
    iw = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]) + 1, 0, None)
    ih = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]) + 1, 0, None)
    area = lambda v: (v[:, 2] - v[:, 0] + 1) * (v[:, 3] - v[:, 1] + 1)
    devkit = iw * ih / (area(a)[:, None] + area(b)[None, :] - iw * ih)
    np.testing.assert_allclose(B.iou(B.voc_to_xyxy(a).astype(float), B.voc_to_xyxy(b).astype(float)), devkit, rtol=1e-12)


# -- files and the stage ---------------------------------------------------------------------------


def test_detections_round_trip_and_bad_files(tmp_path):
    ds = dataset([[(10, 10, 50, 40, 0)], [(5, 5, 30, 30, 1)]], ids=["img1", "img2"])
    d = dets([(0, 0, 0.9, 10, 10, 50, 40), (1, 1, 0.25, 5.5, 5, 30, 30)])
    path = save_detections(tmp_path / "d.json", d, ds, "test")
    back = load_detections(path, ds, "test")
    np.testing.assert_array_equal(back.image, d.image)
    np.testing.assert_allclose(back.boxes, d.boxes)
    assert json.loads(path.read_text())[1] == {"image_id": "img2", "category_id": 2, "bbox": [5.5, 5.0, 24.5, 25.0], "score": 0.25}
    good = json.loads(path.read_text())[0]
    cases = [
        ({**good, "image_id": "img9"}, "detection 0: image_id 'img9' is not an image of split 'test'"),
        ({**good, "category_id": 7}, "detection 0: category_id 7 is not a category"),
        ({**good, "bbox": [1, 2, 3]}, r"detection 0: bbox \[1, 2, 3\] is not \[x, y, w, h\]"),
        ({**good, "bbox": [1, 2, -3, 4]}, "negative width"),
        ({**good, "score": None}, "score None is not a finite number"),
        ({k: v for k, v in good.items() if k != "score"}, "detection 0: missing 'score'"),
    ]
    for entry, message in cases:
        (tmp_path / "bad.json").write_text(json.dumps([entry]))
        with pytest.raises(DetectionsError, match=message) as e:
            load_detections(tmp_path / "bad.json", ds, "test")
        assert "bad.json" in str(e.value)
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(DetectionsError, match="malformed JSON"):
        load_detections(tmp_path / "bad.json", ds, "test")


def test_eval_stage_on_a_detections_file(tmp_path, capsys):
    root, out = write_voc(tmp_path / "voc"), tmp_path / "run"
    args = ["progress=false", "dataset=voc", f"dataset.root={root}", f"out={out}"]
    ds = build_dataset(load_config(args[1:3]).dataset)
    gt = [ds.annotation(i) for i in ds.image_ids("test")]
    rows = [(k, int(l), 0.9, *b) for k, a in enumerate(gt) for b, l in zip(a.boxes, a.labels)]
    save_detections(tmp_path / "perfect.json", dets(rows), ds, "test")
    assert main(["stage=eval", *args, f"detections={tmp_path / 'perfect.json'}"]) == 0
    m = json.loads((out / "eval" / "metrics.json").read_text())
    assert m["voc07_map"] == m["voc_map"] == m["ilsvrc_map"] == m["coco_map"] == m["coco_map50"] == 1.0
    assert set(m["per_class"]) == {"cat", "dog"} and m["per_class"]["cat"]["voc"] == 1.0
    assert (out / "eval" / "report.md").read_text().startswith("# Evaluation: voc / test")
    assert (out / "eval" / "pr_curves.png").stat().st_size > 1000


# -- COCOeval backends -------------------------------------------------------------------------------


def same_figures(a: dict, b: dict) -> None:
    for k, v in a["stats"].items():
        assert (math.isnan(v) and math.isnan(b["stats"][k])) or b["stats"][k] == pytest.approx(v, abs=1e-12), k
    np.testing.assert_allclose(a["per_class_ap"], b["per_class_ap"], atol=1e-12)  # NaN where NaN


@pytest.mark.parametrize("seed", range(5))
def test_faster_coco_eval_gives_pycocotools_twelve_figures(seed):
    pytest.importorskip("faster_coco_eval")
    from eval.benchmark import synthetic

    ds, d = synthetic(80, 2000, n_classes=6, seed=seed)
    ref, fast = coco_eval(d, ds, "test", "pycocotools"), coco_eval(d, ds, "test", "faster")
    assert (ref["backend"], fast["backend"]) == ("pycocotools", "faster")
    same_figures(ref, fast)
    assert coco_eval(d, ds, "test")["backend"] == "faster"  # auto: faster where installed


def test_missing_faster_coco_eval_is_named(monkeypatch):
    import builtins

    real = builtins.__import__
    monkeypatch.setattr(builtins, "__import__", lambda name, *a, **k: (_ for _ in ()).throw(ImportError(name))
                        if name.startswith("faster_coco_eval") else real(name, *a, **k))  # fmt: skip
    from eval.coco import coco_backend

    assert coco_backend("auto") == "pycocotools"
    with pytest.raises(DatasetError, match=r'pip install -e "\.\[fast\]"'):
        coco_backend("faster")


@pytest.mark.slow
@pytest.mark.skipif(not COCO128.exists(), reason="needs ../shared/datasets/coco128")
@pytest.mark.parametrize("seed", range(2))
def test_faster_coco_eval_on_coco128(seed):
    """coco128's val ground truth (crowd boxes included), detections jittered from it and random ones."""
    pytest.importorskip("faster_coco_eval")
    ds = build_dataset(load_config(["dataset=coco128", f"dataset.root={COCO128}"]).dataset)
    rng = np.random.default_rng(seed)
    rows = []
    for k, image_id in enumerate(ds.image_ids("val2017")):
        a = ds.annotation(image_id)
        for b, l in zip(a.boxes, a.labels):
            for _ in range(int(rng.integers(0, 3))):
                j = np.asarray(b, float) + rng.normal(0, 0.1, 4) * (b[2:] - b[:2]).repeat(2)
                rows.append((k, int(l) if rng.random() < 0.8 else int(rng.integers(80)), rng.random(), *j))
        for _ in range(5):
            x, y = rng.uniform(0, 400, 2)
            rows.append((k, int(rng.integers(80)), rng.random(), x, y, x + rng.uniform(5, 200), y + rng.uniform(5, 200)))
    d = dets(rows)
    same_figures(coco_eval(d, ds, "val2017", "pycocotools"), coco_eval(d, ds, "val2017", "faster"))
