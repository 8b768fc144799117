"""PASCAL VOC trees and ILSVRC DET (VOC-like XML with synset ids as class names)."""

from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

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
    image_size,
    log_box_report,
    read_file,
)

__all__ = ["load_voc", "load_ilsvrc", "parse_voc_xml", "VocObject", "voc_splits", "folder_splits"]

log = logging.getLogger(__name__)

AUTO = "auto"  # a split name chosen from the lists the tree has
TEST_LISTS = ("test", "val")  # dataset.test_split=auto takes the first present
TRAIN_LISTS = ("trainval", "train")  # dataset.train_split=auto: the first present ("train" beside "val")
ANNOTATION_DIRS = ("Annotations", "annotations")  # a tree's XML folder: VOC's, else Kaggle's and Label Studio's
IMAGE_DIRS = ("JPEGImages", "images", "Images")  # and its images', the first present
TRAIN_FOLDERS = ("train",)  # XML beside images, a folder a split (no Annotations/): the train split's folder
TEST_FOLDERS = ("test", "valid", "val")  # and the test split's, the first present
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".JPG", ".JPEG", ".PNG")  # looked for when <id><image_ext> is not there


@dataclass(frozen=True)
class VocObject:
    name: str
    box: tuple[float, float, float, float]  # as written: 1-based inclusive (xmin, ymin, xmax, ymax)
    difficult: bool


@dataclass(frozen=True)
class VocFile:
    filename: str | None
    width: int
    height: int
    objects: list[VocObject]


def _number(node: ET.Element | None, tag: str, where: str) -> float:
    text = node.findtext(tag) if node is not None else None
    if text is None:
        raise DatasetError(f"{where}: missing <{tag}>")
    try:
        return float(text)
    except ValueError:
        raise DatasetError(f"{where}: <{tag}> is {text!r}, not a number") from None


def parse_voc_xml(path: Path) -> VocFile:
    """Parse one VOC/ILSVRC annotation file; every problem is a DatasetError naming the file."""
    data = read_file(path, "annotation file")
    try:
        root = ET.fromstring(data)
    except ET.ParseError as e:
        raise DatasetError(f"{path}: malformed XML ({e})") from None
    if root.tag != "annotation":
        raise DatasetError(f"{path}: root element is <{root.tag}>, expected <annotation>")
    size = root.find("size")
    width = int(_number(size, "width", f"{path}: <size>")) if size is not None else 0
    height = int(_number(size, "height", f"{path}: <size>")) if size is not None else 0
    objects = []
    for k, obj in enumerate(root.findall("object")):
        where = f"{path}: object {k}"
        name = (obj.findtext("name") or "").strip()
        if not name:
            raise DatasetError(f"{where}: missing <name>")
        bb = obj.find("bndbox")
        if bb is None:
            raise DatasetError(f"{where} ({name}): missing <bndbox>")
        box = tuple(_number(bb, t, f"{where} ({name}) <bndbox>") for t in ("xmin", "ymin", "xmax", "ymax"))
        difficult = (obj.findtext("difficult") or "0").strip() in ("1", "true", "True")
        objects.append(VocObject(name, box, difficult))
    return VocFile(root.findtext("filename"), width, height, objects)


def _read_lines(path: Path, what: str, hint: str = "") -> list[list[str]]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise DatasetError(f"{path}: {what} not found{hint}") from None
    return [line.split() for line in text.splitlines() if line.strip()]


def _build(
    name: str,
    split_ids: dict[str, list[str]],
    xml_path: Callable[[str, str], Path],
    image_path: Callable[[str, str, VocFile], Path],
    classes: Sequence[str] | None,
) -> tuple[list[ImageRecord], list[str], BoxReport]:
    """Parse every listed annotation into records; derive the class list when it is not given."""
    parsed: dict[str, tuple[Path, Path, VocFile]] = {}
    for split, ids in split_ids.items():
        for image_id in ids:
            if image_id in parsed:
                continue
            xml = xml_path(split, image_id)
            vf = parse_voc_xml(xml)
            parsed[image_id] = (xml, image_path(split, image_id, vf), vf)
    if classes is None:
        classes = sorted({o.name for _, _, vf in parsed.values() for o in vf.objects})
    label = {c: i for i, c in enumerate(classes)}
    report = BoxReport()
    records = []
    for image_id, (xml, img, vf) in parsed.items():
        if not img.exists():
            raise DatasetError(f"{img}: image file not found (annotated in {xml})")
        width, height = vf.width, vf.height
        if width <= 0 or height <= 0:  # no usable <size>: read it from the image header
            width, height = image_size(img)
        for k, o in enumerate(vf.objects):
            if o.name not in label:
                raise DatasetError(
                    f"{xml}: object {k} has class '{o.name}', which is not in dataset.classes "
                    f"({', '.join(classes)})"
                )
        names = [o.name for o in vf.objects]
        boxes = B.voc_to_xyxy([o.box for o in vf.objects])
        keep = check_boxes(boxes, width, height, str(xml), report, names)
        ann = Annotation(
            boxes=boxes[keep],
            labels=np.array([label[o.name] for o in vf.objects], dtype=np.int64)[keep],
            difficult=np.array([o.difficult for o in vf.objects], dtype=bool)[keep],
            width=width,
            height=height,
        )
        records.append(ImageRecord(image_id, img, str(xml), ann))
    log_box_report(report)
    return records, list(classes), report


def _limit(ids: list, limit: int | None) -> list:
    return ids[:limit] if limit else ids


def _held_out(ids: list[str], where: Path, choose: str, which: str = "no split lists") -> dict[str, list[str]]:
    """Images without a test list: those whose id hashes below HOLDOUT are the test split, the rest the train
    split: the same images whatever order the folder lists, and the same again when more come."""
    if len(ids) < 2:
        raise DatasetError(f"{where}: {len(ids)} annotation file(s); a dataset needs 2 at least")
    held = held_out(ids)
    log.info("%s: %s: testing on %d of the %d annotated images (%d%%, chosen by a hash of each id), "
             "training on the rest; %s to choose", where, which, len(held), len(ids), round(100 * HOLDOUT), choose)  # fmt: skip
    return {"train": [i for i in ids if i not in held], "test": [i for i in ids if i in held]}


def _stems(folder: Path) -> list[str]:
    return sorted(p.stem for p in folder.glob("*.xml"))


def voc_splits(root: Path, train: str, test: str, annotations: Path | None = None) -> dict[str, list[str]]:
    """``{train name: ids, test name: ids}`` of a VOC tree (the train split first), from
    ``ImageSets/Main/<split>.txt``. A name ``auto`` takes the lists the tree has: test, else val; trainval,
    else train (train where the test split is val, which trainval contains). A tree without either list
    holds out 30% of its annotated images (by a hash of each id) as ``test`` and trains on the rest; one with a
    training list alone, 30% of that list's images."""
    lists = root / "ImageSets" / "Main"
    have = {p.stem for p in lists.glob("*.txt")} if lists.is_dir() else set()
    there = f" (lists there: {', '.join(sorted(s for s in have if '_' not in s)) or 'none'})"  # not VOC's <class>_<split>
    if train == test == AUTO and not have & {*TEST_LISTS, *TRAIN_LISTS}:
        return _held_out(_stems(annotations or root / "Annotations"), root, "write ImageSets/Main/train.txt and test.txt")
    if train == test == AUTO and not have & set(TEST_LISTS):  # a training list alone: a share of it tests
        name = next(s for s in TRAIN_LISTS if s in have)
        ids = [r[0] for r in _read_lines(lists / f"{name}.txt", f"split list of '{name}'", there)]
        return _held_out(ids, lists / f"{name}.txt", "write ImageSets/Main/test.txt", f"no {' or '.join(TEST_LISTS)} list")
    chosen = {"test_split": test, "train_split": train}
    options = {"test_split": TEST_LISTS, "train_split": TRAIN_LISTS}
    if test == AUTO:
        chosen["test_split"] = next((s for s in TEST_LISTS if s in have), None)
    if chosen["test_split"] == "val":
        options["train_split"] = ("train",)  # trainval holds val
    if train == AUTO:
        chosen["train_split"] = next((s for s in options["train_split"] if s in have), None)
    for key in ("test_split", "train_split"):
        if chosen[key] is None:
            holds = " (VOC's trainval.txt holds val's images: training on it would test on trained ones)" if (
                key == "train_split" and "trainval" in have) else ""
            raise DatasetError(f"{lists}: no {' or '.join(f'{o}.txt' for o in options[key])} to take as the "
                               f"{key[:-6]} split{there}; set dataset.{key}=NAME{holds}")  # fmt: skip
    if AUTO in (train, test):
        log.info("%s: training on ImageSets/Main/%s.txt, testing on %s.txt", root, chosen["train_split"], chosen["test_split"])
    train, test = chosen["train_split"], chosen["test_split"]
    return {split: [r[0] for r in _read_lines(lists / f"{split}.txt", f"split list of '{split}'", there)]
            for split in dict.fromkeys([train, test])}  # fmt: skip


def folder_splits(root: Path, train: str, test: str) -> dict[str, list[str]] | None:
    """The splits of XML files beside their images (no Annotations/): one folder a split (Roboflow's VOC
    export: ``train/``, ``valid/``, ``test/``; ``auto`` takes train, and test, else valid, else val, else 30% of
    train), or every file in ``root`` itself with 30% held out (LabelImg's folder). Ids are ``<folder>/<stem>``, or
    the stem alone in a flat folder. None where neither is there."""
    wanted = {"train": (train,) if train != AUTO else TRAIN_FOLDERS, "test": (test,) if test != AUTO else TEST_FOLDERS}
    stems = {name: _stems(root / name) for names in wanted.values() for name in names}
    chosen = {role: next((n for n in names if stems[n]), None) for role, names in wanted.items()}
    if all(chosen.values()):
        log.info("%s: training on the XML files in %s/, testing on those in %s/", root, chosen["train"], chosen["test"])
        return {chosen[r]: [f"{chosen[r]}/{i}" for i in stems[chosen[r]]] for r in ("train", "test")}
    if chosen["train"] and train == test == AUTO:  # a train folder alone: a share of it tests
        ids = [f"{chosen['train']}/{i}" for i in stems[chosen["train"]]]
        return _held_out(ids, root / chosen["train"], "make a test/ folder", f"no {'/, '.join(TEST_FOLDERS)}/ folder")
    if any(chosen.values()):
        role = "train" if chosen["train"] is None else "test"
        raise DatasetError(f"{root}: no XML files in {' or '.join(f'{n}/' for n in wanted[role])} for the {role} split; "
                           f"set dataset.{role}_split=FOLDER")  # fmt: skip
    flat = _stems(root)
    return _held_out(flat, root, "move them to train/ and test/ folders") if train == test == AUTO and flat else None


def load_voc(cfg, hint: str = "") -> DetectionDataset:
    """VOC XML: a VOC tree (``Annotations/<id>.xml``, ``JPEGImages/<id><ext>``, ``ImageSets/Main/<split>.txt``:
    :func:`voc_splits`; or Kaggle's and Label Studio's ``annotations/`` or ``Annotations/`` beside ``images/``), or XML
    files beside their images (:func:`folder_splits`)."""
    root = Path(cfg.root)
    annotations = next((root / d for d in ANNOTATION_DIRS if (root / d).is_dir()), None)
    if annotations is not None:
        split_ids = voc_splits(root, cfg.train_split, cfg.test_split, annotations)
        images = next((root / d for d in IMAGE_DIRS if (root / d).is_dir()), root / IMAGE_DIRS[0])
        if annotations.name != "Annotations" or images.name != "JPEGImages":
            log.info("%s: annotations in %s/, images in %s/", root, annotations.name, images.name)
    else:
        split_ids = folder_splits(root, cfg.train_split, cfg.test_split) if root.is_dir() else None
        if split_ids is None:
            trees = sorted(p.parent.name for p in root.glob("*/Annotations")) if root.is_dir() else []  # a VOCdevkit
            where = f"; {hint}" if hint else f"; it holds {', '.join(f'{t}/' for t in trees)}" if trees else ""
            raise DatasetError(f"{root}: not a VOC dataset folder (no Annotations/ inside, no train/ with XML files, no "
                               f"XML files){where}, or set dataset.root=PATH")  # fmt: skip
        annotations = images = root
    split_ids = {s: _limit(ids, cfg.limit) for s, ids in split_ids.items()}
    train, test = next(iter(split_ids)), list(split_ids)[-1]

    def image_path(split: str, image_id: str, vf) -> Path:
        folder = (images / image_id).parent  # ids of folder splits carry their folder
        stem = Path(image_id).name
        p = folder / f"{stem}{cfg.image_ext}"
        if p.exists():
            return p
        if vf.filename and (folder / vf.filename).exists():
            return folder / vf.filename
        return next((q for q in (folder / f"{stem}{e}" for e in IMAGE_EXTS) if q.exists()), p)

    records, classes, report = _build(
        cfg.name,
        split_ids,
        lambda split, i: annotations / f"{i}.xml",
        image_path,
        list(cfg.classes) if cfg.classes else None,
    )
    return DetectionDataset(cfg.name, classes, records, split_ids, train, test, report)


def _optional_file(root: Path, value: str | None) -> Path | None:
    if not value:
        return None
    p = Path(value)
    return p if p.is_absolute() else root / p


def load_ilsvrc(cfg, hint: str = "") -> DetectionDataset:
    """ILSVRC DET: ``<annotations>/<split>/<id>.xml``, ``<images>/<split>/<id>.JPEG``, split lists
    ``<image_sets>/<split>.txt`` with lines ``<id> <index>``; optional synset map and blacklist.

    Boxes are read as VOC's: pixel-inclusive corners, 1-based. The devkit's readme calls its format PASCAL
    VOC's and its eval_detection.m measures every width as ``xmax - xmin + 1``, for overlaps and for each
    object's threshold, which is the continuous width of the corners loaded this way; a test checks this
    toolkit's ILSVRC AP against that file's arithmetic on hand-made XML. (0- or 1-based only shifts a box
    by one pixel in both the ground truth and the detections, which changes no overlap.)"""
    root = Path(cfg.root)
    if not (root / cfg.annotations).is_dir():
        where = f"; {hint}" if hint else ""
        raise DatasetError(f"{root}: no {cfg.annotations}/ folder inside{where}, or set dataset.root=PATH")
    split_ids, index_of = {}, {}
    for split in dict.fromkeys([cfg.train_split, cfg.test_split]):
        rows = _read_lines(root / cfg.image_sets / f"{split}.txt", f"split list of '{split}'")
        rows = _limit(rows, cfg.limit)
        split_ids[split] = [r[0] for r in rows]
        if split == cfg.test_split:
            index_of = {r[1]: r[0] for r in rows if len(r) > 1}

    synsets_file = _optional_file(root, cfg.synsets)
    classes = list(cfg.classes) if cfg.classes else None
    display = None
    if synsets_file is not None:
        rows = _read_lines(synsets_file, "synset list (set dataset.synsets=null to take classes from the XML)")
        if classes is None:
            classes = [r[0] for r in rows]
        names = {r[0]: " ".join(r[2:]) or r[0] for r in rows}
        display = [names.get(c, c) for c in classes]

    records, classes, report = _build(
        cfg.name,
        split_ids,
        lambda split, i: root / cfg.annotations / split / f"{i}.xml",
        lambda split, i, vf: root / cfg.images / split / f"{i}{cfg.image_ext}",
        classes,
    )
    blacklist = []
    blacklist_file = _optional_file(root, cfg.blacklist)
    if blacklist_file is not None:
        label = {c: k for k, c in enumerate(classes)}
        for n, row in enumerate(_read_lines(blacklist_file, "blacklist (set dataset.blacklist=null for none)")):
            if len(row) < 2 or row[1] not in label:
                raise DatasetError(f"{blacklist_file}: line {n + 1} {' '.join(row)!r} is not '<image index> <synset>'")
            if row[0] in index_of:  # pairs of images outside the (limited) test split do not apply
                blacklist.append((index_of[row[0]], label[row[1]]))
    return DetectionDataset(
        cfg.name, classes, records, split_ids, cfg.train_split, cfg.test_split, report,
        display_names=display, blacklist=blacklist,
    )  # fmt: skip
