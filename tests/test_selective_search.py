import cv2
import numpy as np
import pytest

from proposals.selective_search import (
    _seed_c_rand,
    rects_to_boxes,
    resolve_params,
    selective_search,
    unique_boxes,
)
from rcnn.config import load_config


def params(*overrides):
    return resolve_params(load_config([f"proposals.ss.{o}" for o in overrides]).proposals.ss)


def blobs(width=160, height=120, seed=0):
    """Coloured rectangles and small dots on a gradient: objects of several sizes."""
    rng = np.random.default_rng(seed)
    img = np.zeros((height, width, 3), np.uint8)
    img[:] = np.linspace(40, 200, width, dtype=np.uint8)[None, :, None]
    for _ in range(6):
        x, y = rng.integers(0, width - 40), rng.integers(0, height - 30)
        w, h = rng.integers(20, 60), rng.integers(15, 50)
        cv2.rectangle(img, (int(x), int(y)), (int(x + w), int(y + h)), tuple(int(c) for c in rng.integers(0, 256, 3)), -1)
    for _ in range(10):
        c = tuple(int(v) for v in rng.integers(0, [width, height]))
        cv2.circle(img, c, int(rng.integers(2, 6)), tuple(int(v) for v in rng.integers(0, 256, 3)), -1)
    return img


def test_modes_resolve_to_the_reference_settings():
    p = params("mode=rcnn_fast")
    assert (p.color_spaces, p.ks, p.sigma, p.strategies, p.min_box_side) == (
        ("hsv", "lab"), (50, 100), 0.8, ("ctsf", "tsf"), 20,
    )  # fmt: skip
    assert p.min_segment_size is None  # = k, as in R-CNN
    assert params("mode=googlenet").ks == (100, 200)
    q = params("mode=quality")
    assert q.color_spaces == ("hsv", "lab", "rgi", "h", "i") and q.ks == (50, 100, 150, 300)
    assert q.strategies == ("ctsf", "tsf", "f", "s")
    o = params("mode=rcnn_fast", "ks=[30]", "sigma=0.5", "strategies=[cs]", "min_box_side=10", "resize_width=500")
    assert (o.ks, o.sigma, o.strategies, o.min_box_side, o.resize_width) == ((30,), 0.5, ("cs",), 10, 500)


def test_bad_settings_are_config_errors():
    from rcnn.config import ConfigError

    with pytest.raises(ConfigError, match="opencv_fast runs OpenCV's own"):
        load_config(["proposals.ss.mode=opencv_fast", "proposals.ss.ks=[50]"])
    with pytest.raises(ConfigError, match="unknown colour space"):
        load_config(["proposals.ss.color_spaces=[xyz]"])
    with pytest.raises(ConfigError, match="letters of c"):
        load_config(["proposals.ss.strategies=[ctq]"])


def test_rects_and_dedupe():
    np.testing.assert_array_equal(rects_to_boxes([[1, 2, 3, 4]]), [[1, 2, 4, 6]])
    b = np.array([[0, 0, 5, 5], [1, 1, 5, 5], [0, 0, 5, 5], [2, 2, 9, 9], [1, 1, 5, 5]], np.float32)
    assert unique_boxes(b).tolist() == [0, 1, 3]
    assert unique_boxes(np.zeros((0, 4))).tolist() == []


def test_min_box_side_filter():
    img = blobs()
    kept, _ = selective_search(img, params("mode=rcnn_fast"))
    side = np.minimum(kept[:, 2] - kept[:, 0], kept[:, 3] - kept[:, 1])
    assert len(kept) and side.min() >= 20
    everything, _ = selective_search(img, params("mode=rcnn_fast", "min_box_side=0"))
    all_side = np.minimum(everything[:, 2] - everything[:, 0], everything[:, 3] - everything[:, 1])
    assert (all_side < 20).any()  # the filter really removed something
    assert {tuple(b) for b in kept} == {tuple(b) for b, s in zip(everything, all_side) if s >= 20}


def test_no_duplicates_and_deterministic_ranking():
    img = blobs(seed=1)
    p = params("mode=rcnn_fast")
    a, _ = selective_search(img, p, seed=3)
    selective_search(blobs(seed=2), p, seed=9)  # another image in between, as in a worker
    b, _ = selective_search(img, p, seed=3)
    assert len(np.unique(a, axis=0)) == len(a)
    np.testing.assert_array_equal(a, b)


def test_shuffled_order_is_a_seeded_permutation_of_opencvs():
    img = blobs(seed=6)
    ranked, _ = selective_search(img, params("mode=rcnn_fast", "min_box_side=0", "order=opencv"), seed=2)
    shuffled, _ = selective_search(img, params("mode=rcnn_fast", "min_box_side=0", "order=shuffle"), seed=2)
    again, _ = selective_search(img, params("mode=rcnn_fast", "min_box_side=0", "order=shuffle"), seed=2)
    other, _ = selective_search(img, params("mode=rcnn_fast", "min_box_side=0", "order=shuffle"), seed=5)
    key = lambda b: sorted(map(tuple, b.tolist()))
    assert len(ranked) > 50 and key(shuffled) == key(ranked)
    np.testing.assert_array_equal(shuffled, again)
    assert not np.array_equal(shuffled, ranked) and not np.array_equal(shuffled, other)
    # OpenCV's rank starts with the initial (smallest) segments: why a cap of its order keeps tiny boxes
    area = lambda b: (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    tenth = len(ranked) // 10
    assert area(ranked[:tenth]).mean() < area(ranked[-tenth:]).mean()


def searched_at_half_size(img: np.ndarray) -> np.ndarray:
    """Selective search's boxes (``rcnn_fast``, every size) of ``img`` shrunk to half by area averaging, mapped back
    and clipped: what a search that shrinks the image first must return."""
    h, w = img.shape[:2]
    small = cv2.resize(img, (w // 2, h // 2), interpolation=cv2.INTER_AREA)
    direct, _ = selective_search(small, params("mode=rcnn_fast", "min_box_side=0"), seed=4)
    return np.minimum(direct * 2, [w, h, w, h])


def test_boxes_are_mapped_back_after_resize():
    img = blobs(200, 150)
    mapped, _ = selective_search(img, params("mode=rcnn_fast", "min_box_side=0", "resize_width=100"), seed=4)
    np.testing.assert_allclose(mapped, searched_at_half_size(img), atol=1e-4)
    assert mapped[:, 2].max() <= 200 and mapped[:, 3].max() <= 150 and mapped.min() >= 0


def test_max_side_shrinks_only_the_larger_images():
    img = blobs(200, 150)
    tall = np.ascontiguousarray(img.transpose(1, 0, 2))  # 150x200: shrunk by its height
    p = params("mode=rcnn_fast", "min_box_side=0", "max_side=100")
    for image in (img, tall):
        np.testing.assert_allclose(selective_search(image, p, seed=4)[0], searched_at_half_size(image), atol=1e-4)
    within, _ = selective_search(img, params("mode=rcnn_fast", "min_box_side=0", "max_side=200"), seed=4)
    full, _ = selective_search(img, params("mode=rcnn_fast", "min_box_side=0"), seed=4)
    np.testing.assert_array_equal(within, full)  # never enlarged, untouched at the limit
    with pytest.raises(ValueError, match="resize_width .* or max_side"):
        params("resize_width=100", "max_side=100")


def test_small_boxes_are_dropped_at_the_resized_scale_as_rcnn():
    """Issue #13: selective_search_boxes.m drops boxes under 20 px where the search ran (resized)."""
    img = blobs(200, 150)
    mapped, _ = selective_search(img, params("mode=rcnn_fast", "resize_width=100"), seed=4)
    small = cv2.resize(img, (100, 75), interpolation=cv2.INTER_AREA)
    direct, _ = selective_search(small, params("mode=rcnn_fast"), seed=4)  # min_box_side 20 at 100 px
    np.testing.assert_allclose(mapped, np.minimum(direct * 2, [200, 150, 200, 150]), atol=1e-4)
    side = np.minimum(direct[:, 2] - direct[:, 0], direct[:, 3] - direct[:, 1])
    assert side.min() >= 20 and len(mapped)


def test_opencv_fast_mode_is_opencvs_own():
    img = blobs(seed=5)
    ours, _ = selective_search(img, params("mode=opencv_fast", "order=opencv"), seed=7)
    ss = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
    ss.setBaseImage(np.ascontiguousarray(img[:, :, ::-1]))
    ss.switchToSelectiveSearchFast()
    _seed_c_rand(7)
    np.testing.assert_array_equal(ours, rects_to_boxes(ss.process()))


def test_selectivesearch_package_backend():
    img = blobs(120, 90)
    boxes, seconds = selective_search(img, params("backend=selectivesearch", "mode=rcnn_fast"))
    assert len(boxes) > 0 and seconds > 0
    assert boxes[:, 2].max() <= 120 and boxes[:, 3].max() <= 90
    assert np.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]).min() >= 20


def test_near_duplicates_merged_in_rank_order():
    from proposals.selective_search import merge_near_duplicates

    b = np.array([[0, 0, 10, 10], [20, 20, 30, 30], [0, 0, 10, 9], [0, 0, 10, 5], [21, 20, 30, 30]], np.float32)
    # IoU with box 0: box 2 is 0.9, box 3 is 0.5; box 4 with box 1 is 0.9.
    assert merge_near_duplicates(b, 0.85).tolist() == [0, 1, 3]
    assert merge_near_duplicates(b, 0.95).tolist() == [0, 1, 2, 3, 4]
    img = blobs(seed=3)
    plain, _ = selective_search(img, params("mode=rcnn_fast"), seed=1)
    merged, _ = selective_search(img, params("mode=rcnn_fast", "merge_iou=0.7"), seed=1)
    assert 0 < len(merged) < len(plain)
    assert {tuple(x) for x in merged} <= {tuple(x) for x in plain}
    from rcnn import boxes as B

    iou = B.iou(merged, merged)
    assert (iou[np.triu_indices(len(merged), 1)] <= 0.7 + 1e-6).all()


def test_without_opencv_contrib_the_error_says_what_to_install(monkeypatch):
    import cv2

    monkeypatch.delattr(cv2, "ximgproc")
    with pytest.raises(ImportError, match="opencv-contrib-python-headless"):
        selective_search(np.zeros((32, 32, 3), np.uint8), params())
