"""Region features: the 1024-d global average pool of GoogLeNet, per proposal.

* warp mode (R-CNN): every proposal is cropped with context padding, warped to ``size x size`` and
  run through the whole network.
* roi mode (beyond R-CNN, as Fast R-CNN): the image runs once through the network up to a split
  layer (``inception4e``, stride 16; ``inception5a`` or ``inception5b``, stride 32); each proposal's
  context-padded box is pooled from that map with ``torchvision.ops.roi_align`` to the map size a
  warped crop would have there (14 or 7 cells at 224), and only the layers after the split, then the
  average pool, run per region.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torchvision.models import GoogLeNet
from torchvision.ops import roi_align

from rcnn.config import GOOGLENET_LAYERS

from .warp import context_boxes, normalize_image, shrink_image, warp_crops

__all__ = ["RegionFeatures", "region_features", "features_warp", "features_roi", "warp_batch", "FEATURE_DIM"]

FEATURE_DIM = 1024
SPLITS = {"inception4e": 16, "inception5a": 32, "inception5b": 32}  # split layer -> its stride


class RegionFeatures(nn.Module):
    """GoogLeNet split after ``split``: ``stem`` (image -> map at that layer) and ``head`` (the rest,
    then the global average pool -> ``[N, 1024]``). ``forward`` runs both: a crop's feature."""

    def __init__(self, net: GoogLeNet, split: str = "inception4e"):
        super().__init__()
        if split not in SPLITS:
            raise ValueError(f"features.roi_layer must be one of {', '.join(SPLITS)}, got {split!r}")
        self.net = net.eval()
        self.split = split
        cut = GOOGLENET_LAYERS.index(split) + 1
        self._stem, self._head = GOOGLENET_LAYERS[:cut], GOOGLENET_LAYERS[cut:]

    @property
    def stride(self) -> int:
        return SPLITS[self.split]

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        if self.net.transform_input:
            x = self.net._transform_input(x)
        for name in self._stem:
            x = getattr(self.net, name)(x)
        return x

    def head(self, x: torch.Tensor) -> torch.Tensor:
        for name in self._head:
            x = getattr(self.net, name)(x)
        return torch.flatten(self.net.avgpool(x), 1)

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        return self.head(self.stem(crops))


def _to_numpy16(chunks: list[torch.Tensor]) -> np.ndarray:
    if not chunks:
        return np.zeros((0, FEATURE_DIM), np.float16)
    return torch.cat(chunks).float().cpu().numpy().astype(np.float16)


def warp_batch(requested: int | None, device: torch.device | str) -> int:
    """Crops per forward pass: ``features.batch_size``, or when null 256 on a GPU (launch-bound below:
    1.4-2.8x the crops/s of batch 64 on an H200) and 64 on a CPU."""
    if requested:
        return int(requested)
    return 256 if torch.device(device).type == "cuda" else 64


@torch.inference_mode()
def features_warp(
    model: RegionFeatures, rgb: np.ndarray, boxes: np.ndarray, size: int = 224, padding: int = 16,
    batch_size: int | None = None, channels_last: bool = True, device: torch.device | str = "cpu",
) -> np.ndarray:  # fmt: skip
    """``[N, 1024]`` float16 features of ``boxes [N, 4]`` (pixel xyxy) of one RGB uint8 image."""
    batch_size = warp_batch(batch_size, device)
    image = normalize_image(rgb, device)
    b = torch.as_tensor(np.asarray(boxes, np.float32).reshape(-1, 4)).to(device)
    out = []
    for start in range(0, len(b), batch_size):
        crops = warp_crops(image, b[start : start + batch_size], size, padding)
        if channels_last:
            crops = crops.contiguous(memory_format=torch.channels_last)
        out.append(model(crops))
    return _to_numpy16(out)


def roi_scale(h: int, w: int, image_size: int = 600, max_size: int | None = 1000) -> float:
    """The roi mode's image scale: the shorter side to ``image_size``, unless the longer side would then
    pass ``max_size`` (Fast R-CNN's rule, so that a panorama cannot exhaust memory)."""
    scale = image_size / min(h, w)
    return min(scale, max_size / max(h, w)) if max_size else scale


@torch.inference_mode()
def features_roi(
    model: RegionFeatures, rgb: np.ndarray, boxes: np.ndarray, size: int = 224, padding: int = 16,
    image_size: int = 600, batch_size: int = 256, channels_last: bool = True, device: torch.device | str = "cpu",
    max_size: int | None = 1000,
) -> np.ndarray:  # fmt: skip
    """Like :func:`features_warp` from one pass over the image, scaled by :func:`roi_scale`."""
    h, w = rgb.shape[:2]
    scale = roi_scale(h, w, image_size, max_size)
    image = normalize_image(rgb, device)[None]
    if scale != 1:
        image = nn.functional.interpolate(image, scale_factor=scale, mode="bilinear", align_corners=False)
    if channels_last:
        image = image.contiguous(memory_format=torch.channels_last)
    fmap = model.stem(image)  # [1, C, H/stride, W/stride]
    stride = image.shape[-1] / fmap.shape[-1]
    b = context_boxes(torch.as_tensor(np.asarray(boxes, np.float32).reshape(-1, 4)), size, padding).to(device) * scale
    cells = size // model.stride  # the stem's map size for one warped crop (14 or 7 at 224)
    out = []
    for start in range(0, len(b), batch_size):
        chunk = b[start : start + batch_size]
        rois = torch.cat([chunk.new_zeros(len(chunk), 1), chunk], dim=1)
        pooled = roi_align(fmap, rois, (cells, cells), spatial_scale=1 / stride, sampling_ratio=2, aligned=True)
        out.append(model.head(pooled))
    return _to_numpy16(out)


def region_features(model: RegionFeatures, rgb: np.ndarray, boxes: np.ndarray, fc, device) -> np.ndarray:
    """``[N, 1024]`` float16 features of ``boxes`` in ``fc``'s mode, the one place warp and roi part ways:
    ``fc`` is the ``features`` settings, a config node (the stage) or a plain dict (a detector file's, whose
    older versions may lack ``channels_last``, ``batch_size`` or ``roi_max_size``: their defaults then)."""
    get = fc.get if isinstance(fc, dict) else lambda k, default=None: getattr(fc, k, default)
    mode = getattr(get("mode"), "value", get("mode"))
    channels_last = get("channels_last", True)
    if mode == "warp":  # (from the image shrunk to features.max_side where it is larger)
        rgb, scale = shrink_image(rgb, get("max_side"))
        boxes = np.asarray(boxes, np.float32).reshape(-1, 4) * scale
        return features_warp(model, rgb, boxes, get("input_size"), get("padding"), get("batch_size"), channels_last, device)
    return features_roi(model, rgb, boxes, get("input_size"), get("padding"), get("roi_image_size"),
                        channels_last=channels_last, device=device, max_size=get("roi_max_size"))  # fmt: skip
