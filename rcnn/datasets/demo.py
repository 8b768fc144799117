"""The synthetic demo dataset: coloured shapes of five classes on cluttered backgrounds, VOC layout.

Each image is drawn from its own generator seeded by ``(seed, split, index)``, so the dataset is
the same on every machine and any image can be redrawn alone. Objects vary in size, aspect and
colour, may overlap (IoU <= 0.3) and occlude each other; an object less than half visible is
flagged ``difficult``. By default (``class_colours``) each class has its own band of hues (36 degrees of
OpenCV's 180 apart, +-6): a detector on the features of a random, untrained GoogLeNet can learn that in
minutes on a CPU, where shape alone needs ImageNet weights or long fine-tuning. Boxes are the visible extent, written as VOC 1-based inclusive corners.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import cv2
import numpy as np

from .. import boxes as B
from ..store import temporary_path, write_json
from .voc import load_voc

__all__ = ["CLASSES", "GENERATOR_VERSION", "ensure_demo", "load_demo", "draw_image"]

log = logging.getLogger("rcnn.datasets")

CLASSES = ("ellipse", "rectangle", "triangle", "cross", "star")
GENERATOR_VERSION = 2  # 2: class_colours
_SPLITS = ("train", "test")


def _params(cfg) -> dict:
    keys = ("seed", "train_images", "test_images", "width", "height", "max_objects", "min_size", "max_size",
            "class_colours")  # fmt: skip
    return {"generator_version": GENERATOR_VERSION, **{k: int(cfg[k]) for k in keys}}


def _background(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """Gradient + noise + clutter (thin lines and small blobs, smaller than any object)."""
    c0, c1 = rng.uniform(40, 215, size=(2, 3))
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:h, 0:w]
    t = (np.cos(angle) * xx / w + np.sin(angle) * yy / h + 1) / 2
    img = c0 * (1 - t[..., None]) + c1 * t[..., None]
    img += rng.normal(0, 10, size=img.shape)
    img = np.clip(img, 0, 255).astype(np.uint8)
    for _ in range(rng.integers(10, 25)):
        p, q = rng.integers(0, [w, h]), rng.integers(0, [w, h])
        color = tuple(int(v) for v in rng.integers(0, 256, 3))
        cv2.line(img, tuple(int(v) for v in p), tuple(int(v) for v in q), color, int(rng.integers(1, 3)), cv2.LINE_AA)
    for _ in range(rng.integers(10, 30)):
        c = tuple(int(v) for v in rng.integers(0, [w, h]))
        color = tuple(int(v) for v in rng.integers(0, 256, 3))
        cv2.circle(img, c, int(rng.integers(2, 7)), color, -1, cv2.LINE_AA)
    return img


def _shape_polygon(kind: str, x: float, y: float, w: float, h: float, rng: np.random.Generator) -> np.ndarray:
    """Polygon (float [K, 2]) of a triangle, cross or star filling the box (x, y, w, h)."""
    if kind == "triangle":
        pts = {
            0: [(0.5, 0), (1, 1), (0, 1)],  # apex up
            1: [(0, 0), (1, 0), (0.5, 1)],  # apex down
            2: [(0, 0), (1, 0.5), (0, 1)],  # apex right
            3: [(1, 0), (1, 1), (0, 0.5)],  # apex left
        }[int(rng.integers(4))]
    elif kind == "cross":
        a, b = 0.35, 0.65
        pts = [(a, 0), (b, 0), (b, a), (1, a), (1, b), (b, b), (b, 1), (a, 1), (a, b), (0, b), (0, a), (a, a)]
    else:  # star: 5 points, inner radius 0.45
        ang = -np.pi / 2 + np.arange(10) * np.pi / 5
        r = np.where(np.arange(10) % 2 == 0, 0.5, 0.5 * 0.45)
        px, py = 0.5 + r * np.cos(ang), 0.5 + r * np.sin(ang)
        px = (px - px.min()) / (px.max() - px.min())
        py = (py - py.min()) / (py.max() - py.min())
        pts = list(zip(px, py))
    p = np.array(pts, dtype=np.float64)
    return np.stack([x + p[:, 0] * (w - 1), y + p[:, 1] * (h - 1)], axis=1)


def _draw(mask: np.ndarray, kind: str, x: float, y: float, w: float, h: float, rng) -> None:
    if kind == "ellipse":
        center = (int(round(x + (w - 1) / 2)), int(round(y + (h - 1) / 2)))
        cv2.ellipse(mask, center, (int((w - 1) / 2), int((h - 1) / 2)), 0, 0, 360, 255, -1)
    elif kind == "rectangle":
        cv2.rectangle(mask, (int(x), int(y)), (int(x + w - 1), int(y + h - 1)), 255, -1)
    else:
        cv2.fillPoly(mask, [np.round(_shape_polygon(kind, x, y, w, h, rng)).astype(np.int32)], 255)


def draw_image(params: dict, split: str, index: int) -> tuple[np.ndarray, list[dict]]:
    """One demo image (RGB uint8) and its objects: ``{"name", "box" (continuous xyxy), "difficult"}``."""
    rng = np.random.default_rng([params["seed"], _SPLITS.index(split), index])
    w, h = params["width"], params["height"]
    img = _background(rng, w, h)
    placed, masks, kinds = [], [], []
    for _ in range(int(rng.integers(1, params["max_objects"] + 1))):
        kind = CLASSES[int(rng.integers(len(CLASSES)))]
        for _attempt in range(20):
            size = np.exp(rng.uniform(np.log(params["min_size"]), np.log(min(params["max_size"], w, h))))
            aspect = np.exp(rng.uniform(np.log(0.5), np.log(2.0))) if kind in ("ellipse", "rectangle") else 1.0
            bw, bh = min(size * np.sqrt(aspect), w), min(size / np.sqrt(aspect), h)
            bx, by = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
            box = np.array([[bx, by, bx + bw, by + bh]])
            if not placed or B.iou(box, np.array(placed)).max() <= 0.3:
                break
        else:
            continue
        mask = np.zeros((h, w), np.uint8)
        _draw(mask, kind, bx, by, bw, bh, rng)
        hue = int(rng.integers(0, 180))
        if params.get("class_colours"):
            hue = (CLASSES.index(kind) * 36 + hue % 13 - 6) % 180
        hsv = np.uint8([[[hue, rng.integers(120, 256), rng.integers(110, 256)]]])
        color = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0]
        img[mask > 0] = color
        if rng.random() < 0.5:  # a darker outline on some objects
            contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
            cv2.drawContours(img, contours, -1, tuple(int(v * 0.5) for v in color), 2)
        placed.append(box[0])
        masks.append(mask > 0)
        kinds.append(kind)
    objects = []
    for k, (kind, mask) in enumerate(zip(kinds, masks)):
        visible = mask.copy()
        for later in masks[k + 1 :]:
            visible &= ~later
        if not visible.any():
            continue
        rows, cols = np.nonzero(visible)
        box = [float(cols.min()), float(rows.min()), float(cols.max() + 1), float(rows.max() + 1)]
        objects.append({"name": kind, "box": box, "difficult": bool(visible.sum() < 0.5 * mask.sum())})
    return img, objects


def _voc_xml(filename: str, w: int, h: int, objects: list[dict]) -> str:
    parts = [
        "<annotation>",
        "  <folder>demo</folder>",
        f"  <filename>{filename}</filename>",
        f"  <size><width>{w}</width><height>{h}</height><depth>3</depth></size>",
    ]
    for o in objects:
        xmin, ymin, xmax, ymax = (int(round(v)) for v in B.xyxy_to_voc([o["box"]])[0])
        parts += [
            "  <object>",
            f"    <name>{o['name']}</name>",
            "    <truncated>0</truncated>",
            f"    <difficult>{int(o['difficult'])}</difficult>",
            f"    <bndbox><xmin>{xmin}</xmin><ymin>{ymin}</ymin><xmax>{xmax}</xmax><ymax>{ymax}</ymax></bndbox>",
            "  </object>",
        ]
    parts.append("</annotation>")
    return "\n".join(parts) + "\n"


def _generate(root: Path, params: dict) -> None:
    (root / "JPEGImages").mkdir(parents=True)
    (root / "Annotations").mkdir()
    (root / "ImageSets" / "Main").mkdir(parents=True)
    for split in _SPLITS:
        ids = []
        for i in range(params[f"{split}_images"]):
            image_id = f"{split}_{i:04d}"
            img, objects = draw_image(params, split, i)
            cv2.imwrite(str(root / "JPEGImages" / f"{image_id}.jpg"), img[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 92])
            (root / "Annotations" / f"{image_id}.xml").write_text(
                _voc_xml(f"{image_id}.jpg", params["width"], params["height"], objects)
            )
            ids.append(image_id)
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    write_json(root / "demo.json", params)


def ensure_demo(cfg) -> Path:
    """Generate the demo into ``cfg.root`` unless it is there with the same settings.

    A folder made with other settings is replaced (it is generated data); generation happens in a
    temporary folder that is renamed into place, so an interrupted run leaves no half dataset.
    """
    root = Path(cfg.root)
    params = _params(cfg)
    stamp = root / "demo.json"
    if stamp.exists():
        try:
            if json.loads(stamp.read_text()) == params:
                return root
        except (OSError, json.JSONDecodeError):
            pass
        log.info("%s was generated with other settings; generating it again", root)
    elif root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root} exists and is not a demo dataset folder; set dataset.root elsewhere")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(root)
    shutil.rmtree(tmp, ignore_errors=True)
    log.info("generating the demo dataset in %s", root)
    _generate(tmp, params)
    if root.exists():
        old = temporary_path(root).with_suffix(".old")
        os.replace(root, old)
        os.replace(tmp, root)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, root)
    return root


def load_demo(cfg, hint: str = ""):
    """Generate (if needed) and load the demo as a VOC dataset with the fixed class list."""
    ensure_demo(cfg)
    from omegaconf import OmegaConf

    voc_cfg = OmegaConf.create(
        {
            "name": cfg.name,
            "root": cfg.root,
            "train_split": cfg.train_split,
            "test_split": cfg.test_split,
            "classes": list(cfg.classes) if cfg.classes else list(CLASSES),
            "limit": cfg.limit,
            "image_ext": ".jpg",
        }
    )
    return load_voc(voc_cfg)
