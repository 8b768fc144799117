import numpy as np
import pytest

from proposals.recall import best_overlaps, recall_curve, recall_summary


def brute_iou(p, q):
    iw = max(0.0, min(p[2], q[2]) - max(p[0], q[0]))
    ih = max(0.0, min(p[3], q[3]) - max(p[1], q[1]))
    inter = iw * ih
    return inter / ((p[2] - p[0]) * (p[3] - p[1]) + (q[2] - q[0]) * (q[3] - q[1]) - inter)


def random_boxes(rng, n):
    xy = rng.uniform(0, 80, (n, 2))
    return np.concatenate([xy, xy + rng.uniform(2, 40, (n, 2))], axis=1)


@pytest.mark.parametrize("seed", range(4))
def test_best_overlaps_match_brute_force(seed):
    rng = np.random.default_rng(seed)
    gt, props = random_boxes(rng, 7), random_boxes(rng, 30)
    counts = [1, 5, 30, 50]
    got = best_overlaps(gt, props, counts)
    for c, row in zip(counts, got):
        want = [max(brute_iou(g, p) for p in props[:c]) for g in gt]
        np.testing.assert_allclose(row, want, rtol=1e-9)
    np.testing.assert_allclose(best_overlaps(gt, props), got[-1])


def test_summary_against_a_loop_and_threshold_edges():
    gt = np.array([[0, 0, 10, 10], [20, 20, 30, 30], [50, 50, 60, 60]], float)
    labels = np.array([0, 0, 1])
    props = np.array([[0, 0, 10, 5],  # IoU exactly 0.5 with gt 0: recalled at 0.5
                      [20, 20, 30, 27.5],  # IoU 0.75 with gt 1
                      [55, 50, 65, 60]], float)  # IoU 1/3 with gt 2  # fmt: skip
    s = recall_summary([(gt, labels, props)], num_classes=3)
    assert s["recall_50"] == pytest.approx(2 / 3) and s["recall_70"] == pytest.approx(1 / 3)
    # MABO: mean over classes of the mean best overlap: class 0 (0.5 + 0.75) / 2, class 1 1/3.
    assert s["mabo"] == pytest.approx(((0.5 + 0.75) / 2 + 1 / 3) / 2)
    assert s["boxes_per_image"] == 3 and s["gt_boxes"] == 3


@pytest.mark.parametrize("seed", range(3))
def test_summary_matches_brute_force_over_images(seed):
    rng = np.random.default_rng(seed)
    items = [(random_boxes(rng, n), rng.integers(0, 4, n), random_boxes(rng, 40)) for n in (3, 0, 6, 2)]
    best = [(lab, max(brute_iou(g, p) for p in props)) for gt, labels, props in items for g, lab in zip(gt, labels)]
    ov = np.array([b for _, b in best])
    per_class = [np.mean([b for lab, b in best if lab == c]) for c in range(4) if any(lab == c for lab, _ in best)]
    s = recall_summary(items, 4)
    assert s["recall_50"] == pytest.approx((ov >= 0.5).mean()) and s["recall_70"] == pytest.approx((ov >= 0.7).mean())
    assert s["mabo"] == pytest.approx(np.mean(per_class))
    curve = recall_curve([(gt, props) for gt, _, props in items], [1, 10, 40])
    assert curve["recall_50"][-1] == pytest.approx(s["recall_50"])
    assert curve["recall_50"] == sorted(curve["recall_50"])


def test_empty_inputs():
    s = recall_summary([(np.zeros((2, 4)) + [0, 0, 5, 5], np.array([0, 1]), np.zeros((0, 4)))], 2)
    assert s["recall_50"] == 0 and s["mabo"] == 0
    assert recall_summary([], 2)["recall_50"] == 0
    assert best_overlaps(np.zeros((0, 4)), np.ones((3, 4))).shape == (0,)
