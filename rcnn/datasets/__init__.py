"""Datasets: one interface (:class:`DetectionDataset`) for VOC, COCO, ILSVRC DET and the demo."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from ..config import DATASET_HINTS, CocoConfig, DemoConfig, IlsvrcConfig, VocConfig
from .base import Annotation, DatasetError, DetectionDataset, ImageRecord, read_image
from .coco import load_coco
from .demo import load_demo
from .roles import CROWD_IOA, gt_for_recall, gt_for_training, in_crowd, split_names
from .voc import load_ilsvrc, load_voc

__all__ = [
    "build_dataset", "DetectionDataset", "Annotation", "ImageRecord", "DatasetError", "read_image",
    "split_names", "gt_for_recall", "gt_for_training", "in_crowd", "CROWD_IOA",
]  # fmt: skip

_LOADERS = {VocConfig: load_voc, CocoConfig: load_coco, IlsvrcConfig: load_ilsvrc, DemoConfig: load_demo}


def build_dataset(cfg: DictConfig) -> DetectionDataset:
    """The dataset described by ``cfg.dataset`` (a node built from one of the config's schemas)."""
    kind = OmegaConf.get_type(cfg)
    try:
        loader = _LOADERS[kind]
    except KeyError:
        raise DatasetError(f"no loader for a dataset config of type {kind}") from None
    return loader(cfg, hint=DATASET_HINTS.get(cfg.name, ""))
