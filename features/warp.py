"""R-CNN's warped region crops with context padding.

Each box is enlarged about its centre so that, once warped to ``size x size``, ``padding`` pixels of
context surround it on every side: the scale is ``size / (size - 2 * padding)`` in each direction
(16 px at 224 -> x 224/192). Output pixel centres map uniformly onto the enlarged box and are sampled
bilinearly (no antialiasing) from the normalised image; a centre that falls outside the image gets the
mean, which is 0 after normalisation.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from .backbone import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["context_boxes", "normalize_image", "shrink_image", "warp_crops"]


def context_boxes(boxes: torch.Tensor, size: int = 224, padding: int = 16) -> torch.Tensor:
    """``[N, 4]`` xyxy -> the enlarged ``[N, 4]`` boxes whose warp leaves ``padding`` px of context."""
    scale = size / (size - 2 * padding)
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    half = (boxes[:, 2:] - boxes[:, :2]) / 2 * scale
    return torch.cat([centre - half, centre + half], dim=1)


def shrink_image(rgb: np.ndarray, max_side: int | None) -> tuple[np.ndarray, np.ndarray]:
    """``rgb`` shrunk by area averaging so that its longer side is ``max_side`` where it is longer (never
    enlarged; None: no limit), and the ``[4]`` factors that map its xyxy pixel coordinates there."""
    h, w = rgb.shape[:2]
    if not max_side or max(h, w) <= max_side:
        return rgb, np.ones(4, np.float32)
    scale = max_side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    sx, sy = size[0] / w, size[1] / h
    return cv2.resize(rgb, size, interpolation=cv2.INTER_AREA), np.array([sx, sy, sx, sy], np.float32)


def normalize_image(rgb: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 ``[H, W, 3]`` -> float ``[3, H, W]`` on ``device``, normalised with ImageNet's mean and std
    (the uint8 image is copied there first: a quarter of the bytes)."""
    rgb = np.ascontiguousarray(rgb)
    if not rgb.flags.writeable:  # np.asarray(PIL image) is read-only; torch warns on sharing such memory
        rgb = rgb.copy()
    x = torch.from_numpy(rgb).to(device).permute(2, 0, 1).float().div_(255)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(3, 1, 1)
    return (x - mean) / std


def warp_crops(image: torch.Tensor, boxes: torch.Tensor, size: int = 224, padding: int = 16) -> torch.Tensor:
    """Context-padded warps of ``boxes [N, 4]`` (pixel xyxy) from a normalised ``image [3, H, W]``.

    Returns ``[N, 3, size, size]``. Boxes may extend past the image (the outside is mean-filled).
    """
    n = boxes.shape[0]
    _, h, w = image.shape
    if n == 0:
        return image.new_zeros((0, 3, size, size))
    e = context_boxes(boxes.to(image.dtype), size, padding)
    steps = (torch.arange(size, dtype=image.dtype, device=image.device) + 0.5) / size  # [S]
    xs = e[:, 0:1] + steps[None] * (e[:, 2:3] - e[:, 0:1])  # [N, S] continuous x of output columns
    ys = e[:, 1:2] + steps[None] * (e[:, 3:4] - e[:, 1:2])  # [N, S] continuous y of output rows
    # grid_sample(align_corners=False): continuous x maps to 2x/W - 1.
    gx = (2 * xs / w - 1)[:, None, :].expand(n, size, size)
    gy = (2 * ys / h - 1)[:, :, None].expand(n, size, size)
    grid = torch.stack([gx, gy], dim=-1).reshape(1, n * size, size, 2)
    out = F.grid_sample(image[None], grid, mode="bilinear", padding_mode="border", align_corners=False)
    out = out.view(3, n, size, size).transpose(0, 1)
    inside = ((xs >= 0) & (xs <= w))[:, None, :] & ((ys >= 0) & (ys <= h))[:, :, None]  # [N, S, S]
    return out * inside[:, None].to(out.dtype)
