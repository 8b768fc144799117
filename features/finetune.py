"""Fine-tuning GoogLeNet on warped proposals: (N+1)-way softmax, as R-CNN fine-tuned its network.

Every training proposal (and ground-truth box) is labelled with the class of the ground-truth box it
overlaps most if that IoU is >= ``fg_iou`` (0.5), else background (label 0; classes are 1..N). Each
iteration draws ``fg_per_batch`` (32) foreground and ``batch_size - fg_per_batch`` (96) background
windows from all training images, warps them with context padding, flips half, and takes one SGD step
(lr 0.001, momentum 0.9, weight decay 0.0005, lr x 0.1 every ``step_size`` iterations). In roi mode the
windows of a batch come from ``roi_images_per_batch`` images, pooled from one pass over each.

Under torchrun the step is data-parallel (``DistributedDataParallel``): every rank draws the same batch
(and flips and dropout masks), computes the logits of its part of it (ordered by image, so a rank runs
few images in roi mode) and the gradients of its share of the batch's mean loss; averaged over the ranks
they are one process's gradients of the whole batch, up to the order of the sums. BatchNorm: frozen in roi
mode; in warp mode the whole batch's statistics (``rcnn.distributed.sync_batchnorm``: PyTorch's
``SyncBatchNorm`` on GPUs, ``CpuSyncBatchNorm`` over gloo on CPUs).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align

from rcnn import boxes as B
from rcnn import distributed
from rcnn.config import GOOGLENET_LAYERS
from rcnn.store import torch_save

from .backbone import amp_dtype, autocast
from .extract import RegionFeatures, roi_scale
from .warp import context_boxes, normalize_image, shrink_image, warp_crops

__all__ = ["Windows", "label_windows", "freeze_through", "FineTuner"]

log = logging.getLogger("features.finetune")


@dataclass
class Windows:
    """All training windows: image index [W], box [W, 4], label [W] (0 = background)."""

    image: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray

    def foreground(self) -> np.ndarray:
        return np.flatnonzero(self.labels > 0)

    def background(self) -> np.ndarray:
        return np.flatnonzero(self.labels == 0)


def label_windows(
    proposals: list[np.ndarray], gts: list[tuple[np.ndarray, np.ndarray]], fg_iou: float = 0.5
) -> Windows:
    """Label each image's proposals plus its ground-truth boxes (classes shifted to 1..N)."""
    image, boxes, labels = [], [], []
    for i, (props, (gt, gt_labels)) in enumerate(zip(proposals, gts)):
        win = np.concatenate([B.as_boxes(gt), B.as_boxes(props)])
        lab = np.zeros(len(win), np.int64)
        if len(gt):
            iou = B.iou(win, gt)
            best = iou.argmax(axis=1)
            fg = iou.max(axis=1) >= fg_iou
            lab[fg] = np.asarray(gt_labels)[best[fg]] + 1
        image.append(np.full(len(win), i))
        boxes.append(win)
        labels.append(lab)
    if not image:
        return Windows(np.zeros(0, np.int64), np.zeros((0, 4), np.float32), np.zeros(0, np.int64))
    return Windows(np.concatenate(image), np.concatenate(boxes).astype(np.float32), np.concatenate(labels))


class _ImageCache:
    """Normalised images by index, each with the ``[4]`` factors that map its boxes there (shrunk to ``max_side``
    where it is larger: :func:`~features.warp.shrink_image`), the most recently used kept while they fit in
    ``capacity`` bytes (the last one loaded always)."""

    def __init__(self, load: Callable[[int], np.ndarray], capacity: int, device: torch.device, max_side: int | None = None):
        self.load, self.capacity, self.device, self.max_side = load, capacity, device, max_side
        self.items: OrderedDict[int, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.bytes = 0

    def __call__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if i in self.items:
            self.items.move_to_end(i)
            return self.items[i]
        rgb, scale = shrink_image(self.load(i), self.max_side)
        self.items[i] = item = normalize_image(rgb, self.device), torch.from_numpy(scale).to(self.device)
        self.bytes += item[0].nbytes
        while self.bytes > self.capacity and len(self.items) > 1:
            _, (image, _) = self.items.popitem(last=False)
            self.bytes -= image.nbytes
        return item


def flip_boxes(boxes: torch.Tensor, width: float) -> torch.Tensor:
    """Continuous xyxy boxes of an image of ``width`` mirrored left-right."""
    return torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], 1)


def freeze_through(net: nn.Module, layer: str | None) -> list[nn.Module]:
    """Keep the weights of ``net``'s layers up to and including ``layer`` (``finetune.freeze``; None: none) as
    they are, as Fast R-CNN kept VGG's conv1-2 and detectron2 keeps its stem: the first layers' filters are
    generic, and their backward pass is the costliest part of a step at large spatial sizes. Returns the frozen
    layers; their BatchNorm statistics are frozen too (:meth:`FineTuner.step` keeps them in eval mode)."""
    if layer is None:
        return []
    if layer not in GOOGLENET_LAYERS:  # (the config says so before any work; this is for direct callers)
        raise ValueError(f"finetune.freeze must be null or one of GoogLeNet's layers ({', '.join(GOOGLENET_LAYERS)}); got {layer!r}")
    frozen = [getattr(net, name) for name in GOOGLENET_LAYERS[: GOOGLENET_LAYERS.index(layer) + 1]]
    for module in frozen:
        module.requires_grad_(False)
    return frozen


def param_groups(net: nn.Module, cfg) -> list[dict]:
    """SGD groups as R-CNN's fine-tuning prototxt: the new classifier (``net.fc``) at
    ``classifier_lr_mult`` x the base rate, every bias at ``bias_lr_mult`` x its layer's rate without
    weight decay, BatchNorm's scale and shift (which Caffe's GoogLeNet did not have) without weight
    decay, every other weight at the base rate with ``weight_decay``."""
    bn = {id(p) for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) for p in m.parameters()}
    head = {id(p) for p in net.fc.parameters()}
    groups: dict[tuple[float, float], list] = {}
    for name, p in net.named_parameters():
        if not p.requires_grad:
            continue
        mult = cfg.classifier_lr_mult if id(p) in head else 1.0
        if id(p) in bn:
            decay = 0.0
        elif name.endswith("bias"):
            mult, decay = mult * cfg.bias_lr_mult, 0.0
        else:
            decay = cfg.weight_decay
        groups.setdefault((mult, decay), []).append(p)
    return [{"params": ps, "lr": cfg.lr * mult, "lr_mult": mult, "weight_decay": decay} for (mult, decay), ps in groups.items()]


class _Logits(nn.Module):
    """A training batch's logits as one module call (``DistributedDataParallel`` wraps a module):
    ``(window indices, flips, dropout multipliers [n, 1024] or None) -> [n, N + 1]``."""

    def __init__(self, tuner: "FineTuner"):
        super().__init__()
        self.model = tuner.model
        self._features = tuner._features  # a method of the tuner: not a submodule

    def forward(self, idx: np.ndarray, flips: np.ndarray, keep: torch.Tensor | None) -> torch.Tensor:
        feats = self._features(idx, flips)
        return self.model.net.fc(feats if keep is None else feats * keep)


class FineTuner:
    """One fine-tuning run: the network, its classifier, the optimiser and the sampler's state."""

    def __init__(self, net, num_classes: int, windows: Windows, load_image: Callable[[int], np.ndarray], cfg, fcfg,
                 seed: int = 0, device: torch.device | str = "cpu"):  # fmt: skip
        self.cfg, self.fcfg = cfg, fcfg  # cfg: the finetune section; fcfg: the features section
        self.device = torch.device(device)
        self.amp = amp_dtype(fcfg.precision, self.device)  # bf16 where the CPU or GPU computes it natively
        self.model = RegionFeatures(net, fcfg.roi_layer.value if fcfg.mode.value == "roi" else "inception4e")
        self.model.net.fc = nn.Linear(1024, num_classes + 1)
        self.model.net.dropout = nn.Dropout(cfg.dropout)  # what inference sees (training draws its own masks)
        if fcfg.mode.value == "warp":  # under torchrun: the whole batch's statistics on every rank
            self.model = distributed.sync_batchnorm(self.model, self.device)
        self.model.to(self.device)
        self.frozen = freeze_through(self.model.net, cfg.freeze)
        self.logits = distributed.data_parallel(_Logits(self), self.device)
        self.windows = windows
        max_side = fcfg.max_side if fcfg.mode.value == "warp" else None  # (roi mode scales by roi_image_size)
        self.images = _ImageCache(load_image, cfg.image_cache_mb * 2**20, self.device, max_side)
        self.opt = torch.optim.SGD(param_groups(self.model.net, cfg), lr=cfg.lr, momentum=cfg.momentum)
        self.sched = torch.optim.lr_scheduler.StepLR(self.opt, step_size=cfg.step_size, gamma=0.1)
        # fp16 needs loss scaling (its gradients underflow to 0 otherwise); bf16 and fp32 do not
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp == torch.float16)
        self.seed = seed
        self.rng = np.random.default_rng(seed)
        self.iteration = 0
        self.seconds = 0.0  # time in step(), across resumes
        self.history: list[dict] = []
        self.fg, self.bg = windows.foreground(), windows.background()
        if len(self.fg) == 0 or len(self.bg) == 0:
            raise ValueError(
                f"fine-tuning needs foreground and background windows; found {len(self.fg)} and {len(self.bg)}"
            )

    # -- batches -----------------------------------------------------------------------------------

    def _draw(self, pool: np.ndarray, n: int, p: np.ndarray | None = None) -> np.ndarray:
        # weighted draws are with replacement: without, a rare class could fill no more than its windows
        return self.rng.choice(pool, size=n, replace=len(pool) < n or p is not None, p=p)

    def _class_weights(self, fg: np.ndarray) -> np.ndarray | None:
        """Probabilities of drawing each of the foreground windows ``fg``: ``n_c ** -fg_balance`` normalised
        (``n_c``: the windows of its class in ``fg``); None (uniform) when ``fg_balance`` is 0."""
        if not self.cfg.fg_balance:
            return None
        labels = self.windows.labels[fg]
        w = np.bincount(labels)[labels].astype(np.float64) ** -float(self.cfg.fg_balance)
        return w / w.sum()

    def sample(self, bg_candidates: int = 1) -> np.ndarray:
        """Window indices of one batch: ``fg_per_batch`` foreground then the rest background (``bg_candidates``
        times as many background draws, of which :meth:`hardest_background` keeps a batch's worth)."""
        c = self.cfg
        if self.fcfg.mode.value == "roi":  # windows of a few images, as Fast R-CNN
            chosen = self.rng.choice(np.unique(self.windows.image), size=c.roi_images_per_batch)
            in_images = np.isin(self.windows.image, chosen)
            fg, bg = self.fg[in_images[self.fg]], self.bg[in_images[self.bg]]
            fg = fg if len(fg) else self.fg
            bg = bg if len(bg) else self.bg
        else:
            fg, bg = self.fg, self.bg
        return np.concatenate(
            [self._draw(fg, c.fg_per_batch, self._class_weights(fg)),
             self._draw(bg, (c.batch_size - c.fg_per_batch) * bg_candidates)]
        )  # fmt: skip

    @torch.no_grad()
    def hardest_background(self, idx: np.ndarray, flips: np.ndarray) -> np.ndarray:
        """Positions in ``idx`` (``fg_per_batch`` foreground, then background candidates) of the foreground and
        of the ``batch_size - fg_per_batch`` candidates the network, as it is now, scores least as background
        (lowest log-probability; ties by draw order). Each rank scores its share of the candidates; every rank
        then holds all the scores and keeps the same windows."""
        c = self.cfg
        cand = np.arange(c.fg_per_batch, len(idx))
        mine = np.array_split(cand, distributed.world_size())[distributed.rank()]
        log_bg = torch.zeros(len(idx), dtype=torch.float64, device=self.device)
        self.model.eval()  # BatchNorm's running statistics, no dropout: the network as the features will see it
        with autocast(self.amp, self.device):
            logits = self.model.net.fc(self._features(idx[mine], flips[mine])).float()
        log_bg[torch.from_numpy(mine).to(self.device)] = logits.log_softmax(1)[:, 0].double()
        log_bg = distributed.all_sum(log_bg).cpu().numpy()
        hardest = cand[np.argsort(log_bg[cand], kind="stable")[: c.batch_size - c.fg_per_batch]]
        return np.concatenate([np.arange(c.fg_per_batch), np.sort(hardest)])

    def crops(self, idx: np.ndarray, flips: np.ndarray) -> torch.Tensor:
        """Warp mode: the context-padded crops ``[n, 3, size, size]`` (channels_last) of windows ``idx``, each
        flipped where ``flips``."""
        w, f, dev = self.windows, self.fcfg, self.device
        batch = torch.empty((len(idx), 3, f.input_size, f.input_size), device=dev)
        for i in np.unique(w.image[idx]):
            sel = np.flatnonzero(w.image[idx] == i)
            image, scale = self.images(int(i))
            batch[torch.from_numpy(sel).to(dev)] = warp_crops(
                image, torch.from_numpy(w.boxes[idx[sel]]).to(dev) * scale, f.input_size, f.padding
            )
        batch = torch.where(torch.from_numpy(flips).to(dev).view(-1, 1, 1, 1), batch.flip(3), batch)
        return batch.contiguous(memory_format=torch.channels_last)

    def _features(self, idx: np.ndarray, flips: np.ndarray) -> torch.Tensor:
        """The pooled 1024-d features of windows ``idx`` (each flipped where ``flips``)."""
        w, f, dev = self.windows, self.fcfg, self.device
        if f.mode.value == "warp":
            return self.model(self.crops(idx, flips))
        feats = torch.empty((len(idx), 1024), device=dev)
        cells = f.input_size // self.model.stride
        for i in np.unique(w.image[idx]):
            sel = np.flatnonzero(w.image[idx] == i)
            img, _ = self.images(int(i))  # (at full size in roi mode)
            boxes = torch.from_numpy(w.boxes[idx[sel]])
            if flips[sel[0]]:  # the whole image and its boxes (a step draws one flip per image in roi mode)
                img, boxes = img.flip(-1), flip_boxes(boxes, img.shape[-1])
            scale = roi_scale(*img.shape[1:], f.roi_image_size, f.roi_max_size)
            x = F.interpolate(img[None], scale_factor=scale, mode="bilinear", align_corners=False)
            fmap = self.model.stem(x)
            boxes = context_boxes(boxes, f.input_size, f.padding).to(dev) * scale
            rois = torch.cat([boxes.new_zeros(len(sel), 1), boxes], 1)
            pooled = roi_align(fmap, rois, (cells, cells), spatial_scale=fmap.shape[-1] / x.shape[-1], sampling_ratio=2, aligned=True)
            feats[torch.from_numpy(sel).to(dev)] = self.model.head(pooled).float()
        return feats

    def _local(self, idx: np.ndarray) -> np.ndarray:
        """The positions in batch ``idx`` this rank computes (all of them in one process): the batch
        ordered by image and cut into one contiguous part per rank."""
        order = np.argsort(self.windows.image[idx], kind="stable")
        return np.array_split(order, distributed.world_size())[distributed.rank()]

    def base_lr(self) -> float:
        """The base learning rate now (each group's is a multiple of it)."""
        group = self.opt.param_groups[0]
        return group["lr"] / group["lr_mult"]

    @torch.no_grad()
    def calibrate(self, batches: int = 8) -> None:
        """BatchNorm statistics from ``batches`` training batches (forward only), kept frozen afterwards:
        a randomly initialised network starts normalised, as it would under BatchNorm, and the features
        later see the same statistics as training did. Draws from its own generator (resumes unchanged)."""
        bns = [m for m in self.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        momenta = [m.momentum for m in bns]
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over the batches
        rng, self.rng = self.rng, np.random.default_rng(self.seed + 1)
        self.model.train()
        for _ in range(batches):
            idx = self.sample()
            with autocast(self.amp, self.device):
                self._features(idx, np.zeros(len(idx), bool))
        for m, momentum in zip(bns, momenta):
            m.momentum = momentum
        self.rng = rng
        self.model.eval()

    def train_mode(self) -> None:
        """The network as a step trains it: training mode, but BatchNorm frozen in roi mode and in frozen layers."""
        self.model.train()
        if self.fcfg.mode.value == "roi":
            for m in self.model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    # Frozen statistics (as detectron2's FrozenBatchNorm): in roi mode the network sees one
                    # image at a time, whose own statistics would train a network the features never see.
                    # (Warp mode's batches are crops of many images: BatchNorm trains as on ImageNet.)
                    m.eval()
        for m in self.frozen:
            m.eval()

    def step(self) -> dict:
        start = time.perf_counter()
        idx = self.sample(self.cfg.bg_candidates)
        flips = np.zeros(len(idx), bool)
        if self.cfg.flip and self.fcfg.mode.value == "roi":  # one flip per image: the image is flipped
            images, inverse = np.unique(self.windows.image[idx], return_inverse=True)
            flips = (self.rng.random(len(images)) < 0.5)[inverse]
        elif self.cfg.flip:
            flips = self.rng.random(len(idx)) < 0.5
        if self.cfg.bg_candidates > 1:
            chosen = self.hardest_background(idx, flips)
            idx, flips = idx[chosen], flips[chosen]
        self.train_mode()
        keep = self._dropout(len(idx))
        rows = self._local(idx)
        with autocast(self.amp, self.device):
            logits = self.logits(idx[rows], flips[rows], None if keep is None else keep[rows].to(self.device)).float()
        target = torch.from_numpy(self.windows.labels[idx[rows]]).to(self.device)
        # This rank's share of the batch's mean loss, times the ranks: their average is the batch's mean.
        loss_sum = F.cross_entropy(logits, target, reduction="sum")
        loss = loss_sum * (distributed.world_size() / len(idx))
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt)  # (skipped, and the scale lowered, where the scaled gradients overflowed)
        self.scaler.update()
        self.sched.step()
        self.iteration += 1
        batch = distributed.all_sum(torch.stack([loss_sum.detach(), (logits.argmax(1) == target).sum().float()]))
        loss_mean, acc = (batch / len(idx)).tolist()
        record = {"iteration": self.iteration, "loss": loss_mean, "accuracy": acc, "lr": self.base_lr()}
        self.history.append(record)
        self.seconds += time.perf_counter() - start
        return record

    def _dropout(self, n: int) -> torch.Tensor | None:
        """Inverted-dropout multipliers ``[n, 1024]`` for a batch of ``n`` windows (None without dropout):
        drawn for the whole batch from a generator seeded by the step, so a resumed run and every rank of a
        torchrun draw the same masks."""
        p = self.cfg.dropout
        if not p:
            return None
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.iteration)
        keep = (torch.rand(n, 1024, generator=g) >= p).float()
        return keep / (1 - p) if p < 1 else keep

    # -- checkpoints -------------------------------------------------------------------------------

    def save(self, path: Path) -> None:
        state = {
            "backbone": {k: v for k, v in self.model.net.state_dict().items() if not k.startswith("fc.")},
            "classifier": self.model.net.fc.state_dict(),
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": self.rng.bit_generator.state,
            "iteration": self.iteration,
            "history": self.history,
            "seconds": self.seconds,
        }
        torch_save(path, state)

    def load(self, path: Path) -> None:
        ck = torch.load(path, map_location=self.device, weights_only=False)
        self.model.net.load_state_dict({**ck["backbone"], **{f"fc.{k}": v for k, v in ck["classifier"].items()}})
        self.opt.load_state_dict(ck["optimizer"])
        self.sched.load_state_dict(ck["scheduler"])
        if ck.get("scaler"):
            self.scaler.load_state_dict(ck["scaler"])
        self.rng.bit_generator.state = ck["rng"]
        self.iteration, self.history = ck["iteration"], ck["history"]
        self.seconds = ck.get("seconds", 0.0)
