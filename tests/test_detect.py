import json

import numpy as np
import pytest
import torch
from PIL import Image

from rcnn import boxes as B
from rcnn.detector import Detector, DetectorError, check_ensemble, postprocess
from rcnn.run import main
from rcnn.store import StageStore
from svm.box_regression import decode

TINY = [
    "progress=false", "dataset.train_images=4", "dataset.test_images=2", "dataset.width=128", "dataset.height=96",
    "dataset.min_size=24", "dataset.max_size=60", "multibox.epochs=1", "multibox.input_size=64",
    "multibox.num_priors=6", "multibox.top_k=5", "multibox.batch_size=2", "backbone.weights=none", "workers=1",
    "proposals.top_n=40", "features.mode=roi", "features.input_size=64", "features.roi_image_size=96",
    "svm.retrain_limit=20", "dataset.recipe=[]", "auto=false",
]  # fmt: skip


def brute_postprocess(boxes, scores, deltas, w, h, iou, top, per_class=None):
    """A plain loop: per class regress, clip, drop empty boxes, its ``per_class`` best, greedy NMS at ``iou`` (or
    ``iou[c]``); then the best ``top`` overall."""
    out = []
    for c in range(scores.shape[1]):
        t = iou[c] if np.ndim(iou) else iou
        cand = B.clip(decode(boxes, deltas[:, c]) if deltas is not None else boxes, w, h)
        idx = [i for i in np.argsort(-scores[:, c], kind="stable") if B.is_valid(cand[i : i + 1])[0]][:per_class]
        kept = []
        for i in idx:
            if all(B.iou(cand[i : i + 1], cand[j : j + 1])[0, 0] <= t for j in kept):
                kept.append(i)
        out += [(scores[i, c], c, tuple(cand[i])) for i in kept]
    out.sort(key=lambda t: -t[0])
    return out[:top]


def random_case(seed: int, classes: int, n: int = 60):
    """``n`` random boxes, partly outside an 80 x 60 image, with scores for ``classes`` (and deltas on odd seeds)."""
    rng = np.random.default_rng(seed)
    xy = rng.uniform(-10, 90, (n, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(1, 40, (n, 2))], axis=1).astype(np.float32)
    return boxes, rng.normal(0, 1, (n, classes)), rng.normal(0, 0.2, (n, classes, 4)) if seed % 2 else None


@pytest.mark.parametrize("seed", range(4))
def test_postprocess_matches_a_plain_loop(seed):
    boxes, scores, deltas = random_case(seed, 3)
    b, s, lab = postprocess(boxes, scores, deltas, 80, 60, nms_iou=0.3, max_per_image=25)
    ref = brute_postprocess(boxes, scores, deltas, 80, 60, 0.3, 25)
    assert len(s) == len(ref) == 25
    np.testing.assert_allclose(s, [r[0] for r in ref], rtol=1e-6)
    assert lab.tolist() == [r[1] for r in ref]
    np.testing.assert_allclose(b, np.array([r[2] for r in ref]), atol=1e-4)
    assert (b[:, 0] >= 0).all() and (b[:, 2] <= 80).all() and (b[:, 3] <= 60).all()


@pytest.mark.parametrize("seed", range(3))
def test_postprocess_with_an_overlap_a_class_matches_a_plain_loop(seed):
    boxes, scores, deltas = random_case(seed, 4)
    overlaps = [0.3, 0.6, 0.3, 0.45]
    b, s, lab = postprocess(boxes, scores, deltas, 80, 60, nms_iou=overlaps, max_per_image=40)
    ref = brute_postprocess(boxes, scores, deltas, 80, 60, overlaps, 40)
    np.testing.assert_allclose(s, [r[0] for r in ref], rtol=1e-6)
    assert lab.tolist() == [r[1] for r in ref]
    np.testing.assert_allclose(b, np.array([r[2] for r in ref]), atol=1e-4)
    same = postprocess(boxes, scores, deltas, 80, 60, nms_iou=[0.3] * 4, max_per_image=40)
    for x, y in zip(same, postprocess(boxes, scores, deltas, 80, 60, nms_iou=0.3, max_per_image=40)):
        np.testing.assert_array_equal(x, y)  # one overlap for every class: as the single one


@pytest.mark.parametrize("seed", range(3))
def test_postprocess_keeps_the_best_boxes_of_each_class_before_nms_as_rcnn_test(seed):
    """Issue #13: per class its ``max_per_class`` best boxes, then NMS; no cut across classes by default."""
    rng = np.random.default_rng(seed)
    xy = rng.uniform(-10, 90, (80, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(1, 40, (80, 2))], axis=1).astype(np.float32)
    scores = rng.normal(0, 1, (80, 4)) + np.array([3.0, 0.0, -2.0, -5.0])  # classes on different margin scales
    b, s, lab = postprocess(boxes, scores, None, 80, 60, nms_iou=0.3, max_per_class=9)
    ref = brute_postprocess(boxes, scores, None, 80, 60, 0.3, None, per_class=9)
    assert sorted(zip(lab.tolist(), s.round(6).tolist())) == sorted((r[1], round(r[0], 6)) for r in ref)
    assert set(lab.tolist()) == {0, 1, 2, 3} and np.all(np.diff(s) <= 0)


def test_a_low_margin_class_keeps_its_detections_unless_the_old_cut_across_classes_is_asked_for():
    boxes = np.array([[x, 0, x + 10, 10] for x in range(0, 2400, 12)], np.float32)  # 200 disjoint boxes
    scores = np.stack([np.linspace(5, 4, 200), np.linspace(-1, -2, 200)], axis=1)
    _, _, lab = postprocess(boxes, scores, None, 2400, 10)
    assert (lab == 0).sum() == 100 and (lab == 1).sum() == 100
    _, _, lab = postprocess(boxes, scores, None, 2400, 10, max_per_image=100, max_per_class=None)  # the old rule
    assert (lab == 0).sum() == 100 and (lab == 1).sum() == 0


@pytest.mark.parametrize("seed", range(3))
def test_top_per_label_matches_a_plain_loop(seed):
    rng = np.random.default_rng(seed)
    scores, labels = rng.integers(0, 5, 300).astype(float), rng.integers(0, 6, 300)  # many ties
    got = B.top_per_label(scores, labels, 7)
    ref = sorted(i for c in range(6) for i in sorted(np.flatnonzero(labels == c), key=lambda i: (-scores[i], i))[:7])
    assert got.tolist() == ref


def test_postprocess_skips_untrained_classes_and_thresholds():
    boxes = np.array([[0, 0, 10, 10], [50, 50, 60, 60]], np.float32)
    scores = np.array([[1.0, -np.inf], [-2.0, -np.inf]])
    b, s, lab = postprocess(boxes, scores, None, 100, 100, score_threshold=-1.0)
    assert lab.tolist() == [0] and s.tolist() == [1.0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("detect")
    args = [*TINY, f"dataset.root={tmp / 'demo'}", f"out={tmp / 'run'}"]
    assert main(args) == 0  # stage=all: data ... svm, detect, eval
    return args, tmp / "run"


def test_the_chain_writes_a_detector_detections_and_metrics(trained):
    args, run = trained
    svm = json.loads((run / "svm" / "metrics.json").read_text())
    assert svm["classes_trained"] >= 1 and svm["retrains"] >= svm["classes_trained"]
    assert (run / "svm" / "detector.pt").is_file()
    dets = json.loads((run / "detect" / "detections.json").read_text())
    assert dets and {d["image_id"] for d in dets} <= {"test_0000", "test_0001"}  # the dataset's own ids
    assert all(len(d["bbox"]) == 4 and 1 <= d["category_id"] <= 5 for d in dets)
    per_image = {i: sum(d["image_id"] == i for d in dets) for i in {d["image_id"] for d in dets}}
    assert max(per_image.values()) <= 100
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert 0 <= metrics["voc07_map"] <= 1
    history = json.loads((run / "svm" / svm["key"] / "history.json").read_text())
    assert {"total", "reg", "loss_pos", "loss_neg"} <= history[0].keys()


def test_a_later_stage_builds_the_chain_stage_all_would_fine_tuning_included(tmp_path, caplog):
    """Issue #15: stage=eval (or detect) on a fresh run folder builds what it needs, as stage=all does,
    fine-tuning included when the configuration enables it, and says which stage needed which."""
    # svm.C fixed: the chain is the subject here, not the choice of C (159 liblinear fits)
    args = [*TINY, f"dataset.root={tmp_path / 'demo'}", f"out={tmp_path / 'run'}", "finetune.enabled=true",
            "finetune.iterations=2", "finetune.batch_size=8", "finetune.fg_per_batch=2", "svm.C=0.001"]  # fmt: skip
    caplog.set_level("INFO")
    assert main([*args, "stage=eval"]) == 0
    run = tmp_path / "run"
    assert json.loads((run / "finetune" / "metrics.json").read_text())["iterations"] == 2
    features = json.loads((run / "features" / "metrics.json").read_text())
    assert features["backbone_weights"] == "file"  # the fine-tuned network's, not the random start
    assert "(needed by stage features" in caplog.text and "(needed by stage eval" in caplog.text
    assert (run / "eval" / "metrics.json").exists()

    # The fine-tuned network's own classifier as the scorer (R-CNN's softmax against SVM ablation).
    assert main([*args, "stage=eval", "detect.scores=softmax"]) == 0
    dets = json.loads((run / "detect" / "detections.json").read_text())
    assert dets and all(0 <= d["score"] <= 1 for d in dets)
    det = Detector.load(run / "svm" / "detector.pt", scores="softmax")
    feats = np.random.default_rng(0).normal(0, 1, (7, 1024)).astype(np.float32)
    ref = torch.softmax(torch.from_numpy(feats) @ torch.from_numpy(det.cls_w).T + torch.from_numpy(det.cls_b).float(), 1)
    np.testing.assert_allclose(det.score(feats), ref[:, 1:].numpy(), rtol=1e-4, atol=1e-6)
    assert det.score(feats).shape == (7, det.num_classes)

    # That run trained its detector to score with softmax: the file says so, and a detection with it scores so
    # where detect.scores is not given, drawing the boxes above a probability of 0.5 rather than the SVM margin 0.
    from tests.fakes import write_image

    path = run / "svm" / "detector.pt"
    assert Detector.load(path).scores == "softmax" and Detector.load(path, scores="svm").scores == "svm"
    write_image(tmp_path / "photo.jpg", 120, 90, seed=1)
    assert main([*args, "stage=detect", f"out={tmp_path / 'img'}", f"image={tmp_path / 'photo.jpg'}", f"detector={path}"]) == 0
    m = json.loads((tmp_path / "img" / "detect" / "images" / "metrics.json").read_text())
    assert m["scores"] == "softmax" and m["draw_threshold"] == 0.5
    with pytest.raises(DetectorError, match="scores with svm"):  # probabilities are not averaged with margins
        check_ensemble([Detector.load(path), Detector.load(path, scores="svm")])

    # Without SVMs (svm.classifiers=false): a train image's features only for the regressors' proposals, the
    # same as those rows of the full cache; the test images' features whole and the same; no SVMs in the file.
    from features.stage import gt_entry, rows_entry
    from rcnn.datasets import gt_for_training

    full = StageStore.open(run, "features", json.loads((run / "features" / "metrics.json").read_text())["key"])
    assert main([*args, "stage=eval", "svm.classifiers=false"]) == 0
    fm = json.loads((run / "features" / "metrics.json").read_text())
    assert fm["train_rows"] == {"regression_iou": 0.6} and fm["key"] != full.key
    part = StageStore.open(run, "features", fm["key"])
    proposals = StageStore.open(run, "proposals", part.identity["inputs"]["proposals"])
    from rcnn.config import load_config
    from rcnn.datasets import build_dataset

    ds = build_dataset(load_config(args).dataset)
    taken = 0
    for i in ds.image_ids(ds.train_split):
        rows = part.get_array(rows_entry(i))
        boxes = proposals.get(i)["boxes"]
        gt = gt_for_training(ds, i)[0]
        want = np.flatnonzero(B.iou(boxes, gt).max(axis=1) > 0.6) if len(gt) else np.zeros(0, int)
        np.testing.assert_array_equal(rows, want)
        np.testing.assert_allclose(part.get_array(i), full.get_array(i)[rows], rtol=0.02, atol=0.02)
        np.testing.assert_array_equal(part.get_array(gt_entry(i)).shape, full.get_array(gt_entry(i)).shape)
        taken += len(rows)
    assert 0 < taken < sum(len(proposals.get(i)["boxes"]) for i in ds.image_ids(ds.train_split))
    for i in ds.image_ids(ds.test_split):
        assert not part.has(rows_entry(i)) and part.get_array(i).shape == full.get_array(i).shape
    sm = json.loads((run / "svm" / "metrics.json").read_text())
    assert sm["svms"] is False and sm["C"] is None and sm["retrains"] == 0 and sm["regressors_trained"] >= 1
    lean = Detector.load(run / "svm" / "detector.pt")
    assert lean.scores == "softmax" and lean.svm_w is None and lean.has_regression
    with pytest.raises(DetectorError, match="no SVMs"):
        Detector.load(run / "svm" / "detector.pt", scores="svm")
    assert main([*args, "stage=eval", "svm.classifiers=false", "detect.scores=svm"]) == 2  # nothing to score with


def test_box_regression_deltas_match_a_loop_over_classes(trained):
    det = Detector.load(trained[1] / "svm" / "detector.pt")
    assert det.has_regression
    feats = np.random.default_rng(0).normal(0, 1, (30, det.reg_w.shape[1])).astype(np.float16)
    x = feats.astype(np.float64)
    ref = np.stack([x @ det.reg_w[c].astype(np.float64) + det.reg_b[c] for c in range(det.num_classes)], axis=1)
    np.testing.assert_allclose(det.deltas(feats), ref, rtol=1e-4, atol=1e-4)


def test_softmax_scores_need_a_fine_tuned_detector(trained, capsys):
    args, run = trained  # trained without fine-tuning: its detector file carries no classifier
    assert main([*args, "stage=detect", "detect.scores=softmax"]) == 1
    assert "detect.scores=softmax needs the fine-tuned network's classifier" in capsys.readouterr().err


def test_the_api_reproduces_the_stage_and_survives_save_and_reload(trained, tmp_path):
    from rcnn.config import load_config
    from rcnn.stages import RunContext

    args, run = trained
    det = Detector.load(run / "svm" / "detector.pt")
    ds = RunContext(load_config(args)).dataset
    image_id = ds.image_ids(ds.test_split)[0]
    detect = json.loads((run / "detect" / "metrics.json").read_text())
    stage = StageStore.open(run, "detect", detect["key"]).get(image_id)
    props = StageStore.open(run, "proposals", json.loads((run / "proposals" / "metrics.json").read_text())["key"])
    boxes = props.get(image_id)["boxes"]
    rgb = ds.load_image(image_id)
    got = det(rgb, boxes=boxes)  # features recomputed from the image: identical to the cached ones
    np.testing.assert_allclose(got.scores, stage["scores"], rtol=1e-5)
    np.testing.assert_array_equal(got.labels, stage["labels"])
    np.testing.assert_allclose(got.boxes, stage["boxes"], atol=1e-3)
    full = det(ds.image_path(image_id))  # a path, proposals made as in training
    assert len(full) > 0 and full.names[0] in ds.classes
    det.save(tmp_path / "copy.pt")
    again = Detector.load(tmp_path / "copy.pt")(ds.image_path(image_id))
    np.testing.assert_array_equal(again.boxes, full.boxes)
    np.testing.assert_array_equal(again.scores, full.scores)
    np.testing.assert_array_equal(again.labels, full.labels)


def test_ensemble_of_one_detector_twice_equals_it(trained):
    args, run = trained
    path = run / "svm" / "detector.pt"
    out = run.parent / "ens"
    assert main([*args, "stage=detect", f"out={out}", f"ensemble=[{path},{path}]"]) == 0
    single = json.loads((run / "detect" / "detections.json").read_text())
    pair = json.loads((out / "detect" / "detections.json").read_text())
    assert [(d["image_id"], d["category_id"]) for d in pair] == [(d["image_id"], d["category_id"]) for d in single]
    np.testing.assert_allclose([d["score"] for d in pair], [d["score"] for d in single], atol=2e-5)


def test_detect_on_an_image_folder_draws_pngs(trained, tmp_path):
    from tests.fakes import write_image

    args, run = trained
    folder = tmp_path / "photos"
    write_image(folder / "a.jpg", 120, 90, seed=1)
    write_image(folder / "b.png", 100, 80, seed=2)
    exif = Image.Exif()
    exif[0x0112] = 6  # a phone's portrait photo: stored 60 wide and 80 high, shown turned (80 x 60)
    Image.fromarray(np.full((80, 60, 3), 128, np.uint8)).save(folder / "c.jpg", exif=exif)
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    assert main([*args, "stage=detect", f"out={out}", f"image={folder}", f"detector={run / 'svm' / 'detector.pt'}",
                 "detect.draw_threshold=-100"]) == 0  # fmt: skip
    images = out / "detect" / "images"
    assert sorted(p.name for p in images.glob("*.png")) == ["a.png", "b.png", "c.png"]
    dets = json.loads((images / "detections.json").read_text())
    assert {d["image_id"] for d in dets} == {"a.jpg", "b.png", "c.jpg"}
    assert Image.open(images / "c.png").size == (80, 60)  # detected and drawn as a viewer shows it
    assert all(d["bbox"][0] + d["bbox"][2] <= 80.01 and d["bbox"][1] + d["bbox"][3] <= 60.01 for d in dets if d["image_id"] == "c.jpg")


def test_an_image_folder_run_skips_unreadable_files_says_what_it_drew_and_leaves_no_stale_pngs(trained, tmp_path, capsys, caplog):
    from tests.fakes import write_image

    args, run = trained
    folder = tmp_path / "photos"
    write_image(folder / "a.jpg", 120, 90, seed=1)
    write_image(folder / "b.png", 100, 80, seed=2)
    common = [*args, "stage=detect", f"out={tmp_path / 'out'}", f"detector={run / 'svm' / 'detector.pt'}"]
    assert main([*common, f"image={folder}", "detect.draw_threshold=-100"]) == 0
    (folder / "b.png").unlink()
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    capsys.readouterr()
    assert main([*common, f"image={folder}", "detect.draw_threshold=1000"]) == 0  # nothing scores that high
    out = capsys.readouterr().out
    assert "broken.jpg" in caplog.text and "a.jpg: 0 box(es) drawn (best score" in out
    assert "1 image(s) with none drawn: lower detect.draw_threshold" in out
    images = tmp_path / "out" / "detect" / "images"
    assert sorted(p.name for p in images.glob("*.png")) == ["a.png"]  # b.png of the first run removed
    m = json.loads((images / "metrics.json").read_text())
    assert m["skipped"] == ["broken.jpg"] and m["drawn_per_image"]["a.jpg"]["drawn"] == 0


def test_image_detection_does_not_train_a_detector_unasked(trained, tmp_path, capsys):
    """A detection in photos whose command left out a training key would train another detector: it stops and
    says which setting differs and how to go on instead."""
    from tests.fakes import write_image

    args, run = trained
    write_image(tmp_path / "a.jpg", 120, 90, seed=1)
    def built():  # the svm builds finished in the run folder
        return {m.parent.name for m in (run / "svm").glob("*/manifest.json") if json.loads(m.read_text())["complete"]}

    before = built()
    assert main([*args, "stage=detect", f"image={tmp_path / 'a.jpg'}", "svm.neg_iou=0.2"]) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert "the svm stage of this configuration's detector is not built in" in err and "neg_iou 0.3 -> 0.2" in err
    assert f"detector={run / 'svm' / 'detector.pt'} to run the detector that is there" in err
    assert main([*args, "stage=detect", f"image={tmp_path / 'a.jpg'}"]) == 0  # the training command's keys: its detector
    assert built() == before  # nothing trained either time


def test_bad_detector_files_are_named(tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(DetectorError, match="bad.pt"):
        Detector.load(bad)
    with pytest.raises(DetectorError, match="no such detector file"):
        Detector.load(tmp_path / "missing.pt")
    model = tmp_path / "model.pt"
    torch.save(torch.nn.Linear(2, 2), model)  # a whole pickled module: torch would advise weights_only=False
    with pytest.raises(DetectorError, match="not a detector file of this project") as e:
        Detector.load(model)
    assert "weights_only" not in str(e.value)
    assert main([f"out={tmp_path}", "stage=detect", f"detector={bad}", f"image={bad}"]) == 1
    assert "bad.pt" in capsys.readouterr().err


def test_benchmark_reports_the_chain_and_appends_it(trained, tmp_path):
    args, run = trained
    bench = tmp_path / "BENCH.md"
    bench.write_text("# Benchmarks\n")
    assert main([*args, "stage=benchmark", f"benchmark.append_to={bench}"]) == 0  # every stage cached: quick
    report = json.loads((run / "benchmark" / "report.json").read_text())
    assert report["machine"]["cores"] >= 1 and report["machine"]["cpu"]
    assert [s["stage"] for s in report["stages"]] == ["data", "multibox", "proposals", "features", "svm", "detect", "eval"]
    evaluated = json.loads((run / "eval" / "metrics.json").read_text())
    assert report["eval"]["voc07_map"] == evaluated["voc07_map"]
    assert report["features"]["bytes_per_image"] > 0 and "test" in report["proposals"]
    assert all(s["peak_rss_mb"] > 10 for s in report["stages"])  # every stage's peak memory, in the report
    assert json.loads((run / "svm" / "metrics.json").read_text())["peak_rss_mb"] > 10  # and in its metrics.json
    text = bench.read_text()
    assert text.startswith("# Benchmarks\n") and "## Benchmark: demo" in text and "| svm |" in text
    assert (run / "benchmark" / "report.md").read_text() in text


def test_a_killed_svm_stage_resumes_to_the_same_detector(trained, tmp_path, monkeypatch):
    import shutil

    import torch

    from svm.train import HardNegativeMiner

    args, run = trained
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    shutil.rmtree(copy / "svm")
    calls = {"n": 0}
    original = HardNegativeMiner.add_image
    # C is chosen first (each C of the grid, each fold: the train images of the other folds are mined), then
    # the final SVMs mine every train image: die at the final mining's third image.
    from rcnn.config import load_config
    from svm.stage import folds_of

    cfg = load_config(args)
    n = cfg.dataset.train_images
    choosing = len(cfg.svm.C_grid) * sum(n - len(f) for f in folds_of(list(range(n)), cfg.svm.folds))

    def dies_at_the_third_image(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == choosing + 3:
            raise KeyboardInterrupt
        return original(self, *a, **k)

    monkeypatch.setattr(HardNegativeMiner, "add_image", dies_at_the_third_image)
    again = [*args, f"out={copy}", "stage=svm", "svm.checkpoint_seconds=0"]
    assert main(again) == 130
    assert list((copy / "svm").glob("*/checkpoint.pt"))
    calls["n"] = -100  # the rerun is not interrupted
    assert main(again) == 0
    assert calls["n"] == -100 + 2  # C was not chosen again, and mining went on from the third image of four
    m = json.loads((copy / "svm" / "metrics.json").read_text())
    assert m["images_mined_now"] == 2 and m["mining_seconds_all"] > 0  # the resume is visible
    a = torch.load(run / "svm" / "detector.pt", weights_only=True)
    b = torch.load(copy / "svm" / "detector.pt", weights_only=True)
    for key in ("svm_w", "svm_b", "reg_w", "reg_b"):
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    assert not list((copy / "svm").glob("*/checkpoint.pt"))


def test_each_class_keeps_its_best_detections_over_the_split():
    from eval.detections import Detections
    from rcnn.detect import best_per_class

    dets = Detections(image=np.array([0, 0, 1, 1, 2]), labels=np.array([0, 1, 0, 0, 1]),
                      scores=np.array([0.1, 0.5, 0.9, 0.4, 0.2]), boxes=np.zeros((5, 4), np.float32))  # fmt: skip
    kept = best_per_class(dets, 2)
    assert kept.scores.tolist() == [0.5, 0.9, 0.4, 0.2] and kept.image.tolist() == [0, 1, 1, 2]


def test_the_analysis_counts_the_objects_no_proposal_reached_from_the_runs_own_proposals(trained, tmp_path):
    import shutil

    from eval.voc import iou_one
    from rcnn.config import load_config
    from rcnn.datasets import build_dataset

    args, run = trained
    copy = tmp_path / "run"
    shutil.copytree(run, copy)  # (the module's run stays as the other tests read it)
    args = [a for a in args if not a.startswith("out=")] + [f"out={copy}"]
    assert main([*args, "stage=analyze"]) == 0
    a = json.loads((copy / "eval" / "metrics.json").read_text())["analysis"]
    # A plain loop over the test objects and the proposals the detections were made from.
    ds = build_dataset(load_config(args).dataset)
    props = StageStore.open(copy, "proposals", json.loads((copy / "proposals" / "metrics.json").read_text())["key"])
    unproposed = dict.fromkeys(ds.classes, 0)
    for i in ds.image_ids(ds.test_split):
        ann, boxes = ds.annotation(i), props.get(i)["boxes"].astype(np.float64)
        for box, label, difficult in zip(ann.boxes, ann.labels, ann.difficult):
            if not difficult and (not len(boxes) or iou_one(box.astype(np.float64), boxes).max() < 0.5):
                unproposed[ds.classes[label]] += 1
    assert a["overall"]["unproposed"] == sum(unproposed.values())
    assert {n: p["unproposed"] for n, p in a["per_class"].items()} == {n: unproposed[n] for n in a["per_class"]}
    assert all(p["missed_unproposed"] <= min(p["missed"], p["unproposed"]) for p in a["per_class"].values())
    assert "no proposal" in (copy / "eval" / "report.md").read_text()


def test_a_detector_detects_with_its_own_nms_where_none_is_asked(trained):
    """The detector file carries the per-class NMS its training objects call for (R-CNN's 0.3 on the demo,
    whose objects of a class barely overlap); ``nms_iou=None`` (``detect.nms_iou=null``) detects with it."""
    from rcnn.datasets.base import read_image

    args, run = trained
    det = Detector.load(run / "svm" / "detector.pt")
    assert det.parts["nms_iou"] == [0.3] * 5 and det.nms_iou == (0.3,) * 5  # one a class
    rgb = read_image(next((run.parent / "demo" / "JPEGImages").glob("test_*")))
    boxes = det.proposals(rgb)
    loose = Detector({**det.parts, "nms_iou": [0.9] * 5})
    own, asked, rcnn = (loose(rgb, boxes=boxes, nms_iou=t) for t in (None, 0.9, 0.3))
    np.testing.assert_array_equal(own.boxes, asked.boxes)
    assert len(own) > len(rcnn)  # at 0.9 overlapping boxes of a class survive that 0.3 removes
    old = {k: v for k, v in det.parts.items() if k != "nms_iou"}  # a file written before detectors carried it
    assert Detector(old).nms_iou == (0.3,) * 5
