"""Selective search (Uijlings et al. 2013) as R-CNN ran it, from OpenCV's ``ximgproc`` building blocks.

Modes (every value can be overridden by its own ``proposals.ss.*`` key):

=============  ======================  ================  =================================  ========
mode           colour spaces           Felzenszwalb k    strategies                         min side
=============  ======================  ================  =================================  ========
rcnn_fast      HSV, Lab                50, 100           colour+texture+size+fill, t+s+f    20 px
quality        HSV, Lab, rgI, H, I     50, 100, 150, 300 ctsf, tsf, fill, size              20 px
googlenet      HSV, Lab                100, 200          ctsf, tsf                          20 px
opencv_fast    OpenCV's ``switchToSelectiveSearchFast()`` as is (k 150/300/450, min segment 100)
=============  ======================  ================  =================================  ========

Felzenszwalb's sigma is 0.8 and its minimum segment size equals k (R-CNN).

Order. OpenCV ranks regions by ``hierarchy level x rand()`` with level 1 for the initial segments, so
its order starts with the smallest regions (Uijlings et al. count the other way, from the whole image
down): a top-N cap of OpenCV's order keeps mostly tiny boxes. ``order="shuffle"`` (the default) puts
the boxes in a random order instead, so a cap keeps a sample of every size; on coco128 val the best
150 boxes of the GoogLeNet variant recall 43% of the objects shuffled against 31% in OpenCV's order
(BENCHMARKS.md). Both are seeded per image, so the order, and any cap, is the same in every run and in
any worker. The shuffle starts from the boxes sorted by their coordinates: OpenCV's own order comes from
the C library's ``rand``, seeded here, but a process whose other threads call ``rand`` too (a Ray worker's
do) gets another order; ``order="opencv"`` is therefore reproducible in this project's worker processes,
not always under Ray.
"""

from __future__ import annotations

import ctypes
import time
import zlib

import cv2
import numpy as np

from rcnn import boxes as B
from rcnn.ss_settings import MODES, SSParams, resolve_params

__all__ = [
    "SSParams",
    "MODES",
    "resolve_params",
    "selective_search",
    "unique_boxes",
    "merge_near_duplicates",
    "rects_to_boxes",
]


def _segmentation():
    """OpenCV's ``ximgproc.segmentation`` module (the contrib build); a clear error without it."""
    if not hasattr(cv2, "ximgproc"):
        raise ImportError(
            f"selective search needs OpenCV's contrib build (cv2.ximgproc); this cv2 ({cv2.__version__}) lacks it: "
            "pip uninstall opencv-python opencv-python-headless; pip install opencv-contrib-python-headless "
            "(or use proposals.method=multibox, or proposals.ss.backend=selectivesearch)"
        )
    return cv2.ximgproc.segmentation

_STRATEGY_PARTS = {  # a letter of a strategy -> OpenCV's maker of that similarity
    "c": "createSelectiveSearchSegmentationStrategyColor",
    "t": "createSelectiveSearchSegmentationStrategyTexture",
    "s": "createSelectiveSearchSegmentationStrategySize",
    "f": "createSelectiveSearchSegmentationStrategyFill",
}


_libc = ctypes.CDLL(None)


def _seed_c_rand(seed: int) -> None:
    _libc.srand(ctypes.c_uint(seed & 0xFFFFFFFF))


def image_seed(seed: int, image_id) -> int:
    return zlib.crc32(f"{seed}:{image_id}".encode())


def _convert(bgr: np.ndarray, space: str) -> np.ndarray:
    if space == "hsv":
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2HSV)
    if space == "lab":
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2Lab)
    if space == "h":
        return np.ascontiguousarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2HSV)[:, :, 0])
    gray = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
    if space == "i":
        return gray
    return cv2.merge([bgr[:, :, 2], bgr[:, :, 1], gray])  # rgI: red, green, intensity


def rects_to_boxes(rects: np.ndarray) -> np.ndarray:
    """Integer ``(x, y, w, h)`` pixel rects -> continuous ``xyxy`` float32."""
    r = np.asarray(rects, dtype=np.float32).reshape(-1, 4)
    return np.concatenate([r[:, :2], r[:, :2] + r[:, 2:]], axis=1)


def unique_boxes(boxes: np.ndarray) -> np.ndarray:
    """Indices of the first occurrence of every distinct box, in their original order."""
    if len(boxes) == 0:
        return np.zeros(0, dtype=np.int64)
    _, first = np.unique(np.ascontiguousarray(boxes), axis=0, return_index=True)
    return np.sort(first)


def _opencv(bgr: np.ndarray, p: SSParams) -> np.ndarray:
    seg = _segmentation()
    ss = seg.createSelectiveSearchSegmentation()
    ss.setBaseImage(bgr)
    if p.mode == "opencv_fast":
        ss.switchToSelectiveSearchFast()
    else:
        ss.clearImages()
        ss.clearGraphSegmentations()
        ss.clearStrategies()
        for space in p.color_spaces:
            ss.addImage(_convert(bgr, space))
        for k in p.ks:
            min_size = k if p.min_segment_size is None else p.min_segment_size
            ss.addGraphSegmentation(seg.createGraphSegmentation(p.sigma, float(k), int(min_size)))
        for s in p.strategies:
            parts = [getattr(seg, _STRATEGY_PARTS[c])() for c in s]
            ss.addStrategy(parts[0] if len(parts) == 1 else seg.createSelectiveSearchSegmentationStrategyMultiple(*parts))
    return rects_to_boxes(ss.process())


def _package(rgb: np.ndarray, p: SSParams) -> np.ndarray:
    """The ``selectivesearch`` package (HSV + all four similarities, fixed): one run per k, in order."""
    import warnings

    import selectivesearch

    out = []
    for k in p.ks:
        min_size = k if p.min_segment_size is None else p.min_segment_size
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # skimage's warning about LBP on float images
            _, regions = selectivesearch.selective_search(rgb, scale=k, sigma=p.sigma, min_size=min_size)
        out.append(rects_to_boxes([r["rect"] for r in regions]))
    return np.concatenate(out) if out else np.zeros((0, 4), np.float32)


def selective_search(rgb: np.ndarray, p: SSParams, seed: int = 0) -> tuple[np.ndarray, float]:
    """Boxes of one RGB uint8 image, in ``p.order``.

    Returns ``(boxes float32 [N, 4] xyxy in the image's pixels, seconds)``: resized first when
    ``p.resize_width`` is set (or shrunk when its longer side passes ``p.max_side``), boxes with a side <
    ``p.min_box_side`` at that scale dropped (as R-CNN), the rest mapped back, duplicates removed, put in
    ``p.order`` (seeded by ``seed``), then near-duplicates dropped in that order when ``p.merge_iou`` is set.
    """
    start = time.perf_counter()
    h, w = rgb.shape[:2]
    scale = 1.0
    if p.resize_width and w != p.resize_width:
        scale = p.resize_width / w
    elif p.max_side and max(h, w) > p.max_side:
        scale = p.max_side / max(h, w)
    if scale != 1.0:
        interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
        rgb = cv2.resize(rgb, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=interp)
    _seed_c_rand(seed)
    if p.backend == "opencv":
        boxes = _opencv(np.ascontiguousarray(rgb[:, :, ::-1]), p)
    else:
        boxes = _package(rgb, p)
    side = np.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
    boxes = boxes[side >= max(p.min_box_side, 1e-6)]  # at the scale the search ran (selective_search_boxes.m)
    if scale != 1.0:
        boxes = B.clip(boxes / scale, w, h)
    boxes = boxes[unique_boxes(boxes)]
    if p.order == "shuffle":  # from a canonical order: OpenCV's depends on rand(), which other threads can call
        boxes = boxes[np.lexsort(boxes.T[::-1])]
        boxes = boxes[np.random.default_rng(seed).permutation(len(boxes))]
    if p.merge_iou is not None and len(boxes):
        boxes = boxes[merge_near_duplicates(boxes, p.merge_iou)]
    return boxes.astype(np.float32), time.perf_counter() - start


def merge_near_duplicates(boxes: np.ndarray, iou: float) -> np.ndarray:
    """Indices kept, in order, when every box whose IoU with an earlier kept box is above ``iou`` is
    dropped (greedy NMS with the position as the score)."""
    rank_score = -np.arange(len(boxes), dtype=np.float32)
    return np.sort(B.nms(boxes, rank_score, iou))
