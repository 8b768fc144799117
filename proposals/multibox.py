"""MultiBox (Erhan et al., CVPR 2014): K class-agnostic boxes and objectness scores from one network.

A GoogLeNet trunk sees the whole image warped to ``S x S`` and a linear head predicts, for each of K
priors, a residual to the prior's corners (normalised to the image) and a logit. Priors are k-means
centres of the training boxes. Training matches predictions to ground truth per image with the
Hungarian algorithm on the objective's own cost, then minimises

    alpha * 0.5 * sum_matched ||l_i - g_j||^2  +  sum_i BCE(c_i, matched_i)

averaged over the images of the batch.

Under torchrun training is data-parallel (``DistributedDataParallel``): each rank computes a contiguous part
of every batch (the same flips), BatchNorm takes the whole batch's statistics, each rank's loss is its
images' share of the batch's mean; rank 0 writes the checkpoints.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from sklearn.cluster import KMeans
from torch import nn
from tqdm import tqdm

from features.backbone import (
    BackboneError,
    LoadedWeights,
    build_googlenet,
    googlenet_from_state,
    trunk,
)
from features.pretrain_data import to_input
from rcnn import distributed
from rcnn.store import torch_save
from rcnn.training import check_loss
from rcnn.viz import plot_history

__all__ = [
    "cluster_priors",
    "MultiBoxNet",
    "hungarian_match",
    "multibox_loss",
    "warp_image",
    "train_multibox",
    "heldout_recall",
    "predict",
    "load_model",
    "export_model",
]

log = logging.getLogger("proposals.multibox")


def cluster_priors(boxes: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """K priors: k-means centres of normalised training boxes ``[N, 4]`` -> ``[k, 4]`` float32.

    With fewer distinct boxes than ``k``, every distinct box is a prior (and fewer are returned).
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    distinct = np.unique(boxes, axis=0)
    if len(distinct) == 0:
        raise ValueError("no training boxes to cluster into MultiBox priors")
    if len(distinct) <= k:
        if len(distinct) < k:
            log.warning("only %d distinct training boxes: using %d priors instead of %d", len(distinct), len(distinct), k)
        return distinct.astype(np.float32)
    km = KMeans(n_clusters=k, n_init=4, random_state=seed).fit(boxes)
    centres = km.cluster_centers_
    order = np.lexsort((centres[:, 1], centres[:, 0]))  # a stable order, independent of k-means' labels
    return centres[order].astype(np.float32)


class MultiBoxNet(nn.Module):
    """GoogLeNet trunk + linear head: ``x [B, 3, S, S]`` -> ``(boxes [B, K, 4], logits [B, K])``.

    Boxes are ``(x1, y1, x2, y2)`` normalised to the image: priors plus predicted residuals.
    """

    def __init__(self, backbone: nn.Module, priors: torch.Tensor, positives_per_image: float = 5.0):
        super().__init__()
        self.trunk = trunk(backbone)
        k = priors.shape[0]
        self.register_buffer("priors", priors.float().clone())
        self.head = nn.Linear(1024, k * 5)
        nn.init.normal_(self.head.weight, std=1e-4)  # pooled features have norms ~100: residuals ~0.01
        nn.init.zeros_(self.head.bias)
        with torch.no_grad():  # start at the priors, with the base rate of a prior being matched
            p = min(max(positives_per_image / k, 1e-3), 0.5)
            self.head.bias.view(k, 5)[:, 4] = float(np.log(p / (1 - p)))

    @property
    def num_priors(self) -> int:
        return self.priors.shape[0]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.head(self.trunk(x)).view(x.shape[0], -1, 5)
        return self.priors + out[..., :4], out[..., 4]


def hungarian_match(boxes: torch.Tensor, logits: torch.Tensor, gt: torch.Tensor, alpha: float):
    """Assignment of predictions to ground truth minimising the MultiBox objective.

    Matching prediction i to box j changes the objective by ``alpha * 0.5 * ||l_i - g_j||^2`` plus
    ``BCE(c_i, 1) - BCE(c_i, 0) = -c_i``. Args: boxes [K, 4], logits [K], gt [G, 4].
    Returns (prediction indices, gt indices), each [min(K, G)] int64.
    """
    if len(gt) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    with torch.no_grad():
        cost = alpha * 0.5 * torch.cdist(boxes.double(), gt.double()).square() - logits.double()[:, None]
    rows, cols = linear_sum_assignment(cost.cpu().numpy())
    return rows.astype(np.int64), cols.astype(np.int64)


def multibox_loss(boxes, logits, gts: Sequence[torch.Tensor], alpha: float, count: int | None = None):
    """``(loss, location part, confidence part)``, each summed over the images and divided by ``count``
    (default: the images; a rank passes the global batch's)."""
    loc = boxes.new_zeros(())
    targets = torch.zeros_like(logits)
    for b, gt in enumerate(gts):
        rows, cols = hungarian_match(boxes[b], logits[b], gt, alpha)
        if len(rows):
            loc = loc + 0.5 * (boxes[b, rows] - gt[cols]).square().sum()
            targets[b, rows] = 1.0
    conf = F.binary_cross_entropy_with_logits(logits, targets, reduction="sum")
    n = max(len(gts) if count is None else count, 1)
    return (alpha * loc + conf) / n, loc.detach() / n, conf.detach() / n


def warp_image(rgb: np.ndarray, size: int) -> np.ndarray:
    """The whole image resized to ``size x size`` (uint8 HWC): MultiBox's input."""
    h, w = rgb.shape[:2]
    interp = cv2.INTER_AREA if (h > size or w > size) else cv2.INTER_LINEAR
    return cv2.resize(rgb, (size, size), interpolation=interp)


def _to_input(batch_u8: torch.Tensor) -> torch.Tensor:
    """uint8 [B, S, S, 3] -> normalised float [B, 3, S, S] (channels_last), as every network input here."""
    return to_input(batch_u8.permute(0, 3, 1, 2))


@dataclass
class TrainState:
    epoch: int = 0
    history: list[dict] = field(default_factory=list)  # one {"epoch", "loss", "loc", "conf"[, "recall_50"]} per epoch
    seconds: float = 0.0  # training time of every epoch so far, across resumes
    epochs_before: int = 0  # epochs found done in the checkpoint when this process started
    best_epoch: int = 0  # with a held-out set: the epoch of the best held-out recall so far (its weights are kept)
    best_recall: float = -1.0

    def stalled(self, patience: int | None) -> bool:
        """Whether the held-out recall has not risen for ``patience`` epochs (never without a patience)."""
        return patience is not None and self.epoch - self.best_epoch >= patience


def _save(path: Path, model: MultiBoxNet, opt, sched, state: TrainState, extra: dict) -> None:
    payload = {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "epoch": state.epoch,
        "history": state.history,
        "seconds": state.seconds,
        "best_epoch": state.best_epoch,
        "best_recall": state.best_recall,
        **extra,
    }
    torch_save(path, payload)


def train_multibox(
    images: np.ndarray,
    gts: Sequence[np.ndarray],
    priors: np.ndarray,
    cfg,
    weights: LoadedWeights,
    checkpoint: Path,
    seed: int = 0,
    progress: bool = True,
    on_epoch: Callable[[TrainState], None] | None = None,
    device: torch.device | str = "cpu",
    heldout: tuple[np.ndarray, Sequence[np.ndarray]] | None = None,
) -> tuple[MultiBoxNet, TrainState]:
    """Train (or resume from ``checkpoint``) on warped images ``uint8 [N, S, S, 3]`` and normalised
    ground truth (``[G_i, 4]`` per image) on ``device``. Saves the checkpoint atomically after every epoch
    (under torchrun: every rank trains, rank 0 saves).

    With ``heldout`` (images and ground truth as above, not trained on) and ``cfg.patience``, each epoch ends
    with :func:`heldout_recall` of its ``cfg.top_k`` boxes; training stops once it has not risen for
    ``cfg.patience`` epochs, and the returned model has the best epoch's weights (also what the checkpoint's
    ``best_model`` holds)."""
    torch.manual_seed(seed)
    device = torch.device(device)
    backbone, _ = build_googlenet(weights)
    positives = float(np.mean([len(g) for g in gts])) if len(gts) else 1.0
    model = MultiBoxNet(backbone, torch.from_numpy(priors), positives)
    model = distributed.sync_batchnorm(model, device).to(device, memory_format=torch.channels_last)
    forward = distributed.data_parallel(model, device)
    lead = distributed.rank() == 0
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(cfg.epochs, 1))
    state, best_model = TrainState(), None
    if checkpoint.exists():
        ck = torch.load(checkpoint, map_location="cpu", weights_only=False)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        state = TrainState(ck["epoch"], ck["history"], ck.get("seconds", 0.0), ck["epoch"], ck.get("best_epoch", 0),
                           ck.get("best_recall", -1.0))  # fmt: skip
        best_model = ck.get("best_model")
        log.info("resuming MultiBox training at epoch %d of %d", state.epoch + 1, cfg.epochs)
    distributed.barrier()  # every rank has read the checkpoint before rank 0 writes the next
    data = torch.from_numpy(images)
    gt_t = [torch.from_numpy(np.asarray(g, np.float32).reshape(-1, 4)).to(device) for g in gts]
    gen = torch.Generator().manual_seed(seed)
    bar = tqdm(total=cfg.epochs, initial=state.epoch, desc="multibox", unit="epoch", disable=not progress or not lead)
    patience = cfg.patience if heldout is not None else None
    while state.epoch < cfg.epochs and not state.stalled(patience):
        epoch_start = time.perf_counter()
        torch.manual_seed(seed + state.epoch)  # a resumed epoch draws what an uninterrupted one would
        gen.manual_seed(seed + state.epoch)
        model.train()
        order = torch.randperm(len(data), generator=gen)
        sums = np.zeros(3)
        for start in range(0, len(order), cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            batch, targets = data[idx], [gt_t[i] for i in idx.tolist()]
            if cfg.flip:
                flip = torch.rand(len(idx), generator=gen) < 0.5
                batch = torch.where(flip.view(-1, 1, 1, 1), batch.flip(2), batch)
                targets = [_flip_boxes(t) if f else t for t, f in zip(targets, flip.tolist())]
            mine = distributed.part(len(idx))  # this rank's images of the batch (all in one process)
            boxes, logits = forward(_to_input(batch[mine].to(device)))
            if not (torch.isfinite(boxes).all() and torch.isfinite(logits).all()):  # the matching would fail on them
                check_loss(math.nan, "MultiBox training", f"epoch {state.epoch + 1} (predictions no longer finite)",
                           "multibox.lr", cfg.lr, checkpoint)  # fmt: skip
            # This rank's share of the batch's mean loss, times the ranks: DDP averages their gradients.
            loss, loc, conf = multibox_loss(boxes, logits, targets[mine], cfg.alpha, count=len(idx))
            opt.zero_grad(set_to_none=True)
            (loss * distributed.world_size()).backward()
            opt.step()
            parts = distributed.all_sum(torch.stack([loss.detach(), loc, conf]).double().cpu())
            sums += parts.numpy() * len(idx)
        sched.step()
        state.epoch += 1
        state.seconds += time.perf_counter() - epoch_start
        mean = sums / len(data)
        check_loss(float(mean[0]), "MultiBox training", f"epoch {state.epoch}", "multibox.lr", cfg.lr, checkpoint)
        state.history.append({"epoch": state.epoch, "loss": mean[0], "loc": mean[1], "conf": mean[2]})
        if patience is not None:
            recall = heldout_recall(model, heldout[0], heldout[1], cfg.top_k)
            state.history[-1]["recall_50"] = recall
            if recall > state.best_recall:
                state.best_epoch, state.best_recall = state.epoch, recall
                best_model = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if lead:
            best = {"best_model": best_model} if patience is not None else {}
            _save(checkpoint, model, opt, sched, state, {"priors": priors, "normalization": weights.normalization, **best})
        bar.update()
        bar.set_postfix(loss=f"{mean[0]:.3f}")
        if on_epoch:
            on_epoch(state)
    bar.close()
    if patience is not None and best_model is not None:
        if state.stalled(patience):
            log.info("MultiBox: held-out recall@0.5 has not risen for %d epochs: stopped after epoch %d, the weights "
                     "of epoch %d (recall %.3f) kept", patience, state.epoch, state.best_epoch, state.best_recall)  # fmt: skip
        model.load_state_dict(best_model)
    return model.eval(), state


@torch.no_grad()
def heldout_recall(model: MultiBoxNet, images: np.ndarray, gts: Sequence[np.ndarray], top_k: int) -> float:
    """Recall@0.5 of the ``top_k`` best-scored boxes per image (``uint8 [N, S, S, 3]``) against the normalised
    ground truth (IoU is the same in normalised coordinates as in pixels)."""
    from .recall import best_overlaps

    was_training = model.training
    boxes, scores = predict(model, images)
    model.train(was_training)
    found = total = 0
    for b, s, g in zip(boxes, scores, gts):
        g = np.asarray(g, np.float32).reshape(-1, 4)
        top = b[np.argsort(-s, kind="stable")[:top_k]]
        found += int((best_overlaps(g, top) >= 0.5).sum())
        total += len(g)
    return found / max(total, 1)


def _flip_boxes(b: torch.Tensor) -> torch.Tensor:
    out = b.clone()
    out[:, 0], out[:, 2] = 1 - b[:, 2], 1 - b[:, 0]
    return out


def export_model(checkpoint: Path, path: Path) -> Path:
    """The trained model alone (the checkpoint less its optimizer state), written atomically."""
    ck = torch.load(checkpoint, map_location="cpu", weights_only=False)
    ck.pop("optimizer", None)
    ck.pop("scheduler", None)
    if ck.get("best_model") is not None:  # trained with a held-out set: the best epoch's weights
        ck["model"] = ck.pop("best_model")
    return torch_save(path, ck)


def load_model(source: Path | dict) -> MultiBoxNet:
    """A trained MultiBox model from its checkpoint file, or the checkpoint's ``{"model", "priors",
    "normalization"}`` dict (the architecture, priors and input normalisation included, is rebuilt)."""
    ck = source if isinstance(source, dict) else torch.load(source, map_location="cpu", weights_only=False)
    if "normalization" not in ck:
        raise BackboneError(f"{source if not isinstance(source, dict) else 'MultiBox model'}: no input normalization "
                            "stored (made by an older version); retrain it with stage=multibox")  # fmt: skip
    trunk_state = {k.removeprefix("trunk."): v for k, v in ck["model"].items() if k.startswith("trunk.")}
    backbone = googlenet_from_state(trunk_state, ck["normalization"])
    model = MultiBoxNet(backbone, torch.from_numpy(np.asarray(ck["priors"])))
    model.load_state_dict(ck["model"])
    return model.eval().to(memory_format=torch.channels_last)


@torch.no_grad()
def predict(model: MultiBoxNet, warped: np.ndarray, batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """``uint8 [N, S, S, 3]`` -> ``(boxes [N, K, 4] normalised and clipped to [0, 1], scores [N, K])``."""
    model.eval()
    device = model.priors.device
    boxes, scores = [], []
    for start in range(0, len(warped), batch_size):
        b, logit = model(_to_input(torch.from_numpy(warped[start : start + batch_size]).to(device)))
        boxes.append(b.clamp(0, 1).cpu())
        scores.append(torch.sigmoid(logit).cpu())
    if not boxes:
        return np.zeros((0, model.num_priors, 4), np.float32), np.zeros((0, model.num_priors), np.float32)
    return torch.cat(boxes).numpy(), torch.cat(scores).numpy()


def plot_loss(history: list[dict], path: Path) -> Path:
    series = {"loss": "total", "conf": "confidence (BCE)", "loc": "location (0.5 L2, before alpha)"}
    return plot_history(history, "epoch", series, path, "MultiBox training", "loss per image")
