"""Image-classification trees for pretraining, GoogLeNet's training augmentation and its test crops.

A tree is ``<root>/train/<class>/<image>`` and ``<root>/val/<class>/<image>`` (ImageNet CLS-LOC with its
validation images sorted into class folders, torchvision's ``ImageFolder``). Classes are the folder names
of ``train/``, sorted; ``val/`` may hold a subset of them.

Training crops (the paper's section 6): a random crop of ``crop_scale`` (8%-100%) of the image area with
aspect ratio in ``crop_ratio`` ([3/4, 4/3]), resized to ``S x S`` by a randomly chosen interpolation
(bilinear, area, nearest, cubic), a horizontal flip with probability 1/2, and photometric distortions
(brightness, contrast, saturation). Test crops (:func:`scheme_crops`): ``center`` (the shorter side resized
to ``S / 0.875``, the centre ``S x S``), ``10crop`` (its four corners and centre, and their mirrors) and
``144crop`` (the paper's: 4 scales x 3 squares x 6 crops x 2 mirrors).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as TF

from rcnn.config import INTERPOLATIONS as INTERPOLATION_NAMES
from rcnn.config import TEST_SCHEMES

from .backbone import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "ClassificationTree",
    "PretrainDataError",
    "TrainCrops",
    "CropSpec",
    "crop_specs",
    "scheme_crops",
    "to_input",
    "TEST_SCHEMES",
]

log = logging.getLogger("features.pretrain")

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
CENTER_FRACTION = 0.875  # the centre crop covers 87.5% of the shorter side (224 of 256)
SCALES_144 = (256, 288, 320, 352)  # the paper's shorter sides for a 224 network (scaled to S)


class PretrainDataError(ValueError):
    """A classification tree that cannot be used (missing folder, no classes, no images)."""


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int


class ClassificationTree:
    """The images of one split of a classification tree: ``samples`` (path, label), ``classes``."""

    def __init__(self, root: str | Path, split: str, classes: list[str] | None = None):
        self.root = Path(root)
        folder = self.root / split
        if not folder.is_dir():
            raise PretrainDataError(
                f"{folder}: no such folder; a classification tree holds train/<class>/* and val/<class>/* "
                "(pretrain.data=imagenette|ilsvrc2012|PATH)"
            )
        found = sorted(p.name for p in folder.iterdir() if p.is_dir())
        if classes is None:
            classes = found
        unknown = sorted(set(found) - set(classes))
        if unknown:
            raise PretrainDataError(f"{folder}: class folders not in the train split: {unknown[:5]}")
        if not classes:
            raise PretrainDataError(f"{folder}: no class folders")
        self.classes = list(classes)
        index = {c: i for i, c in enumerate(self.classes)}
        self.samples = [
            Sample(p, index[c])
            for c in found
            for p in sorted((folder / c).iterdir())
            if p.suffix.lower() in IMAGE_SUFFIXES
        ]
        if not self.samples:
            raise PretrainDataError(f"{folder}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        self.bad: list[str] = []  # "path: reason" of every image that could not be decoded
        self._cache: list[torch.Tensor | None] | None = None

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def labels(self) -> list[int]:
        return [s.label for s in self.samples]

    def decode(self, i: int) -> torch.Tensor | None:
        """uint8 ``[3, H, W]`` RGB of sample ``i``; None (counted in ``bad``, logged) if undecodable."""
        if self._cache is not None:
            return self._cache[i]
        path = self.samples[i].path
        try:
            with Image.open(path) as im:
                rgb = np.asarray(im.convert("RGB"))
            return torch.from_numpy(rgb.copy()).permute(2, 0, 1).contiguous()
        except Exception as e:  # a corrupt or truncated file must not stop a 1.2M-image run
            msg = f"{path}: unreadable image, skipped ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
            self.bad.append(msg)
            log.warning(msg)
            return None

    def cache(self, progress: bool = False) -> None:
        """Decode every image once and keep it in memory (for trees that fit)."""
        from tqdm import tqdm

        images = []
        for i in tqdm(range(len(self)), desc=f"decoding {self.root.name}", unit="img", disable=not progress):
            images.append(self.decode(i))
        self._cache = images

    def cached_bytes_estimate(self) -> int:
        """Memory the decoded images would take, estimated from the size of the first readable one
        (read from its header: nothing is decoded)."""
        for sample in self.samples[:5]:
            try:
                with Image.open(sample.path) as im:
                    return 3 * im.width * im.height * len(self)
            except Exception:  # an unreadable file: decode() names it later
                continue
        return 0


# -- training augmentation -------------------------------------------------------------------------

# "area" is bilinear with antialiasing (a box-like average when shrinking, as OpenCV's INTER_AREA).
INTERPOLATIONS = {
    "bilinear": (InterpolationMode.BILINEAR, False),
    "area": (InterpolationMode.BILINEAR, True),
    "nearest": (InterpolationMode.NEAREST, False),
    "cubic": (InterpolationMode.BICUBIC, False),
}
assert tuple(INTERPOLATIONS) == INTERPOLATION_NAMES  # the config names them, this module implements them


class TrainCrops:
    """``uint8 [3, H, W] -> uint8 [3, S, S]``: GoogLeNet's training crop, flip and distortions.

    Draws from Python's ``random`` (the interpolation) and torch's global generator (everything else):
    seed both before a sample to make it reproducible.
    """

    def __init__(self, size: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), interpolations=tuple(INTERPOLATIONS),
                 flip: bool = True, jitter: float = 0.4):  # fmt: skip
        unknown = [m for m in interpolations if m not in INTERPOLATIONS]
        if unknown or not interpolations:
            raise ValueError(f"pretrain.interpolations takes some of {', '.join(INTERPOLATIONS)}, got {list(interpolations)}")
        self.size, self.scale, self.ratio = size, tuple(scale), tuple(ratio)
        self.interpolations, self.flip = list(interpolations), flip
        self.jitter = v2.ColorJitter(brightness=jitter, contrast=jitter, saturation=jitter) if jitter > 0 else None

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        top, left, h, w = v2.RandomResizedCrop.get_params(img, list(self.scale), list(self.ratio))
        mode, antialias = INTERPOLATIONS[random.choice(self.interpolations)]
        out = TF.resized_crop(img, top, left, h, w, [self.size, self.size], interpolation=mode, antialias=antialias)
        if self.flip and torch.rand(()) < 0.5:
            out = TF.horizontal_flip(out)
        if self.jitter is not None:
            out = self.jitter(out)
        return out


def to_input(batch_u8: torch.Tensor) -> torch.Tensor:
    """uint8 ``[B, 3, S, S]`` -> ImageNet-normalised float ``[B, 3, S, S]`` (channels_last)."""
    x = batch_u8.float().div_(255)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous(memory_format=torch.channels_last)


# -- test crops ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CropSpec:
    """One test crop: resize the image to ``(height, width)``, take ``box`` (x1, y1, x2, y2 in the
    resized image's pixels), resize that to ``S x S`` and mirror it if ``flip``."""

    height: int
    width: int
    box: tuple[int, int, int, int]
    flip: bool


def _resized(h: int, w: int, shorter: int) -> tuple[int, int]:
    """``(h, w)`` scaled so that the shorter side is ``shorter``."""
    if h <= w:
        return shorter, max(shorter, round(w * shorter / h))
    return max(shorter, round(h * shorter / w)), shorter


def _five(x0: int, y0: int, side: int, crop: int) -> list[tuple[int, int, int, int]]:
    """The four corners and the centre ``crop x crop`` of the square at (x0, y0) of ``side``."""
    c = (side - crop) // 2
    offsets = [(0, 0), (side - crop, 0), (0, side - crop), (side - crop, side - crop), (c, c)]
    return [(x0 + dx, y0 + dy, x0 + dx + crop, y0 + dy + crop) for dx, dy in offsets]


def crop_specs(scheme: str, h: int, w: int, size: int) -> list[CropSpec]:
    """The crops of one test scheme for an ``h x w`` image and a network of input ``size``."""
    if scheme in ("center", "10crop"):
        rh, rw = _resized(h, w, round(size / CENTER_FRACTION))
        x0, y0 = (rw - size) // 2, (rh - size) // 2
        centre = (x0, y0, x0 + size, y0 + size)
        if scheme == "center":
            return [CropSpec(rh, rw, centre, False)]
        boxes = [(0, 0, size, size), (rw - size, 0, rw, size), (0, rh - size, size, rh), (rw - size, rh - size, rw, rh), centre]
        return [CropSpec(rh, rw, b, f) for f in (False, True) for b in boxes]
    if scheme == "144crop":
        specs = []
        for s in SCALES_144:
            rh, rw = _resized(h, w, round(s * size / 224))
            side, longer = min(rh, rw), max(rh, rw)
            for start in (0, (longer - side) // 2, longer - side):  # left/centre/right or top/centre/bottom
                x0, y0 = (start, 0) if rw >= rh else (0, start)
                boxes = _five(x0, y0, side, size) + [(x0, y0, x0 + side, y0 + side)]  # + the square itself
                specs += [CropSpec(rh, rw, b, f) for f in (False, True) for b in boxes]
        return specs
    raise ValueError(f"unknown test scheme {scheme!r}: one of {', '.join(TEST_SCHEMES)}")


def scheme_crops(img: torch.Tensor, scheme: str, size: int) -> torch.Tensor:
    """uint8 ``[3, H, W]`` -> uint8 ``[K, 3, S, S]``: the crops of ``scheme`` (K = 1, 10 or 144)."""
    h, w = img.shape[-2:]
    resized: dict[tuple[int, int], torch.Tensor] = {}
    out = []
    for spec in crop_specs(scheme, h, w, size):
        key = (spec.height, spec.width)
        if key not in resized:
            resized[key] = TF.resize(img, list(key), interpolation=InterpolationMode.BILINEAR, antialias=True)
        x1, y1, x2, y2 = spec.box
        crop = resized[key][:, y1:y2, x1:x2]
        if crop.shape[-1] != size or crop.shape[-2] != size:
            crop = TF.resize(crop, [size, size], interpolation=InterpolationMode.BILINEAR, antialias=True)
        out.append(TF.horizontal_flip(crop) if spec.flip else crop)
    return torch.stack(out)
