"""Tiny fake datasets written in their raw on-disk layouts (VOC, COCO, ILSVRC DET)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image


def write_image(path: Path, width: int = 64, height: int = 48, mode: str = "RGB", seed: int = 0) -> Path:
    """A random image of the given PIL mode (RGB, L, CMYK, P, RGBA, I;16) at ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rgb = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    im = Image.fromarray(rgb)
    if mode == "I;16":
        im = Image.fromarray((rng.integers(0, 65536, size=(height, width))).astype(np.uint16))
    elif mode != "RGB":
        im = im.convert(mode)
    fmt = "PNG" if mode in ("P", "RGBA", "I;16") else "JPEG"
    im.save(path, format=fmt)
    return path


def voc_xml(filename: str, width: int | None, height: int | None, objects: list[tuple]) -> str:
    """objects: (name, xmin, ymin, xmax, ymax[, difficult]) in VOC 1-based inclusive corners."""
    size = f"<size><width>{width}</width><height>{height}</height><depth>3</depth></size>" if width else ""
    objs = []
    for o in objects:
        name, x1, y1, x2, y2 = o[:5]
        diff = o[5] if len(o) > 5 else 0
        objs.append(
            f"<object><name>{name}</name><difficult>{diff}</difficult>"
            f"<bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>"
        )
    return f"<annotation><filename>{filename}</filename>{size}{''.join(objs)}</annotation>"


# Two splits, three images; boxes in VOC 1-based inclusive corners.
VOC_IMAGES = {
    "img1": [("cat", 1, 1, 10, 20), ("dog", 5, 6, 30, 40, 1)],
    "img2": [("dog", 11, 11, 64, 48)],
    "img3": [],
}
VOC_SPLITS = {"trainval": ["img1", "img2"], "test": ["img3", "img1"]}


def write_voc(root: Path, images=None, splits=None, width: int = 64, height: int = 48) -> Path:
    images = VOC_IMAGES if images is None else images
    splits = VOC_SPLITS if splits is None else splits
    (root / "Annotations").mkdir(parents=True, exist_ok=True)
    (root / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
    for k, (image_id, objects) in enumerate(images.items()):
        write_image(root / "JPEGImages" / f"{image_id}.jpg", width, height, seed=k)
        (root / "Annotations" / f"{image_id}.xml").write_text(voc_xml(f"{image_id}.jpg", width, height, objects))
    for split, ids in splits.items():
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return root


COCO_CATEGORIES = [{"id": 3, "name": "car", "supercategory": "vehicle"}, {"id": 1, "name": "person"},
                   {"id": 18, "name": "dog", "supercategory": "animal"}]


def coco_json(images: list[dict], annotations: list[dict], categories=None) -> dict:
    return {"images": images, "annotations": annotations, "categories": categories or COCO_CATEGORIES}


def write_coco(root: Path) -> dict:
    """Train split: 2 images (one crowd box); test split: 1 image. Returns the paths as config keys."""
    train = coco_json(
        [
            {"id": 7, "file_name": "a.jpg", "width": 64, "height": 48},
            {"id": 9, "file_name": "b.jpg", "width": 64, "height": 48},
        ],
        [
            {"id": 1, "image_id": 7, "category_id": 3, "bbox": [1.5, 2.0, 10.0, 20.0], "iscrowd": 0, "area": 200},
            {"id": 2, "image_id": 7, "category_id": 18, "bbox": [0, 0, 64, 48], "iscrowd": 1, "area": 3072},
            {"id": 3, "image_id": 9, "category_id": 1, "bbox": [30, 10, 5, 5], "iscrowd": 0, "area": 25},
        ],
    )
    test = coco_json(
        [{"id": 11, "file_name": "c.jpg", "width": 64, "height": 48}],
        [{"id": 1, "image_id": 11, "category_id": 1, "bbox": [3, 4, 20, 10], "iscrowd": 0, "area": 200}],
    )
    for name, data, folder in (("train.json", train, "train"), ("test.json", test, "test")):
        (root / name).write_text(json.dumps(data))
        for k, im in enumerate(data["images"]):
            write_image(root / folder / im["file_name"], im["width"], im["height"], seed=k)
    return {
        "train_json": str(root / "train.json"),
        "train_images": str(root / "train"),
        "test_json": str(root / "test.json"),
        "test_images": str(root / "test"),
    }


def write_ilsvrc(root: Path) -> Path:
    """ILSVRC 2015 layout: val split of 3 images with synset names, a synset map and a blacklist."""
    ann = root / "Annotations" / "DET"
    data = root / "Data" / "DET"
    images = {
        "train": {"tr/x_1": [("n01443537", 1, 1, 20, 20)]},
        "val": {
            "ILSVRC2013_val_00000001": [("n01443537", 5, 5, 40, 30)],
            "ILSVRC2013_val_00000002": [("n02084071", 1, 1, 8, 8), ("n01443537", 10, 10, 50, 40)],
            "ILSVRC2013_val_00000003": [],
        },
    }
    for split, imgs in images.items():
        lines = []
        for k, (image_id, objects) in enumerate(imgs.items()):
            (ann / split / image_id).parent.mkdir(parents=True, exist_ok=True)
            (ann / split / f"{image_id}.xml").write_text(voc_xml(image_id, 64, 48, objects))
            write_image(data / split / f"{image_id}.JPEG", seed=k)
            lines.append(f"{image_id} {k + 1}")
        (root / "ImageSets" / "DET").mkdir(parents=True, exist_ok=True)
        (root / "ImageSets" / "DET" / f"{split}.txt").write_text("\n".join(lines) + "\n")
    (root / "devkit" / "data").mkdir(parents=True)
    (root / "devkit" / "data" / "map_det.txt").write_text(
        "n02084071 1 dog\nn01443537 2 goldfish\nn09999999 3 unused class\n"
    )
    (root / "devkit" / "data" / "ILSVRC2015_det_validation_blacklist.txt").write_text("2 n02084071\n")
    return root
