"""The dataset interface shared by every loader: ids, images, ground truth, classes, splits."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence, Union

import numpy as np
from PIL import Image, ImageOps

from .. import boxes as B

__all__ = ["DatasetError", "HOLDOUT", "held_out", "Annotation", "ImageRecord", "DetectionDataset", "read_image", "read_file", "read_json", "check_boxes"]

log = logging.getLogger("rcnn.datasets")

ImageId = Union[int, str]


class DatasetError(ValueError):
    """Missing or bad data. The message names the file, and the image or box, at fault."""


HOLDOUT = 0.3  # the share of a dataset's images held out for testing where it names no test split


def held_out(ids: Sequence[str]) -> set[str]:
    """The ids held out for testing where a dataset names no test split: those whose SHA-256 falls in the first
    ``HOLDOUT`` of its range, so the same images whatever order they are listed in, and the same again when more
    come; with a handful of images, the lowest (at least one, never all)."""
    share = {i: int.from_bytes(hashlib.sha256(i.encode()).digest()[:8], "big") / 2**64 for i in ids}  # uniform in [0, 1)
    held = {i for i in ids if share[i] < HOLDOUT}
    if not 0 < len(held) < len(ids):
        held = set(sorted(ids, key=share.get)[: min(max(round(HOLDOUT * len(ids)), 1), len(ids) - 1)])
    return held


@dataclass(frozen=True)
class Annotation:
    """Ground truth of one image.

    boxes: float32 [N, 4] continuous (x1, y1, x2, y2); labels: int64 [N] in [0, num_classes);
    difficult: bool [N] (VOC "difficult", COCO "iscrowd": neither counted nor penalised in evaluation).
    crowd: bool [N] (COCO "iscrowd"; all False when not given): a region of many objects, also
    ``difficult``. Training leaves it out (neither an object nor background; see
    :func:`rcnn.datasets.gt_for_training`).
    area: float64 [N] or None: COCO's own ``area`` of each object (its segmentation's), which sorts it into
    COCO's small/medium/large; None where the format has none (the box's area is taken).
    """

    boxes: np.ndarray
    labels: np.ndarray
    difficult: np.ndarray
    width: int
    height: int
    crowd: np.ndarray | None = None
    area: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.crowd is None:
            object.__setattr__(self, "crowd", np.zeros(len(self.labels), bool))

    @staticmethod
    def empty(width: int, height: int) -> "Annotation":
        return Annotation(
            np.zeros((0, 4), np.float32), np.zeros(0, np.int64), np.zeros(0, bool), int(width), int(height)
        )


@dataclass(frozen=True)
class ImageRecord:
    image_id: ImageId
    path: Path  # the image file
    source: str  # where its annotation came from (for messages)
    annotation: Annotation


@dataclass
class BoxReport:
    """What happened to boxes on load: clipped or dropped, with one message each."""

    clipped: int = 0
    dropped: int = 0
    messages: list[str] = field(default_factory=list)

    def add(self, msg: str, dropped: bool) -> None:
        if dropped:
            self.dropped += 1
        else:
            self.clipped += 1
        self.messages.append(msg)


def check_boxes(
    boxes: np.ndarray, width: int, height: int, where: str, report: BoxReport, names: Sequence[str] = ()
) -> np.ndarray:
    """Clip boxes partly outside the image, flag degenerate ones; every change is reported.

    Args:
        boxes: float [N, 4] xyxy. width, height: the image size. where: file (and image) named in
        messages. names: per-box descriptions (e.g. class names) for the messages.

    Returns: ``keep`` bool [N]; boxes are clipped in place. Non-finite coordinates raise.
    """
    keep = np.ones(len(boxes), dtype=bool)
    for i, box in enumerate(boxes):
        what = f"{where}: box {i}" + (f" ({names[i]})" if i < len(names) else "") + f" {np.round(box, 2).tolist()}"
        if not np.isfinite(box).all():
            raise DatasetError(f"{what}: coordinates are not finite numbers")
        x1, y1, x2, y2 = box
        if x2 <= x1 or y2 <= y1:
            report.add(f"{what}: x2 <= x1 or y2 <= y1, dropped", dropped=True)
            keep[i] = False
        elif x2 <= 0 or y2 <= 0 or x1 >= width or y1 >= height:
            report.add(f"{what}: entirely outside the {width}x{height} image, dropped", dropped=True)
            keep[i] = False
        elif x1 < 0 or y1 < 0 or x2 > width or y2 > height:
            boxes[i] = B.clip(box[None], width, height)[0]
            report.add(f"{what}: partly outside the {width}x{height} image, clipped", dropped=False)
    return keep


def read_file(path: Path, what: str, hint: str = "") -> bytes:
    """The bytes of an annotation-like file; a missing or empty one is a DatasetError naming it."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DatasetError(f"{path}: {what} not found" + (f"; {hint}" if hint else "")) from None
    if not data.strip():
        raise DatasetError(f"{path}: empty {what}")
    return data


def read_json(path: Path, what: str, hint: str = ""):
    """A JSON file's content; missing, empty or malformed is a DatasetError naming the file."""
    try:
        return json.loads(read_file(path, what, hint))
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}: malformed JSON ({e})") from None


QUARTER_TURNS = (5, 6, 7, 8)  # EXIF orientations a viewer shows turned a quarter (width and height swapped)


def read_image(path: str | Path, orient: bool = False, fit: tuple[int, int] | None = None) -> np.ndarray:
    """Read an image as RGB uint8 ``[H, W, 3]``: grayscale, 16-bit, CMYK, palette and alpha converted; ``orient``:
    turned as its EXIF orientation says (as a photo viewer shows a phone's photo), else its pixels as stored;
    ``fit``: an annotation's ``(width, height)``, turned only where the stored pixels are that size turned a
    quarter and the EXIF orientation turns them (the tool that drew the boxes showed it so, as most do)."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            if fit is not None and im.size == fit[::-1] != tuple(fit):
                orient = orient or im.getexif().get(0x0112) in QUARTER_TURNS
            im.load()
            if orient:
                im = ImageOps.exif_transpose(im)
            if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
                a = np.asarray(im, dtype=np.float64)
                hi = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
                gray = np.clip(a * (255.0 / hi), 0, 255).astype(np.uint8)
                return np.repeat(gray[:, :, None], 3, axis=2)
            if im.mode == "P":
                im = im.convert("RGBA")
            return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
    except FileNotFoundError:
        raise DatasetError(f"{path}: image file not found") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DatasetError(f"{path}: unreadable image ({e})") from e


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the image header, without decoding the pixels."""
    try:
        with Image.open(path) as im:
            return im.size
    except FileNotFoundError:
        raise DatasetError(f"{path}: image file not found") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise DatasetError(f"{path}: unreadable image ({e})") from e


class DetectionDataset:
    """A detection dataset: images by id, their ground truth, class names and splits.

    Built by the loaders in this package (``build_dataset(cfg.dataset)``); every split is a list of
    image ids in the order of the dataset's own lists, already cut to ``dataset.limit``.
    """

    def __init__(
        self,
        name: str,
        classes: Sequence[str],
        records: Iterable[ImageRecord],
        splits: dict[str, list[ImageId]],
        train_split: str,
        test_split: str,
        report: BoxReport | None = None,
        category_ids: Sequence[int] | None = None,
        display_names: Sequence[str] | None = None,
        blacklist: Iterable[tuple[ImageId, int]] = (),
        supercategories: Sequence[str | None] | None = None,
    ):
        self.name = name
        self.classes = tuple(classes)
        self.records = {r.image_id: r for r in records}
        self.splits = {k: list(v) for k, v in splits.items()}
        self.train_split, self.test_split = train_split, test_split
        self.report = report or BoxReport()
        # COCO category id of each label (COCO keeps its own ids; other datasets use label + 1).
        self.category_ids = tuple(category_ids) if category_ids else tuple(range(1, len(self.classes) + 1))
        self.display_names = tuple(display_names) if display_names else self.classes
        self.blacklist = frozenset(blacklist)  # (image id, label) pairs the ILSVRC evaluator ignores
        # Each class's group of similar classes where the dataset names one (COCO's supercategory), else None.
        self.supercategories = tuple(supercategories) if supercategories else (None,) * len(self.classes)
        for split in (train_split, test_split):
            if split not in self.splits:
                raise DatasetError(f"{name}: no split named '{split}' (splits: {', '.join(self.splits)})")
        for split, ids in self.splits.items():
            unknown = [i for i in ids if i not in self.records]
            if unknown:
                raise DatasetError(f"{name}: split {split} lists images without a record: {unknown[:5]}")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def image_ids(self, split: str) -> list[ImageId]:
        try:
            return self.splits[split]
        except KeyError:
            raise DatasetError(f"{self.name}: no split named '{split}' (splits: {', '.join(self.splits)})") from None

    def record(self, image_id: ImageId) -> ImageRecord:
        try:
            return self.records[image_id]
        except KeyError:
            raise DatasetError(f"{self.name}: no image with id {image_id!r}") from None

    def annotation(self, image_id: ImageId) -> Annotation:
        return self.record(image_id).annotation

    def image_path(self, image_id: ImageId) -> Path:
        return self.record(image_id).path

    def load_image(self, image_id: ImageId) -> np.ndarray:
        """RGB uint8 ``[H, W, 3]``; its size is checked against the annotation's. A photo whose stored pixels
        are the annotation's size turned a quarter is taken as its EXIF orientation shows it, where that gives
        the annotation's size (the tool that drew the boxes showed it turned, as most do)."""
        rec = self.record(image_id)
        a = rec.annotation
        img = read_image(rec.path, fit=(a.width, a.height))
        h, w = img.shape[:2]
        if (w, h) != (a.width, a.height):
            hint = " (its width and height swapped, and no EXIF orientation turns it)" if (h, w) == (a.width, a.height) else ""
            raise DatasetError(
                f"{rec.path}: image is {w}x{h} but {rec.source} says {a.width}x{a.height}{hint}"
            )
        return img

    def fingerprint(self) -> str:
        """Hash of everything that identifies the data: classes, splits, boxes and the images' contents
        (not their paths or dates: a copy of the tree elsewhere has the same fingerprint; rcnn.filehash
        remembers each image's hash on this machine, so only new or changed files are read)."""
        from ..filehash import content_hashes

        ids = [i for split in sorted(self.splits) for i in self.splits[split]]
        present = [i for i in ids if self.records[i].path.is_file()]  # a missing image is the data stage's error
        contents = dict(zip(present, content_hashes(self.records[i].path for i in present)))
        h = hashlib.sha256()
        h.update(repr((self.classes, self.category_ids, sorted(self.splits.items(), key=str))).encode())
        h.update(repr(sorted(self.blacklist, key=str)).encode())
        for image_id in ids:
            rec = self.records[image_id]
            a = rec.annotation
            h.update(repr((image_id, contents.get(image_id), a.width, a.height)).encode())
            for arr in (a.boxes, a.labels, a.difficult, a.crowd):
                h.update(np.ascontiguousarray(arr).tobytes())
        return h.hexdigest()[:16]

    def split_stats(self, split: str) -> dict:
        """Counts of one split: images, boxes, difficult boxes (crowd ones among them), classes present,
        boxes per class."""
        ids = self.image_ids(split)
        per_class = np.zeros(self.num_classes, dtype=np.int64)
        boxes = difficult = crowd = empty = 0
        for i in ids:
            a = self.annotation(i)
            boxes += len(a.labels)
            difficult += int(a.difficult.sum())
            crowd += int(a.crowd.sum())
            empty += int(len(a.labels) == 0)
            np.add.at(per_class, a.labels, 1)
        return {
            "images": len(ids),
            "boxes": boxes,
            "difficult": difficult,
            "crowd": crowd,
            "classes": int((per_class > 0).sum()),
            "images_without_boxes": empty,
            "boxes_per_class": {c: int(n) for c, n in zip(self.classes, per_class) if n},
        }

    def __repr__(self) -> str:
        sizes = ", ".join(f"{k}: {len(v)}" for k, v in self.splits.items())
        return f"DetectionDataset({self.name!r}, {self.num_classes} classes, {sizes})"


def log_box_report(report: BoxReport, limit: int = 10) -> None:
    for msg in report.messages[:limit]:
        log.warning(msg)
    if len(report.messages) > limit:
        log.warning("... and %d more box warnings (counted in the data stage's metrics.json)", len(report.messages) - limit)
