"""COCO instances JSON: one file and one image folder per split."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import numpy as np

from .. import boxes as B
from .base import (
    HOLDOUT,
    Annotation,
    BoxReport,
    DatasetError,
    DetectionDataset,
    ImageRecord,
    check_boxes,
    held_out,
    log_box_report,
    read_json,
)

__all__ = ["load_coco", "read_coco_json"]

log = logging.getLogger("rcnn.datasets")


def read_coco_json(path: str | Path, hint: str = "") -> dict:
    """Read an instances file and check its top-level layout."""
    path = Path(path)
    data = read_json(path, "COCO annotation file", hint)
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: expected a JSON object with images, annotations and categories")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DatasetError(f"{path}: missing or non-list '{key}'")
    return data


def _categories(data: dict, path: Path) -> dict[int, str]:
    cats = {}
    for c in data["categories"]:
        try:
            cats[int(c["id"])] = str(c["name"])
        except (KeyError, TypeError, ValueError):
            raise DatasetError(f"{path}: malformed category {c!r} (needs 'id' and 'name')") from None
    return cats


def _split(
    data: dict,
    path: Path,
    images_dir: Path,
    cats: dict[int, str],
    label_of: dict[int, int],
    report: BoxReport,
    limit: int | None,
) -> tuple[list[ImageRecord], list[int]]:
    """Records of one split's images (the first ``limit``), in the file's order."""
    images = {}
    for im in data["images"]:
        try:
            image_id, file_name = int(im["id"]), _file_name(im)
            width, height = int(im["width"]), int(im["height"])
        except (KeyError, TypeError, ValueError):
            raise DatasetError(f"{path}: malformed image entry {im!r} (needs id, file_name, width, height)") from None
        if image_id in images:
            raise DatasetError(f"{path}: image id {image_id} appears twice")
        images[image_id] = (file_name, width, height)
    order = list(images)[:limit] if limit else list(images)
    wanted = set(order)

    per_image: dict[int, list] = {i: [] for i in order}
    for ann in data["annotations"]:
        aid = ann.get("id", "?")
        image_id = ann.get("image_id")
        if image_id not in images:
            raise DatasetError(f"{path}: annotation {aid} refers to image {image_id!r}, which is not in 'images'")
        if image_id not in wanted:
            continue
        cat = ann.get("category_id")
        if cat not in cats:
            raise DatasetError(f"{path}: annotation {aid} (image {image_id}) has unknown category_id {cat!r}")
        bbox = ann.get("bbox")
        if not (isinstance(bbox, (list, tuple)) and len(bbox) == 4):
            raise DatasetError(f"{path}: annotation {aid} (image {image_id}) has bbox {bbox!r}, not [x, y, w, h]")
        if cat in label_of:  # categories left out of dataset.classes are skipped
            area = ann.get("area")
            area = float(area) if isinstance(area, (int, float)) and not isinstance(area, bool) else None
            per_image[image_id].append((aid, bbox, label_of[cat], bool(ann.get("iscrowd", 0)), area))

    records = []
    for image_id in order:
        file_name, width, height = images[image_id]
        anns = per_image[image_id]
        where = f"{path}: image {image_id} ({file_name})"
        try:
            xywh = np.array([a[1] for a in anns], dtype=np.float64).reshape(-1, 4)
        except (TypeError, ValueError):
            raise DatasetError(f"{where}: a bbox holds a value that is not a number") from None
        boxes = B.xywh_to_xyxy(xywh)
        keep = check_boxes(boxes, width, height, where, report, [f"annotation {a[0]}" for a in anns])
        crowd = np.array([a[3] for a in anns], dtype=bool)[keep]
        # COCO's own area (the segmentation's), as its evaluation buckets objects by size; else w * h as given
        area = np.array([a[4] if a[4] is not None else xywh[k, 2] * xywh[k, 3] for k, a in enumerate(anns)], np.float64)
        ann = Annotation(
            boxes=boxes[keep],
            labels=np.array([a[2] for a in anns], dtype=np.int64)[keep],
            difficult=crowd,
            width=width,
            height=height,
            crowd=crowd,
            area=area.reshape(-1)[keep],
        )
        img = images_dir / file_name
        if not img.exists():
            raise DatasetError(f"{img}: image file not found (image {image_id} of {path})")
        records.append(ImageRecord(image_id, img, str(path), ann))
    return records, order


# a split's JSON under dataset.root: <name>/_annotations.coco.json, annotations/...; the training file is "train",
# else the one file of an unsplit export: CVAT's annotations/instances_default.json, Label Studio's result.json
TRAIN_NAMES = ("train", "default", "result")
TEST_NAMES = ("test", "valid", "val")  # the first found is the test split


def find_json(root: Path, names: tuple[str, ...], key: str, missing_ok: bool = False) -> Path | None:
    """The instances file of one split in ``root``: Roboflow's ``<name>/_annotations.coco.json``, COCO's
    ``annotations/instances_<name>*.json``, or ``[annotations/]<name>.json``, for the first name found (none:
    an error that says where it looked, or None with ``missing_ok``)."""
    patterns = ("{}/_annotations.coco.json", "annotations/instances_{}*.json", "{}.json", "annotations/{}.json")
    for name in names:
        for pattern in patterns:
            hits = sorted(root.glob(pattern.format(name)))
            if len(hits) > 1:
                raise DatasetError(f"{root}: {', '.join(h.name for h in hits)} could each be the {key[:-5]} split's "
                                   f"file; set dataset.{key}=FILE")  # fmt: skip
            if hits:
                return hits[0]
    if missing_ok:
        return None
    looked = ", ".join(p.format(names[0]) for p in patterns)
    raise DatasetError(f"{root}: no instances JSON for the {key[:-5]} split (looked for {looked}"
                       f"{' and the same for ' + ', '.join(names[1:]) if len(names) > 1 else ''}); set dataset.{key}=FILE")  # fmt: skip


def _file_name(im: dict) -> str:
    """An image entry's ``file_name`` as a relative path here (a Windows tool's ``images\\a.jpg``: ``images/a.jpg``)."""
    return str(im["file_name"]).replace("\\", "/")


def images_folder(path: Path, data: dict, key: str) -> Path:
    """Where a split's images are when ``dataset.<key>`` is not given: the JSON's own folder (Roboflow's
    exports), else ``images/`` in it or beside it, or COCO's ``<split>/`` beside ``annotations/``, or the folder
    above the JSON's (file names such as ``train/a.jpg`` from the dataset's root), whichever holds the first image
    the file names."""
    first = next((_file_name(im) for im in data["images"] if isinstance(im, dict) and "file_name" in im), None)
    split = path.stem.removeprefix("instances_")
    candidates = [path.parent, path.parent / "images", path.parent.parent / "images", path.parent.parent / split,
                  path.parent.parent]  # fmt: skip
    for folder in candidates:
        if first is None or (folder / first).is_file():
            return folder
    looked = ", ".join(str(c) for c in candidates)
    raise DatasetError(f"{path}: its first image {first!r} is in none of {looked}; set dataset.{key}=FOLDER")


def _held_out_images(data: dict, path: Path) -> tuple[dict, dict]:
    """``data`` (an instances file) as a train and a test part where no test file is found: the images whose
    ``file_name`` hashes into the first 30% test (:func:`held_out`: stable under reordering and additions)."""
    images = [im for im in data["images"] if isinstance(im, dict)]
    if len(images) < 2:
        raise DatasetError(f"{path}: {len(images)} image(s) and no test split's file beside it; a dataset needs 2 at least")
    names = [str(im.get("file_name", im.get("id"))) for im in images]
    held = held_out(names)
    test_ids = {im.get("id") for im, name in zip(images, names) if name in held}

    def part(test: bool) -> dict:
        return {**data, "images": [im for im in images if (im.get("id") in test_ids) == test],
                "annotations": [a for a in data["annotations"] if not isinstance(a, dict) or (a.get("image_id") in test_ids) == test]}  # fmt: skip

    log.info("%s: no test, valid or val file beside it: testing on %d of its %d images (%d%%, chosen by a hash of "
             "each file name), training on the rest; set dataset.test_json=FILE to choose", path, len(test_ids),
             len(images), round(100 * HOLDOUT))  # fmt: skip
    return part(False), part(True)


def _without_empty_parents(by_id: list[int], cats: dict[int, str], supers: dict[int, str | None], datas, path: Path):
    """``by_id`` less the categories that no annotation uses and that name another category's supercategory:
    Roboflow's exports list the dataset itself so (``{"id": 0, "name": "signs"}`` above its classes)."""
    used = {a.get("category_id") for data in datas for a in data["annotations"] if isinstance(a, dict)}
    parents = {s for c, s in supers.items() if s and s != cats[c]}
    empty = [c for c in by_id if c not in used and cats[c] in parents]
    if empty:
        log.info("%s: left out %s, no annotation's category but the supercategory of others",
                 path, ", ".join(f"{cats[c]!r} (id {c})" for c in empty))  # fmt: skip
    return [c for c in by_id if c not in empty]


def load_coco(cfg, hint: str = "") -> DetectionDataset:
    """COCO JSON splits. Labels are contiguous (categories sorted by id); ``iscrowd`` boxes are
    flagged ``crowd`` and ``difficult`` (ignored, as COCOeval does; left out of training)."""
    # a file not given is found in dataset.root (the config requires the one or the other)
    jsons = {"train_json": Path(cfg.train_json) if cfg.train_json else find_json(Path(cfg.root), TRAIN_NAMES, "train_json")}
    jsons["test_json"] = Path(cfg.test_json) if cfg.test_json else find_json(Path(cfg.root), TEST_NAMES, "test_json", True)
    hold = jsons["test_json"] is None  # a training file alone: a share of its images tests
    if hold:
        jsons["test_json"] = jsons["train_json"]
    elif cfg.train_json is None or cfg.test_json is None:
        log.info("training on %s, testing on %s", jsons["train_json"], jsons["test_json"])
    given = {cfg.train_split: (jsons["train_json"], cfg.train_images, "train_images"),
             cfg.test_split: (jsons["test_json"], cfg.test_images, "test_images")}  # fmt: skip
    if hold and len(given) < 2:
        raise DatasetError(f"dataset.train_split and dataset.test_split are both {cfg.train_split!r}: name two splits")
    if hold:
        datas = dict(zip(given, _held_out_images(read_coco_json(jsons["train_json"], hint), jsons["train_json"])))
    else:
        datas = {split: read_coco_json(js, hint) for split, (js, _, _) in given.items()}
    files = {split: (js, Path(folder) if folder else images_folder(js, datas[split], key))
             for split, (js, folder, key) in given.items()}  # fmt: skip
    first_split = next(iter(files))
    cats = _categories(datas[first_split], files[first_split][0])
    supers = {int(c["id"]): c.get("supercategory") or None for c in datas[first_split]["categories"]}
    for split, data in datas.items():
        if _categories(data, files[split][0]) != cats:
            raise DatasetError(
                f"{files[split][0]}: its categories differ from those of {files[first_split][0]}; "
                "all splits must share one category list"
            )
    by_id = sorted(cats)
    if cfg.classes:
        names = {n: i for i, n in cats.items()}
        unknown = [c for c in cfg.classes if c not in names]
        if unknown:
            raise DatasetError(f"dataset.classes names {unknown}, not categories of {files[first_split][0]}")
        by_id = [names[c] for c in cfg.classes]
        log.info("keeping %d of %d COCO categories (dataset.classes)", len(by_id), len(cats))
    else:
        by_id = _without_empty_parents(by_id, cats, supers, datas.values(), files[first_split][0])
    label_of = {cat: k for k, cat in enumerate(by_id)}

    report = BoxReport()
    parts = {split: _split(data, files[split][0], files[split][1], cats, label_of, report, cfg.limit)
             for split, data in datas.items()}  # fmt: skip
    if cfg.train_split != cfg.test_split and set(parts[cfg.train_split][1]) & set(parts[cfg.test_split][1]):
        # Each JSON file numbers its own images (Roboflow's exports, most hand-made splits): the test split
        # keeps its ids, which detections files use; the train split's become "<split>:<id>".
        log.info("%s and %s number their images independently: train images are %s:<id> here",
                 files[cfg.train_split][0], files[cfg.test_split][0], cfg.train_split)  # fmt: skip
        recs, order = parts[cfg.train_split]
        rename = {i: f"{cfg.train_split}:{i}" for i in order}
        parts[cfg.train_split] = [replace(r, image_id=rename[r.image_id]) for r in recs], [rename[i] for i in order]
    records, splits = [], {}
    for split, (recs, order) in parts.items():
        records += recs
        splits[split] = order
    log_box_report(report)
    return DetectionDataset(
        cfg.name,
        [cats[c] for c in by_id],
        records,
        splits,
        cfg.train_split,
        cfg.test_split,
        report,
        category_ids=by_id,
        supercategories=[supers.get(c) for c in by_id],
    )
