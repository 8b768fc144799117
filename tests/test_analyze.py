"""The error analysis: Hoiem's false-positive types, COCO's PR breakdown, size/aspect sensitivity."""

import numpy as np
import pytest

from eval.analyze import (
    ERRORS,
    class_groups,
    classify_errors,
    error_curve,
    error_shares,
    percentile_bins,
    pr_breakdown,
    sensitivity,
)  # fmt: skip
from eval.detections import ground_truth

from .test_eval import dataset, dets

CAT_A, CAT_B, DOG, CAR = (10, 10, 50, 40), (60, 10, 95, 45), (10, 45, 40, 75), (60, 50, 95, 78)
CLASSES = ("cat", "dog", "car")  # VOC names: cat and dog are "animals", car a "vehicle"


def scene(difficult_b: bool = False):
    """One image: two cats, a dog, a car; six cat detections, one of each kind and a duplicate."""
    ds = dataset([[(*CAT_A, 0), (*CAT_B, 0, difficult_b), (*DOG, 1), (*CAR, 2)]], classes=CLASSES)
    d = dets([
        (0, 0, 0.9, *CAT_A),            # correct
        (0, 0, 0.8, *DOG),              # a similar class's object
        (0, 0, 0.7, *CAR),              # another class's object
        (0, 0, 0.6, 0, 0, 5, 5),        # background
        (0, 0, 0.5, 60, 10, 72, 45),    # IoU 0.34 with cat B: localisation
        (0, 0, 0.4, 11, 10, 50, 40),    # a duplicate of cat A: localisation
    ])  # fmt: skip
    return ds, d


def test_each_detection_lands_in_its_type():
    ds, d = scene()
    groups = class_groups(ds)
    assert groups == ["animals", "animals", "vehicles"]
    cat = classify_errors(d, ground_truth(ds, "test"), 3, groups)[0]
    assert [ERRORS[k] for k in cat.kind] == ["correct", "similar", "other", "background", "localization", "localization"]
    assert list(cat.det) == [0, 1, 2, 3, 4, 5]
    assert list(cat.gt_box) == [0, 2, 3, -1, 1, 0]  # the box that decided each type
    assert cat.iou[4] == pytest.approx(12 * 35 / (35 * 35))
    assert cat.npos == 2 and cat.missed == [(0, 1)]  # cat B only localised
    # Without groups the dog is just another class.
    cat = classify_errors(d, ground_truth(ds, "test"), 3, [None, None, None])[0]
    assert ERRORS[cat.kind[1]] == "other"


def test_a_detection_on_a_difficult_object_is_left_out():
    ds, d = scene(difficult_b=True)
    d = dets([(0, 0, 0.9, *CAT_A), (0, 0, 0.8, *CAT_B), (0, 0, 0.7, 0, 0, 5, 5)])
    cat = classify_errors(d, ground_truth(ds, "test"), 3, class_groups(ds))[0]
    assert list(cat.det) == [0, 2] and cat.npos == 1 and cat.missed == []


def test_shares_of_the_top_ranked_detections():
    ds, d = scene()
    errors = classify_errors(d, ground_truth(ds, "test"), 3, class_groups(ds))
    s = error_shares(errors, list(CLASSES))
    # cat: 2 objects -> its best 2 detections: correct, similar. dog and car: objects, no detections.
    assert s["per_class"]["cat"] == {"correct": 0.5, "localization": 0.0, "similar": 0.5, "other": 0.0, "background": 0.0}
    assert s["per_class"]["dog"] is None and s["overall"] == s["per_class"]["cat"]
    s3 = error_shares(errors, list(CLASSES), multiple=3)["per_class"]["cat"]
    assert sum(s3.values()) == pytest.approx(1) and s3["localization"] == pytest.approx(2 / 6)
    curve = error_curve(errors, np.array([0.5, 1, 3]))
    assert curve.tolist() == [[1, 0, 0, 0, 0], [1, 0, 1, 0, 0], [1, 2, 1, 1, 1]]


def coco_area(tp: list[int], npos: int) -> float:
    """Plain COCO AP: the precision envelope read at 101 recall points, averaged."""
    tp = np.array(tp, float)
    ctp, cfp = np.cumsum(tp), np.cumsum(1 - tp)
    rec, prec = ctp / npos, ctp / (ctp + cfp)
    env = [prec[k:].max() for k in range(len(prec))]
    return float(np.mean([next((env[k] for k in range(len(rec)) if rec[k] >= r), 0.0) for r in np.linspace(0, 1, 101)]))


def test_pr_breakdown_areas_against_a_plain_computation():
    ds, d = scene()
    r = pr_breakdown(d, ds, "test", class_groups(ds))
    cat = r["areas"]["cat"]
    # Detections best first: A, dog, car, background, B at IoU 0.34, duplicate of A.
    assert cat["c75"] == pytest.approx(coco_area([1, 0, 0, 0, 0, 0], 2))
    assert cat["c50"] == pytest.approx(coco_area([1, 0, 0, 0, 0, 0], 2))
    assert cat["loc"] == pytest.approx(coco_area([1, 0, 0, 0, 1, 0], 2))  # IoU 0.1 finds B
    assert cat["sim"] == pytest.approx(coco_area([1, 0, 0, 1, 0], 2))  # the dog detection left out
    assert cat["oth"] == pytest.approx(coco_area([1, 0, 1, 0], 2))  # the car one too
    assert cat["bg"] == pytest.approx(1.0) and cat["fn"] == pytest.approx(1.0)
    assert cat["loc"] < cat["sim"] < cat["oth"]
    # dog and car have objects and no detections: 0 up to the false-negative ceiling.
    assert r["areas"]["dog"] == {"c75": 0, "c50": 0, "loc": 0, "sim": 0, "oth": 0, "bg": 0, "fn": 1}
    assert r["overall"]["c50"] == pytest.approx(cat["c50"] / 3)
    # The curves: precision at recall 0.5 and 1.0 for the loc and oth levels.
    assert r["precision"][2, [50, 100], 0] == pytest.approx([1.0, 2 / 5])
    assert r["precision"][4, [50, 100], 0] == pytest.approx([1.0, 2 / 3])


def test_pr_breakdown_rows_follow_the_dataset_classes_whatever_their_category_ids():
    """Issue #27: classes not in category-id order (dataset.classes=[...] on COCO) keep their own rows."""
    ds, d = scene()
    plain = pr_breakdown(d, ds, "test", class_groups(ds))["areas"]
    ds.category_ids = (30, 10, 20)  # cat, dog, car: COCOeval sorts them to dog, car, cat
    shuffled = pr_breakdown(d, ds, "test", class_groups(ds))["areas"]
    assert shuffled == plain
    assert shuffled["cat"]["c50"] > 0 and shuffled["dog"]["c50"] == 0


def test_pr_breakdown_c50_is_pycocotools_ap50():
    """Level c50 is COCOeval's AP at IoU 0.5, class by class, on random detections."""
    from eval.coco import coco_eval

    rng = np.random.default_rng(0)
    gt = [[(*(xy := rng.uniform(0, 50, 2)), *(xy + rng.uniform(10, 40, 2)), int(rng.integers(3))) for _ in range(4)]
          for _ in range(6)]  # fmt: skip
    ds = dataset(gt, classes=CLASSES)
    rows = []
    for i, objs in enumerate(gt):
        for o in objs:
            for _ in range(3):
                rows.append((i, int(rng.integers(3)), rng.uniform(), *(np.array(o[:4]) + rng.normal(0, 6, 4))))
    d = dets(rows)
    r = pr_breakdown(d, ds, "test", class_groups(ds))
    ref = coco_eval(d, ds, "test")
    assert r["overall"]["c50"] == pytest.approx(ref["stats"]["ap50"], abs=1e-6)
    assert r["overall"]["c75"] == pytest.approx(ref["stats"]["ap75"], abs=1e-6)
    for name in CLASSES:
        a = r["areas"][name]
        assert a["c75"] <= a["c50"] <= a["loc"] <= a["sim"] <= a["oth"] <= a["bg"] <= a["fn"] == 1


def test_percentile_bins():
    assert percentile_bins(np.arange(10.0)).tolist() == [0, 1, 1, 2, 2, 2, 2, 3, 3, 4]
    assert percentile_bins(np.ones(7)).tolist() == [2] * 7  # ties share a bin


def test_sensitivity_normalised_ap_per_size_bin():
    # Ten images, one square object each, sides 10..28; two confident background boxes, then the five
    # largest objects found, largest first.
    sides = [10 + 2 * k for k in range(10)]
    ds = dataset([[(0, 0, s, s, 0)] for s in sides], classes=("a",))
    rows = [(0, 0, 0.99, 60, 60, 70, 70), (1, 0, 0.98, 60, 60, 70, 70)]
    rows += [(k, 0, 0.9 - 0.1 * (9 - k), 0, 0, sides[k], sides[k]) for k in range(9, 4, -1)]
    r = sensitivity(dets(rows), ground_truth(ds, "test"), 1, ["a"])
    n = 10  # the mean number of objects a class has
    assert r["n"] == n
    size = r["per_class"]["a"]["size"]
    assert size["xs"] == 0 and size["s"] == 0
    assert size["xl"] == pytest.approx(n / (n + 2))  # found third, after the two false positives
    assert size["l"] == pytest.approx(n / (n + 2))  # 0.5 recall at P 5/7, then 1.0 at 10/12
    # M: objects 4-7; 6 and 7 found after 2 false positives (the larger ones are left out).
    assert size["m"] == pytest.approx(0.5 * (0.5 * n) / (0.5 * n + 2))
    assert r["per_class"]["a"]["aspect"] == {"xt": None, "t": None, "m": r["per_class"]["a"]["all"], "w": None, "xw": None}
    assert r["size"] == size


# ---------------------------------------------------------------------------------------------------
# The stage, the galleries and the page, on a VOC folder with real image files.

import json  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402

from eval.analyze import analyze, findings  # noqa: E402
from eval.detections import save_detections  # noqa: E402
from eval.html import galleries  # noqa: E402
from rcnn.config import load_config  # noqa: E402
from rcnn.datasets import build_dataset  # noqa: E402
from rcnn.run import main  # noqa: E402

from .fakes import write_voc  # noqa: E402


def voc_scene(tmp_path):
    """The scene above as a VOC folder (test split: the scene, then an image with one small cat); the
    detections of ``scene()`` written as a results file."""
    vocs = lambda b: (b[0] + 1, b[1] + 1, b[2], b[3])  # continuous -> VOC's 1-based corners  # noqa: E731
    images = {"scene": [("cat", *vocs(CAT_A)), ("cat", *vocs(CAT_B)), ("dog", *vocs(DOG)), ("car", *vocs(CAR))],
              "small": [("cat", 1, 1, 12, 10)], "train": [("cat", 1, 1, 30, 30)]}  # fmt: skip
    root = write_voc(tmp_path / "voc", images, {"trainval": ["train"], "test": ["scene", "small"]}, width=100, height=80)
    (root / "classes.txt").write_text("cat\ndog\ncar\n")
    args = ["progress=false", "dataset=voc", f"dataset.root={root}", "dataset.classes=[cat,dog,car]",
            f"out={tmp_path / 'run'}"]  # fmt: skip
    ds = build_dataset(load_config(args).dataset)
    _, d = scene()
    save_detections(tmp_path / "dets.json", d, ds, "test")
    return ds, d, args


def test_galleries_pick_the_highest_scoring_false_positives_and_the_missed_objects(tmp_path):
    ds, d, _ = voc_scene(tmp_path)
    a = analyze(d, ds, "test")
    g = galleries(a, d, ds, "test", size=3)
    cat = g[0]
    assert [t.kind for t in cat["false_positives"]] == ["similar", "other", "background"]
    assert [t.score for t in cat["false_positives"]] == pytest.approx([0.8, 0.7, 0.6])
    assert cat["false_positives"][0].box == pytest.approx(DOG)
    # Missed cats, largest first: B (35 x 35, only localised) then the small one (12 x 10, no detection).
    assert [(t.image_id, t.box) for t in cat["missed"]] == [("scene", pytest.approx(CAT_B)), ("small", pytest.approx((0, 0, 12, 10)))]
    assert "IoU 0.34" in cat["missed"][0].caption and "no detection" in cat["missed"][1].caption
    assert [t.jpeg[:2] for t in cat["false_positives"] + cat["missed"]] == [b"\xff\xd8"] * 5  # JPEG pictures
    assert g[1]["false_positives"] == [] and [t.box for t in g[1]["missed"]] == [pytest.approx(DOG)]
    assert galleries(a, d, ds, "test", size=0) == {}


def test_the_objects_no_proposal_reached_are_counted_and_said(tmp_path):
    ds, d, _ = voc_scene(tmp_path)
    near_b = (60, 10, 72, 45)  # IoU 0.34 with cat B
    dog_ish = (12, 45, 40, 75)  # IoU 0.93 with the dog
    proposals = [np.array([CAT_A, near_b, dog_ish], np.float32), np.zeros((0, 4), np.float32)]  # scene, small
    a = analyze(d, ds, "test", proposals=proposals)
    cat, dog, car = a.errors
    assert cat.unproposed() == [(0, 1), (1, 0)] and dog.unproposed() == [] and car.unproposed() == [(0, 3)]
    assert cat.proposal_iou[(0, 1)] == pytest.approx(12 * 35 / (35 * 35)) and cat.proposal_iou[(1, 0)] == 0
    m = a.metrics()
    assert m["overall"]["unproposed"] == 3
    assert [(m["per_class"][n]["missed"], m["per_class"][n]["unproposed"], m["per_class"][n]["missed_unproposed"])
            for n in CLASSES] == [(2, 2, 2), (1, 0, 0), (1, 1, 1)]  # fmt: skip
    said = " ".join(findings(m))
    assert "3 of the 5 objects (60%) have no proposal at IoU 0.5" in said
    assert "They are 3 of the 4 objects never detected; the other 1 was proposed" in said
    missed = galleries(a, d, ds, "test", size=3)[0]["missed"]
    assert "its best proposal: IoU 0.34 (none reached it)" in missed[0].caption
    every = analyze(d, ds, "test", proposals=[np.array([CAT_A, CAT_B, DOG, CAR], np.float32),
                                              np.array([[0, 0, 12, 10]], np.float32)]).metrics()  # fmt: skip
    assert every["overall"]["unproposed"] == 0
    assert "Every object has a proposal at IoU 0.5: the 4 never detected were proposed" in " ".join(findings(every))
    # Without the proposals nothing is claimed about them.
    plain = analyze(d, ds, "test").metrics()
    assert plain["overall"]["unproposed"] is None and "proposal" not in " ".join(findings(plain))


def test_stage_analyze_writes_metrics_markdown_and_a_page(tmp_path, capsys):
    ds, d, args = voc_scene(tmp_path)
    assert main(["stage=analyze", *args, f"detections={tmp_path / 'dets.json'}"]) == 0
    out = tmp_path / "run" / "eval"
    m = json.loads((out / "metrics.json").read_text())
    a = m["analysis"]
    # cat: 3 objects -> its best 3: correct, similar, other.
    cat = a["per_class"]["cat"]
    assert [cat[e] for e in ERRORS] == pytest.approx([1 / 3, 0, 1 / 3, 1 / 3, 0])
    assert cat["objects"] == 3 and cat["missed"] == 2 and cat["group"] == "animals"
    assert set(cat["pr_breakdown"]) == {"c75", "c50", "loc", "sim", "oth", "bg", "fn"}
    assert sum(a["overall"][e] for e in ERRORS) == pytest.approx(1)
    assert a["overall"]["pr_breakdown"]["fn"] == 1 and set(a["per_class"]) == {"cat", "dog", "car"}
    assert set(a["overall"]["sensitivity"]) == {"size", "aspect", "all"}
    md = (out / "report.md").read_text()
    assert "## Error analysis" in md and "| cat | 3 | 2 | - |" in md  # (no proposals known for a detections file)
    assert a["overall"]["unproposed"] is None and cat["unproposed"] is None
    page = (out / "report.html").read_text()
    assert page.count("data:image/jpeg;base64,") == 2 * 1 + 2 * 1 + 3 + 2  # dog, car: 1 missed each; cat 3 + 2 (size 6)
    assert "id='image-check'" in page
    assert not re.search(r"""(src|href)=["'](?!data:|#)""", page)  # nothing to fetch: every image embedded
    printed = capsys.readouterr().out
    assert "Of the 3 top-ranked detections" in printed and "report.html" in printed
    # eval.analyze off: the plain evaluation, its own cache key, no analysis.
    assert main(["stage=eval", *args, f"detections={tmp_path / 'dets.json'}"]) == 0
    assert "analysis" not in json.loads((out / "metrics.json").read_text()) and not (out / "report.html").exists()


def test_an_evaluation_done_before_is_read_not_recomputed(tmp_path, monkeypatch):
    """Issue #27: under torchrun the ranks that waited for rank 0's evaluation read it from its cache (so
    does a second run here): the analysis and report.html are not computed and written again."""
    import eval.stage

    ds, d, args = voc_scene(tmp_path)
    run = ["stage=analyze", *args, f"detections={tmp_path / 'dets.json'}"]
    assert main(run) == 0
    m = json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())
    page = tmp_path / "run" / "eval" / m["key"] / "report.html"
    written = page.stat().st_mtime_ns

    def again(*a, **k):
        raise AssertionError("evaluated again")

    monkeypatch.setattr(eval.stage, "evaluate", again)
    monkeypatch.setattr(eval.stage, "analyze_and_report", again)
    assert main(run) == 0
    cached = json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())
    assert {**cached, "peak_rss_mb": None} == {**m, "peak_rss_mb": None}  # (each run's own peak memory)
    assert page.stat().st_mtime_ns == written and (tmp_path / "run" / "eval" / "report.html").exists()


def chromium() -> str | None:
    return next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


def test_the_page_in_a_real_browser(tmp_path):
    """Headless Chromium opens report.html from disk: its own script finds every image decoded, and a
    screenshot is taken."""
    browser = chromium()
    if browser is None:
        pytest.skip("Chromium is not installed (Debian: apt-get install chromium); the page was not opened in a browser")
    ds, d, args = voc_scene(tmp_path)
    assert main(["stage=analyze", *args, f"detections={tmp_path / 'dets.json'}"]) == 0
    page = tmp_path / "run" / "eval" / "report.html"
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
             "--virtual-time-budget=10000", f"--user-data-dir={tmp_path / 'profile'}"]  # fmt: skip
    dom = subprocess.run([*flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120).stdout
    assert 'data-ok="true"' in dom, dom[-2000:]
    n = dom.count("<img ")
    assert f"all {n} images loaded" in dom and n >= 10
    shot = tmp_path / "report.png"
    subprocess.run([*flags, f"--screenshot={shot}", "--window-size=1200,1600", page.as_uri()],
                   capture_output=True, timeout=120)  # fmt: skip
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
