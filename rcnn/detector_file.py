"""The detector file: its format, and the one place it is written and read.

A detector file (``torch.save`` of plain tensors, lists and strings; read with ``weights_only=True``)::

    format            "rcnn-googlenet-detector", version
    classes           class names, in label order; category_ids: the dataset's category ids
    backbone          GoogLeNet state dict (BatchNorm unfolded)
    normalization     the input normalisation the backbone expects (features/backbone.py)
    features          the feature settings (mode, input_size, padding, roi_layer, roi_image_size, ...)
    feature_scale     R-CNN's factor bringing the mean feature norm to 20 (already folded into the weights)
    svm_w, svm_b      [C, D], [C]: score = raw feature @ svm_w.T + svm_b; untrained classes have b = -inf;
                      None when it was trained without SVMs (svm.classifiers=false: the classifier scores)
    reg_w, reg_b      [C, D, 4], [C, 4] box regression deltas from the raw feature (or absent)
    proposals         how to propose boxes in a new image: method, selective search settings, top_n,
                      merge_iou, and the MultiBox model (state dict + priors) when the method uses it
    features_key      the features stage key the SVMs were trained on (detect reuses that cache)
    classifier        the fine-tuned network's (N+1)-way classifier (weight, bias), or None
    scores            how it scores where ``detect.scores`` is null: "svm" or "softmax" (absent: svm)
    nms_iou           [C] each class's NMS overlap where ``detect.nms_iou`` is null, from how much its training
                      objects overlap each other (absent: R-CNN's 0.3 for every class)
    config            the YAML of the configuration that made it

``svm/stage.py`` assembles the parts and writes them here; :class:`rcnn.detector.Detector` reads them here.
"""

from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["FORMAT", "VERSION", "DetectorError", "check_parts", "read_detector", "write_detector"]

FORMAT = "rcnn-googlenet-detector"
VERSION = 2  # 2: the backbone's input normalisation stored (it was lost for non-ImageNet-named weights)


class DetectorError(RuntimeError):
    """A detector file that is missing, unreadable or not a detector."""


def check_parts(parts: dict) -> dict:
    """``parts`` if they are a detector of this format and version, else :class:`DetectorError`."""
    if parts.get("format") != FORMAT:
        raise DetectorError(f"not a detector file (format {parts.get('format')!r}, expected {FORMAT!r})")
    if parts.get("version") != VERSION:
        raise DetectorError(f"detector file version {parts.get('version')}, this toolkit reads {VERSION}: "
                            "train it again with stage=svm")  # fmt: skip
    return parts


def read_detector(path: str | Path) -> dict:
    """A detector file's parts (checked), or an error that names the file."""
    path = Path(path)
    if not path.is_file():
        raise DetectorError(f"{path}: no such detector file (stage=svm writes <out>/svm/detector.pt)")
    try:
        parts = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch's own message advises weights_only=False: not for a file of unknown origin
        raise DetectorError(
            f"{path}: not a detector file of this project (loading it as one failed: {type(e).__name__}). "
            "Detector files are written by stage=svm as <out>/svm/detector.pt"
        ) from None
    if not isinstance(parts, dict):
        raise DetectorError(f"{path}: not a detector file")
    try:
        return check_parts(parts)
    except DetectorError as e:
        raise DetectorError(f"{path}: {e}") from None


def write_detector(path: str | Path, parts: dict) -> Path:
    """Write ``parts`` (with this format's name and version) atomically to ``path``."""
    from .store import torch_save

    return torch_save(path, {**parts, "format": FORMAT, "version": VERSION})
