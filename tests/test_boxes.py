import numpy as np
import pytest
import torch

from rcnn import boxes as B


def brute_iou(a, b):
    out = np.zeros((len(a), len(b)))
    for i, p in enumerate(a):
        for j, q in enumerate(b):
            iw = max(0.0, min(p[2], q[2]) - max(p[0], q[0]))
            ih = max(0.0, min(p[3], q[3]) - max(p[1], q[1]))
            inter = iw * ih
            union = (p[2] - p[0]) * (p[3] - p[1]) + (q[2] - q[0]) * (q[3] - q[1]) - inter
            out[i, j] = inter / union if union > 0 else 0.0
    return out


def brute_nms(boxes, scores, thr):
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    keep = []
    for i in order:
        if all(brute_iou(boxes[[i]], boxes[[k]])[0, 0] <= thr for k in keep):
            keep.append(i)
    return keep


def random_boxes(rng, n, size=100.0):
    xy = rng.uniform(0, size, (n, 2))
    wh = rng.uniform(1, size / 2, (n, 2))
    return np.concatenate([xy, xy + wh], axis=1)


def test_hand_computed_iou():
    a = np.array([[0, 0, 10, 10]], float)
    cases = {
        (0, 0, 10, 10): 1.0,  # identical
        (5, 0, 15, 10): 50 / 150,  # half overlap
        (5, 5, 15, 15): 25 / 175,  # quarter overlap
        (10, 0, 20, 10): 0.0,  # touching
        (20, 20, 30, 30): 0.0,  # disjoint
        (0, 0, 5, 10): 0.5,  # contained, half the area
    }
    got = B.iou(a, np.array(list(cases), float))[0]
    np.testing.assert_allclose(got, list(cases.values()))


@pytest.mark.parametrize("seed", range(5))
def test_iou_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    a, b = random_boxes(rng, 17), random_boxes(rng, 9)
    np.testing.assert_allclose(B.iou(a, b), brute_iou(a, b), rtol=1e-9, atol=1e-12)
    t = B.iou(torch.from_numpy(a), torch.from_numpy(b))
    assert isinstance(t, torch.Tensor) and t.shape == (17, 9)


def brute_ioa(a, b):
    out = np.zeros((len(a), len(b)))
    for i, p in enumerate(a):
        for j, q in enumerate(b):
            inter = max(0.0, min(p[2], q[2]) - max(p[0], q[0])) * max(0.0, min(p[3], q[3]) - max(p[1], q[1]))
            out[i, j] = inter / ((p[2] - p[0]) * (p[3] - p[1]))
    return out


@pytest.mark.parametrize("seed", range(3))
def test_ioa_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    a, b = random_boxes(rng, 13), random_boxes(rng, 5)
    np.testing.assert_allclose(B.ioa(a, b), brute_ioa(a, b), rtol=1e-9, atol=1e-12)
    assert B.ioa(a, np.zeros((0, 4))).shape == (13, 0) and B.ioa([], b).shape == (0, 5)
    inside = B.ioa([[2, 2, 4, 4]], [[0, 0, 10, 10]])  # a box inside a region: all of its area
    assert inside[0, 0] == 1.0


def test_iou_empty_inputs():
    assert B.iou(np.zeros((0, 4)), random_boxes(np.random.default_rng(0), 3)).shape == (0, 3)
    assert B.iou([], []).shape == (0, 0)


@pytest.mark.parametrize("seed", range(3))
def test_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    props, gt = random_boxes(rng, 200, size=40), random_boxes(rng, 4, size=40)
    ov = brute_iou(props, gt)
    want = [(i, int(np.argmax(ov[i]))) for i in range(len(props)) if ov[i].max() > 0.3]
    rows, best = B.matches(props, gt, 0.3)
    assert want and list(zip(rows.tolist(), best.tolist())) == want
    assert rows.dtype == best.dtype == np.int64
    for empty in (B.matches(props, np.zeros((0, 4)), 0.3), B.matches([], gt, 0.3)):
        assert [len(a) for a in empty] == [0, 0]


@pytest.mark.parametrize("seed", range(5))
def test_nms_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    boxes = random_boxes(rng, 40, size=60)
    scores = rng.permutation(40).astype(np.float32)  # distinct scores: a unique answer
    for thr in (0.3, 0.5, 0.7):
        assert B.nms(boxes, scores, thr).tolist() == brute_nms(boxes, scores, thr)


def test_nms_threshold_is_strict():
    # IoU of the pair is exactly 1/3; NMS at 1/3 keeps both (suppresses only IoU > threshold).
    boxes = np.array([[0, 0, 10, 10], [5, 0, 15, 10]], np.float32)
    assert B.nms(boxes, [0.9, 0.8], 1 / 3 + 1e-6).tolist() == [0, 1]
    assert B.nms(boxes, [0.9, 0.8], 1 / 3 - 1e-3).tolist() == [0]
    assert B.nms(np.zeros((0, 4)), [], 0.5).tolist() == []


def test_batched_nms_is_nms_per_label():
    rng = np.random.default_rng(3)
    boxes, scores = random_boxes(rng, 30, size=50), rng.permutation(30).astype(np.float32)
    labels = rng.integers(0, 3, 30)
    expected = [i for lab in range(3) for i in np.flatnonzero(labels == lab)[brute_nms(boxes[labels == lab], scores[labels == lab], 0.3)]]
    got = B.batched_nms(boxes, scores, labels, 0.3)
    assert sorted(got.tolist()) == sorted(expected)
    assert (np.diff(scores[got]) <= 0).all()


def test_conversions_round_trip_and_do_not_mutate():
    voc = np.array([[1, 1, 10, 20], [5, 6, 30, 40]], float)
    before = voc.copy()
    xyxy = B.voc_to_xyxy(voc)
    np.testing.assert_array_equal(xyxy, [[0, 0, 10, 20], [4, 5, 30, 40]])
    np.testing.assert_array_equal(B.xyxy_to_voc(xyxy), voc)
    np.testing.assert_array_equal(voc, before)
    # VOC's pixel-inclusive width (xmax - xmin + 1) is the continuous width.
    np.testing.assert_array_equal(B.area(xyxy), (voc[:, 2] - voc[:, 0] + 1) * (voc[:, 3] - voc[:, 1] + 1))
    xywh = np.array([[1.5, 2, 10, 20]])
    np.testing.assert_allclose(B.xyxy_to_xywh(B.xywh_to_xyxy(xywh)), xywh)
    np.testing.assert_allclose(B.denormalize(B.normalize(xyxy, 64, 48), 64, 48), xyxy, rtol=1e-6)
    np.testing.assert_allclose(B.normalize([[0, 0, 64, 48]], 64, 48), [[0, 0, 1, 1]])


def test_clip_area_validity():
    b = np.array([[-5, -5, 10, 10], [50, 40, 80, 60], [3, 3, 3, 9], [0, 0, np.nan, 1]], np.float32)
    np.testing.assert_array_equal(B.clip(b[:2], 64, 48), [[0, 0, 10, 10], [50, 40, 64, 48]])
    assert B.is_valid(b).tolist() == [True, True, False, False]
    assert B.is_valid(b[:2], min_size=15).tolist() == [False, True]
    np.testing.assert_array_equal(B.area([[0, 0, 2, 3], [5, 5, 4, 9]]), [6, 0])
    with pytest.raises(ValueError, match=r"shape \[N, 4\]"):
        B.as_boxes([[1, 2, 3]])
