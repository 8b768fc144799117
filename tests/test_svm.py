import numpy as np
import pytest
from sklearn.linear_model import Ridge
from sklearn.svm import LinearSVC

from svm.box_regression import Whitening, decode, encode, fit_regressor
from svm.stage import class_max_iou
from svm.train import HardNegativeMiner, SvmParams, fit_svm, mean_norm_scale, objective

P = SvmParams(C=0.1, retrain_limit=40, max_iter=100000)


def problem(seed=0, images=12, per_image=60, dim=8):
    """Two classes of positives; per image, negatives (some near the positives: hard) with their IoUs."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 2, (2, dim))
    pos = [rng.normal(centres[c], 1.0, (25, dim)).astype(np.float32) for c in range(2)]
    imgs = []
    for _ in range(images):
        X = rng.normal(0, 2.0, (per_image, dim)).astype(np.float32)
        iou = rng.uniform(0, 0.6, (per_image, 2)).astype(np.float32)  # some are neither (IoU >= 0.3)
        imgs.append((X, iou))
    return pos, imgs


def mine(pos, imgs, p=P, workers=1, parallel_min_negatives=None):
    """Mine every image; ``parallel_min_negatives`` overrides the miner's threshold for using workers.
    Returns the miner and whether it started worker processes."""
    miner = HardNegativeMiner(pos, p, workers)
    if parallel_min_negatives is not None:
        miner.parallel_min_negatives = parallel_min_negatives
    started = False
    try:
        for k, (X, iou) in enumerate(imgs):
            miner.add_image(X, iou, last=k == len(imgs) - 1)
            started |= miner._pool is not None
        miner.finish()
    finally:
        miner.close()
    return miner, started


def test_classes_fitted_in_worker_processes_give_the_same_svms():
    import pickle

    pos, imgs = problem(4)
    pos = pos + [p + 1 for p in pos] + [pos[0] - 1]  # 5 classes: more due at once than workers
    imgs = [(X, np.concatenate([iou, iou, iou[:, :1]], axis=1)) for X, iou in imgs]
    serial, _ = mine(pos, imgs)
    parallel, started = mine(pos, imgs, workers=2, parallel_min_negatives=0)  # small: forced to the workers
    assert started
    assert not mine(pos, imgs, workers=2)[1]  # by default this little work stays in this process
    for a, b in zip(serial.model(), parallel.model()):
        np.testing.assert_array_equal(a, b)
    assert serial.history == parallel.history and len(serial.history) > 10
    assert pickle.loads(pickle.dumps(parallel))._pool is None  # a checkpoint holds no processes


@pytest.mark.parametrize("seed", range(6))
def test_hard_negative_mining_reaches_the_model_trained_on_every_negative(seed):
    """One pass of mining, against brute force (one fit on every negative): on the whole problem its
    objective is within 10% of the optimum (measured: 0-7%; the first image's negatives alone: +86-600%)."""
    pos, imgs = problem(seed)
    miner, _ = mine(pos, imgs)
    W, b, trained = miner.model()
    assert trained.all() and len(miner.history) > 2 * 2  # several retrains per class
    for c in range(2):
        every = np.concatenate([X[iou[:, c] < P.neg_iou] for X, iou in imgs])
        w_full, b_full = fit_svm(pos[c], every, P)  # brute force: one fit on all negatives
        mined = objective(W[c], b[c], pos[c], every, P)["total"]
        full = objective(w_full, b_full, pos[c], every, P)["total"]
        assert full * (1 - 1e-4) <= mined <= full * 1.10  # 1e-4: liblinear's tolerance


def test_mining_rules():
    """First image: every negative; then only those scoring above the hard threshold, never IoU >= 0.3;
    easy ones evicted after a retrain; a class without positives gets no model."""
    pos, imgs = problem(3, images=3)
    p = SvmParams(C=0.1, retrain_limit=10**6, max_iter=100000)  # no retrain before the last image
    miner = HardNegativeMiner([pos[0], np.zeros((0, 8), np.float32)], p)
    X0, iou0 = imgs[0]
    miner.add_image(X0, iou0)
    cache = miner.classes[0]
    first_negs = int((iou0[:, 0] < p.neg_iou).sum())
    assert miner.history[0]["negatives"] == first_negs and cache.retrains == 1
    w, b = cache.w.copy(), cache.b
    kept_after_evict = np.concatenate(cache.neg)
    z0 = X0[iou0[:, 0] < p.neg_iou] @ w + b
    assert len(kept_after_evict) == int((z0 >= p.evict_threshold).sum())
    X1, iou1 = imgs[1]
    miner.add_image(X1, iou1)
    added = np.concatenate(cache.neg)[len(kept_after_evict):]
    expect = X1[(iou1[:, 0] < p.neg_iou) & (X1 @ w + b > p.hard_threshold)]
    np.testing.assert_array_equal(added, expect)
    assert cache.retrains == 1  # under the retrain limit: no retrain yet
    miner.add_image(*imgs[2], last=True)
    assert cache.retrains == 2
    W, b_all, trained = miner.model()
    assert trained.tolist() == [True, False] and b_all[1] == -np.inf


def test_rescaled_weights_reproduce_decision_function():
    pos, imgs = problem(4)
    raw_pos, raw_neg = pos[0] * 7.0, np.concatenate([X for X, _ in imgs]) * 7.0
    scale = mean_norm_scale([raw_pos, raw_neg], target_norm=20)
    assert np.linalg.norm(np.concatenate([raw_pos, raw_neg]) * scale, axis=1).mean() == pytest.approx(20, rel=1e-5)
    X = np.concatenate([raw_pos, raw_neg]) * scale
    y = np.r_[np.ones(len(raw_pos)), -np.ones(len(raw_neg))]
    svc = LinearSVC(C=P.C, loss="hinge", dual=True, class_weight={1: 2, -1: 1}, intercept_scaling=10, max_iter=100000,
                    random_state=0).fit(X, y)  # fmt: skip
    w, b = fit_svm(raw_pos * scale, raw_neg * scale, P)
    folded = w * scale  # the detector file's weights act on raw (cached) features
    raw = np.concatenate([raw_pos, raw_neg])
    np.testing.assert_allclose(raw @ folded + b, svc.decision_function(X), rtol=1e-4, atol=1e-4)


def test_objective_pieces_by_hand():
    w, b = np.array([1.0, 0.0]), -0.5
    pos = np.array([[1.0, 0.0], [2.0, 0.0]])  # z = 0.5 (hinge 0.5), 1.5 (0)
    neg = np.array([[0.0, 0.0]])  # z = -0.5 (hinge 0.5)
    o = objective(w, b, pos, neg, SvmParams(C=0.1, pos_weight=2, bias_multiplier=10))
    assert o["reg"] == pytest.approx(0.5 * (1 + 0.05**2))
    assert o["loss_pos"] == pytest.approx(0.1 * 2 * 0.5) and o["loss_neg"] == pytest.approx(0.1 * 0.5)


def test_class_max_iou():
    props = np.array([[0, 0, 10, 10], [20, 20, 30, 30]], np.float32)
    gt = np.array([[0, 0, 10, 5], [20, 20, 30, 30], [0, 0, 10, 10]], np.float32)
    m = class_max_iou(props, gt, np.array([1, 1, 0]), 3)
    np.testing.assert_allclose(m, [[1.0, 0.5, 0], [0, 1.0, 0]])


def test_regression_targets_round_trip():
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 100, (50, 2))
    props = np.concatenate([xy, xy + rng.uniform(5, 80, (50, 2))], axis=1)
    gxy = rng.uniform(0, 100, (50, 2))
    gt = np.concatenate([gxy, gxy + rng.uniform(5, 80, (50, 2))], axis=1)
    t = encode(props, gt)
    np.testing.assert_allclose(decode(props, t), gt, rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(decode(props, np.zeros((50, 4))), props, atol=1e-4)  # zero deltas: unchanged
    per_class = np.stack([t, np.zeros_like(t)], axis=1)  # [N, C, 4]
    np.testing.assert_allclose(decode(props, per_class)[:, 0], gt, rtol=1e-5, atol=1e-3)
    # By hand: a box twice as wide, shifted right by half its width.
    np.testing.assert_allclose(encode([[0, 0, 10, 10]], [[0, 0, 20, 10]]), [[0.5, 0, np.log(2), 0]], atol=1e-12)
    white = Whitening(t)
    np.testing.assert_allclose(white.undo(white(t)), t, atol=1e-9)
    np.testing.assert_allclose(np.cov(white(t), rowvar=False), np.eye(4), atol=1e-3)


def test_regressor_is_ridge_on_whitened_targets_folded_back():
    rng = np.random.default_rng(1)
    X = rng.normal(0, 1, (200, 6)).astype(np.float32)
    t = X[:, :4] * [0.1, 0.2, 0.05, 0.3] + rng.normal(0, 0.01, (200, 4))
    W, b = fit_regressor(X, t, lam=10.0)
    white = Whitening(t)
    ridge = Ridge(alpha=10.0).fit(X.astype(np.float64), white(t))
    np.testing.assert_allclose(X @ W + b, white.undo(ridge.predict(X.astype(np.float64))), rtol=1e-4, atol=1e-5)
    assert np.corrcoef((X @ W + b)[:, 3], t[:, 3])[0, 1] > 0.95  # it learned the offsets


def test_degenerate_fits_are_detected():
    from svm.stage import degenerate_classes

    pos = [np.ones((4, 3), np.float32), np.ones((4, 3), np.float32), np.zeros((0, 3), np.float32)]
    W = np.array([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]], np.float32)
    b = np.array([-1.0, 0.0, -np.inf])  # class 0: w = 0 scores every positive -1; class 2: untrained
    assert degenerate_classes(W, b, pos) == [0]


def test_folds_are_interleaved_and_cover_every_image_once():
    from svm.stage import folds_of

    assert folds_of(list(range(7)), 3) == [[0, 3, 6], [1, 4], [2, 5]]
    assert sorted(i for f in folds_of(list(range(12)), 5) for i in f) == list(range(12))


def test_C_is_chosen_by_cross_validation_over_every_train_image(tmp_path):
    """Issue #27: each C of the grid is scored on every fold by SVMs trained on the others; the best mean
    wins; the record says each C's mean and spread and how far the winner leads."""
    import json

    from rcnn.run import main

    from .test_detect import TINY

    run = tmp_path / "run"
    args = [*TINY, f"dataset.root={tmp_path / 'demo'}", f"out={run}", "dataset.train_images=6", "svm.C=null",
            "svm.C_grid=[0.00001,1.0]", "svm.folds=3", "stage=svm"]  # fmt: skip
    assert main(args) == 0
    m = json.loads((run / "svm" / "metrics.json").read_text())
    sel = m["C_selection"]
    assert sel["folds"] == 3 and [r["C"] for r in sel["per_C"]] == [0.00001, 1.0]
    assert sorted((r["C"], r["fold"]) for r in sel["per_fold"]) == [(c, f) for c in (0.00001, 1.0) for f in range(3)]
    assert all(r["images"] == 2 for r in sel["per_fold"])  # 6 images, 3 folds: every image scored once per C
    for row in sel["per_C"]:
        own = [r["voc07_map"] for r in sel["per_fold"] if r["C"] == row["C"] and r["voc07_map"] is not None]
        assert row["mean_voc07_map"] == round(float(np.mean(own)), 4)
    sound = [r for r in sel["per_C"] if not r["degenerate_classes"]] or sel["per_C"]
    best = max(sound, key=lambda r: (r["mean_voc07_map"], -r["C"]))
    assert m["C"] == sel["chosen"] == best["C"]
    assert json.loads((run / "svm" / m["key"] / "c_selection.json").read_text()) == sel["per_fold"]
    assert isinstance(m["degenerate_classes"], list)
    assert all(0 <= v["positives_above_zero"] <= 1 for v in m["per_class"].values())


def test_max_negatives_keeps_each_cache_to_its_hardest_negatives(caplog):
    """After every retrain a class keeps at most ``max_negatives``: its highest-scoring hard negatives
    (checked against a sort of the same scores), with a warning the first time the bound is hit."""
    from dataclasses import replace

    pos, imgs = problem(3, images=8, per_image=120)
    p = replace(P, max_negatives=50, evict_threshold=-1e9)  # nothing evicted: only the bound trims
    miner = HardNegativeMiner(pos, p)
    for k, (X, iou) in enumerate(imgs):
        before = [c.negatives().copy() for c in miner.classes]
        W, b = miner._weights()  # the models that pick this image's hard negatives
        retrains = len(miner.history)
        miner.add_image(X, iou, last=k == len(imgs) - 1)
        for rec in miner.history[retrains:]:
            c, cache = rec["class"], miner.classes[rec["class"]]
            hard = (iou[:, c] < p.neg_iou) & (X @ W[c] + b[c] > p.hard_threshold)
            pool = np.concatenate([before[c], X[hard]])
            z = pool @ cache.w + cache.b
            expected = np.sort(z)[::-1][: p.max_negatives]
            kept = np.sort(cache.negatives() @ cache.w + cache.b)[::-1]
            np.testing.assert_allclose(kept, expected, rtol=1e-5, atol=1e-5)
            assert rec["capped"] == max(len(pool) - p.max_negatives, 0)
    assert all(len(c.negatives()) <= 50 for c in miner.classes)
    assert sum(c.capped for c in miner.classes) > 0
    assert "over svm.max_negatives=50" in caplog.text


def test_max_negatives_unbounded_is_r_cnn_mining():
    from dataclasses import replace

    pos, imgs = problem(5)
    a, _ = mine(pos, imgs, P)
    b, _ = mine(pos, imgs, replace(P, max_negatives=10**9))
    for x, y in zip(a.model(), b.model()):
        np.testing.assert_array_equal(x, y)


def test_linking_the_detector_again_leaves_no_temporary_file(tmp_path):
    """Defect 4 of issue #15: os.replace of a hard link onto the same file is a no-op, leaving the link."""
    from svm.stage import _link

    src, dst = tmp_path / "key" / "detector.pt", tmp_path / "detector.pt"
    src.parent.mkdir()
    src.write_bytes(b"one")
    for _ in range(3):
        _link(src, dst)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["detector.pt", "key"]
    src.unlink()
    src.write_bytes(b"two")  # a new detector under the same key: the link follows it
    _link(src, dst)
    assert dst.read_bytes() == b"two" and sorted(p.name for p in tmp_path.iterdir()) == ["detector.pt", "key"]


def test_training_rows_are_the_ground_truth_then_the_proposals_difficult_boxes_included():
    """Issue #13: as R-CNN's feature cache (roidb_from_voc.m): a proposal on a difficult dog is not a dog
    negative, a cat's ground-truth box is a candidate dog negative, ground-truth boxes come first."""
    from types import SimpleNamespace

    from features.stage import gt_entry
    from rcnn.datasets.base import Annotation
    from svm.stage import training_rows

    gt = np.array([[0, 0, 10, 10], [50, 50, 70, 70]], np.float32)  # a cat, a difficult dog
    props = np.array([[50, 50, 70, 70], [0, 0, 10, 10], [100, 0, 110, 10]], np.float32)
    ann = Annotation(boxes=gt, labels=np.array([0, 1]), difficult=np.array([False, True]), width=120, height=80)
    ds = SimpleNamespace(annotation=lambda i: ann, num_classes=2)
    rows = {gt_entry("a"): np.full((2, 4), 1.0), "a": np.full((3, 4), 2.0)}
    features = SimpleNamespace(get_array=lambda i: rows[i], has=lambda i: i in rows)
    proposals = SimpleNamespace(get=lambda i: {"boxes": props})
    raw, boxes, max_iou, g, labels = training_rows(ds, features, proposals, "a")
    assert raw[:, 0].tolist() == [1, 1, 2, 2, 2] and boxes.tolist() == [*gt.tolist(), *props.tolist()]
    assert max_iou.tolist() == [[1, 0], [0, 1], [0, 1], [1, 0], [0, 0]]  # the difficult dog counts as a dog
    assert labels.tolist() == [0, 1] and len(g) == 2
    # Features of only some proposals (svm.classifiers=false): the indices beside them name which.
    from features.stage import rows_entry

    rows = {gt_entry("a"): np.full((2, 4), 1.0), "a": np.full((1, 4), 2.0), rows_entry("a"): np.array([1])}
    raw, boxes, max_iou, _, _ = training_rows(ds, features, proposals, "a")
    assert raw[:, 0].tolist() == [1, 1, 2] and boxes.tolist() == [*gt.tolist(), props[1].tolist()]


def test_crowd_regions_and_the_proposals_inside_them_are_left_out_of_training():
    """Issue #13: a COCO crowd box is not an SVM positive nor a fine-tuning window, and a proposal lying in
    the crowd (>= 70% of its area) is neither a negative nor background (Fast R-CNN / Detectron). On the
    code before, the crowd box was a person positive and the proposal inside it a person."""
    from types import SimpleNamespace

    from features.stage import gt_entry, training_windows
    from rcnn.datasets.base import Annotation
    from svm.stage import training_rows

    gt = np.array([[0, 0, 10, 10], [40, 0, 120, 80]], np.float32)  # a person; a crowd of people
    crowd = np.array([False, True])
    props = np.array([[50, 10, 70, 40], [30, 0, 50, 20], [0, 0, 10, 12]], np.float32)  # in the crowd; half in; on the person
    ann = Annotation(boxes=gt, labels=np.array([0, 0]), difficult=crowd, width=120, height=80, crowd=crowd)
    ds = SimpleNamespace(annotation=lambda i: ann, num_classes=1)
    rows = {gt_entry("a"): np.full((1, 4), 1.0), "a": np.arange(3, dtype=float)[:, None].repeat(4, 1) + 2}
    features = SimpleNamespace(get_array=lambda i: rows[i], has=lambda i: i in rows)
    proposals = SimpleNamespace(get=lambda i: {"boxes": props})
    raw, boxes, max_iou, g, labels = training_rows(ds, features, proposals, "a")
    assert g.tolist() == [[0, 0, 10, 10]] and labels.tolist() == [0]  # the crowd is no positive
    assert boxes.tolist() == [gt[0].tolist(), props[1].tolist(), props[2].tolist()]
    assert raw[:, 0].tolist() == [1, 3, 4]  # the features of the rows kept
    np.testing.assert_allclose(max_iou[:, 0], [1, 0, 100 / 120])  # the half-in proposal is a candidate negative
    windows = training_windows(ds, ["a"], proposals, fg_iou=0.5)
    assert windows.boxes.tolist() == boxes.tolist() and windows.labels.tolist() == [1, 0, 1]


def test_unconverged_fits_are_counted_not_warned_once_each(recwarn):
    """liblinear's ConvergenceWarning came once per fit (pages of them on a real run); the miner records
    ``converged`` per retrain instead, and the stage says it once."""
    import dataclasses

    pos, imgs = problem(1)
    capped, _ = mine(pos, imgs, p=dataclasses.replace(P, max_iter=2))
    assert capped.history and not any(r["converged"] for r in capped.history)
    free, _ = mine(pos, imgs)
    assert all(r["converged"] for r in free.history)
    from sklearn.exceptions import ConvergenceWarning

    assert not [w for w in recwarn if issubclass(w.category, ConvergenceWarning)]
