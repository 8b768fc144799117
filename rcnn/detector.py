"""The trained detector: one file holding everything needed to detect objects in a new image
(its format and reading/writing: :mod:`rcnn.detector_file`).

Use::

    det = Detector.load("data/runs/demo/svm/detector.pt")
    result = det("photo.jpg")          # or an RGB uint8 array
    result.boxes, result.scores, result.labels, result.names
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from . import boxes as B
from .boxes import RCNN_NMS_IOU, postprocess
from .detector_file import FORMAT, VERSION, DetectorError, check_parts, read_detector, write_detector

__all__ = ["Detector", "ImageDetections", "postprocess", "FORMAT", "VERSION", "DetectorError"]


@dataclass(frozen=True)
class ImageDetections:
    """One image's detections, best score first: boxes float32 ``[K, 4]`` (continuous xyxy pixels),
    scores ``[K]`` (SVM margins, or probabilities from a detector that scores with its fine-tuned classifier),
    labels int64 ``[K]`` and their class names."""

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    names: list[str]

    def __len__(self) -> int:
        return len(self.scores)


class Detector:
    """A loaded detector file; call it on an image (path or RGB uint8 array)."""

    def __init__(self, parts: dict, device: str = "auto", scores: str | None = None):
        check_parts(parts)
        self.parts = parts
        self.classes: list[str] = list(parts["classes"])
        has_svms = parts.get("svm_w") is not None  # not when trained with svm.classifiers=false
        self.svm_w = parts["svm_w"].numpy().astype(np.float32) if has_svms else None
        self.svm_b = parts["svm_b"].numpy().astype(np.float64) if has_svms else None
        self.reg_w = parts["reg_w"].numpy().astype(np.float32) if parts.get("reg_w") is not None else None
        self.reg_b = parts["reg_b"].numpy().astype(np.float32) if parts.get("reg_b") is not None else None
        # [D, C * 4]: every class's regressors in one matrix product (np.einsum over [C, D, 4] does not use
        # BLAS: 2 s against 25 ms for 1,900 boxes and 80 classes)
        self._reg_matrix = None if self.reg_w is None else np.ascontiguousarray(
            self.reg_w.transpose(1, 0, 2).reshape(self.reg_w.shape[1], -1))  # fmt: skip
        self.features_cfg: dict = dict(parts["features"])
        classifier = parts.get("classifier")  # the fine-tuned network's (N+1)-way softmax, when it had one
        scores = scores or parts.get("scores", "svm")  # (None: what its training run scored with)
        if scores not in ("svm", "softmax"):
            raise DetectorError(f"scores must be svm or softmax, got {scores!r}")
        if scores == "softmax" and classifier is None:
            raise DetectorError("detect.scores=softmax needs the fine-tuned network's classifier; this detector's "
                                "features were not fine-tuned (finetune.enabled=true), so use detect.scores=svm")  # fmt: skip
        if scores == "svm" and not has_svms:
            raise DetectorError("detect.scores=svm: this detector has no SVMs (it was trained with svm.classifiers=false "
                                "and scores with the fine-tuned classifier): use detect.scores=softmax or null")  # fmt: skip
        self.scores = scores
        # its NMS overlap of each class where detect.nms_iou is null: from its training objects' overlaps
        # (rcnn.recipe.training_nms_iou); files from before: R-CNN's for every class
        own = parts.get("nms_iou", RCNN_NMS_IOU)
        self.nms_iou: tuple[float, ...] = tuple(float(t) for t in own) if np.ndim(own) else (float(own),) * len(self.classes)
        self.cls_w = classifier["weight"].numpy().astype(np.float32) if classifier is not None else None
        self.cls_b = classifier["bias"].numpy().astype(np.float64) if classifier is not None else None
        self._device_name = device
        self._model = None
        self._multibox = None
        self.path: Path | None = None  # the file it was loaded from

    # -- file -----------------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | Path, device: str = "auto", scores: str | None = None) -> "Detector":
        parts = read_detector(path)
        try:
            det = cls(parts, device, scores)
        except DetectorError as e:
            raise DetectorError(f"{path}: {e}") from None
        det.path = Path(path)
        return det

    def save(self, path: str | Path) -> Path:
        return write_detector(path, self.parts)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def has_regression(self) -> bool:
        return self.reg_w is not None

    @property
    def features_key(self) -> str | None:
        return self.parts.get("features_key")

    # -- the pieces -----------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        from features.backbone import resolve_device

        return resolve_device(self._device_name)

    def _network(self):
        if self._model is None:
            from features.backbone import fold_batchnorm, googlenet_from_state
            from features.extract import RegionFeatures

            net = googlenet_from_state(self.parts["backbone"], self.parts["normalization"])
            model = RegionFeatures(fold_batchnorm(net), self.features_cfg["roi_layer"]).to(self.device)
            if self.features_cfg.get("channels_last", True):
                model = model.to(memory_format=torch.channels_last)
            self._model = model
        return self._model

    def features(self, rgb: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        """``[N, 1024]`` float16 features of ``boxes`` in ``rgb``, computed as the training features were."""
        from features.backbone import amp_dtype, autocast
        from features.extract import region_features

        fc, model, device = self.features_cfg, self._network(), self.device
        with autocast(amp_dtype(fc.get("precision", "fp32"), device), device):
            return region_features(model, rgb, boxes, fc, device)

    def proposals(self, rgb: np.ndarray, seed: int = 0) -> np.ndarray:
        """Boxes proposed in ``rgb`` the way the training proposals were made."""
        from proposals.selective_search import SSParams, selective_search
        from proposals.stage import combine, top_boxes

        pc = self.parts["proposals"]
        h, w = rgb.shape[:2]
        ss = np.zeros((0, 4), np.float32)
        if pc.get("ss") is not None:
            params = {k: tuple(v) if isinstance(v, list) else v for k, v in pc["ss"].items()}
            ss, _ = selective_search(rgb, SSParams(**params), seed=seed)
            if pc.get("top_n"):
                ss = ss[: pc["top_n"]]
        if pc.get("multibox") is None:
            return ss
        from proposals.multibox import load_model, predict, warp_image

        mb = pc["multibox"]
        if self._multibox is None:
            self._multibox = load_model(mb).to(self.device)
        with torch.inference_mode():
            boxes, scores = predict(self._multibox, warp_image(rgb, mb["input_size"])[None])
        mb_boxes, mb_scores = top_boxes(boxes[0], scores[0], mb["top_k"], w, h)
        if pc.get("ss") is None:
            return mb_boxes
        return combine(ss, mb_boxes, mb_scores, pc["merge_iou"])["boxes"]

    def score(self, feats: np.ndarray) -> np.ndarray:
        """Scores ``[N, C]`` of raw (cached) features ``[N, D]``: the SVMs' (``-inf`` for untrained classes)
        or, with ``scores="softmax"``, the fine-tuned classifier's probability of each class (background,
        its first output, left out)."""
        x = np.asarray(feats, np.float32)
        if self.scores == "softmax":
            from scipy.special import softmax

            return softmax(x @ self.cls_w.T + self.cls_b, axis=1)[:, 1:]
        return x @ self.svm_w.T + self.svm_b

    def deltas(self, feats: np.ndarray) -> np.ndarray | None:
        """Box regression deltas ``[N, C, 4]``, or None without regressors."""
        if self.reg_w is None:
            return None
        x = np.asarray(feats, np.float32)
        return (x @ self._reg_matrix).reshape(len(x), *self.reg_b.shape) + self.reg_b

    def __call__(
        self, image, boxes: np.ndarray | None = None, nms_iou: float | None = None, max_per_image: int | None = None,
        box_regression: bool = True, score_threshold: float | None = None, max_per_class: int | None = 100,
    ) -> ImageDetections:  # fmt: skip
        """Detect objects in ``image`` (a path or an RGB uint8 ``[H, W, 3]`` array), on ``boxes`` when
        given, else on proposals made as in training. The limits are :func:`postprocess`'s; ``nms_iou`` None:
        the detector's own (:attr:`nms_iou`)."""
        return detect_image([self], image, boxes, nms_iou, max_per_image, box_regression, score_threshold, max_per_class)


def _as_rgb(image) -> np.ndarray:
    if isinstance(image, (str, Path)):
        from .datasets.base import read_image

        return read_image(image, orient=True)  # as a viewer shows the photo
    rgb = np.asarray(image)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected an RGB uint8 [H, W, 3] image array, got {rgb.dtype} {list(rgb.shape)}")
    return rgb


def check_ensemble(members: Sequence[Detector]) -> None:
    """Detectors whose scores are averaged must share their classes and the kind of their scores."""
    for m in members[1:]:
        if m.classes != members[0].classes:
            raise DetectorError(f"{m.path or 'a detector'}: its classes differ from the ensemble's first detector's")
        if m.scores != members[0].scores:
            raise DetectorError(f"{m.path or 'a detector'}: scores with {m.scores}, the ensemble's first detector with "
                                f"{members[0].scores}: set detect.scores for all of them")  # fmt: skip


def ensemble_outputs(
    members: Sequence[Detector], rgb: np.ndarray, boxes: np.ndarray, feats: Sequence[np.ndarray | None] = (),
    box_regression: bool = True,
) -> tuple[np.ndarray, np.ndarray | None]:  # fmt: skip
    """Scores ``[N, C]`` averaged over the members (the GoogLeNet entry's ensemble) and their box
    regression deltas averaged too (None when any member has none or ``box_regression`` is off).
    ``feats[k]``, when given, are member ``k``'s features of ``boxes`` (e.g. from the cache)."""
    check_ensemble(members)
    scores, deltas = 0.0, []
    for k, m in enumerate(members):
        f = feats[k] if k < len(feats) and feats[k] is not None else m.features(rgb, boxes)
        scores = scores + m.score(f)
        deltas.append(m.deltas(f) if box_regression else None)
    mean_deltas = None if any(d is None for d in deltas) else sum(deltas) / len(deltas)
    return scores / len(members), mean_deltas


def detect_image(
    members: Sequence[Detector], image, boxes: np.ndarray | None = None, nms_iou: float | None = None,
    max_per_image: int | None = None, box_regression: bool = True, score_threshold: float | None = None,
    max_per_class: int | None = 100,
) -> ImageDetections:  # fmt: skip
    """One image through one detector or an ensemble (proposals from the first member; ``nms_iou`` None: its)."""
    rgb = _as_rgb(image)
    nms_iou = members[0].nms_iou if nms_iou is None else nms_iou
    h, w = rgb.shape[:2]
    boxes = members[0].proposals(rgb) if boxes is None else B.as_boxes(boxes)
    scores, deltas = ensemble_outputs(members, rgb, boxes, box_regression=box_regression)
    out_boxes, out_scores, labels = postprocess(boxes, scores, deltas, w, h, nms_iou, max_per_image, score_threshold, max_per_class)
    return ImageDetections(out_boxes, out_scores, labels, [members[0].classes[i] for i in labels])
