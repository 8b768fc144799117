"""``stage=pretrain``: GoogLeNet trained on an image-classification tree, as the paper trained it (section 6).

The network is torchvision's GoogLeNet (with BatchNorm) and both auxiliary classifiers, whose losses are
added with weight ``aux_weight`` (0.3) during training and which are dropped at inference; dropout
``dropout`` (0.4) before the main classifier and ``dropout_aux`` (0.7) in the auxiliary ones. SGD with
momentum 0.9; the published schedule lowers the learning rate 4% every 8 epochs (``schedule=step``),
``cosine`` and ``onecycle`` suit short CPU budgets. The final model is the Polyak (exponential moving)
average of the weights, its BatchNorm statistics recomputed on training crops.

Every step ``t`` of epoch ``e`` is a function of ``(seed, e, t)`` alone (the epoch's order, each sample's
augmentation, dropout), so a run killed anywhere resumes from its last checkpoint to the same weights as
an uninterrupted one.

Under torchrun the step is data-parallel (``DistributedDataParallel``): each rank loads and augments its
contiguous part of the global batch, dropout masks are drawn for the whole batch and cut to each rank's rows,
BatchNorm normalises with the whole batch's statistics (``rcnn.distributed.sync_batchnorm``) and each rank's
loss is its rows' share of the batch's mean: one process's step, computed in parts. Rank 0 writes the
checkpoints, tests the model and writes it.

Output (``<out>/pretrain/``): ``model.pt`` (``backbone``: the GoogLeNet state dict without the auxiliary
heads, its ``normalization``, ``classes``, ``input_size``), usable as ``backbone.weights=PATH`` by every
stage; ``metrics.json``; ``loss.png``.
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torchvision.models import GoogLeNet, googlenet

from rcnn import distributed
from rcnn.store import StageStore, atomic_write, torch_save
from rcnn.training import check_loss
from rcnn.viz import png

from .backbone import (
    NORMALIZATION_IMAGENET,
    WEIGHTS_FORMAT,
    amp_dtype,
    autocast,
    fold_batchnorm,
    precision_name,
    random_init,
    resolve_device,
)
from .pretrain_data import ClassificationTree, TrainCrops, scheme_crops, to_input

__all__ = ["pretrain_googlenet", "Pretrainer", "evaluate", "topk_correct", "lr_factor", "run_pretrain"]

log = logging.getLogger("features.pretrain")

FORMAT_VERSION = 2  # 2: dropout masks drawn for the whole batch (torchrun's ranks draw one process's masks)


class BatchDropout(nn.Module):
    """Inverted dropout whose mask is drawn for a whole batch and cut to the rows this process computes.

    Before a training forward, :meth:`Pretrainer.train_step` sets ``draw = (generator, rows, n)``: the mask
    is drawn for ``n`` rows from ``generator`` and rows ``rows`` (this rank's samples' places in the global
    batch) are applied, so every rank of a torchrun applies one process's masks. Without ``draw``: plain
    dropout."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p
        self.draw: tuple[torch.Generator, torch.Tensor, int] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not self.p:
            return x
        if self.draw is None:
            return F.dropout(x, self.p, True)
        generator, rows, n = self.draw
        keep = torch.rand((n, *x.shape[1:]), generator=generator)[rows] >= self.p
        return x * keep.to(x.device, x.dtype) / (1 - self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def pretrain_googlenet(num_classes: int, dropout: float = 0.4, dropout_aux: float = 0.7) -> GoogLeNet:
    """GoogLeNet with both auxiliary classifiers, randomly initialised (He-normal, a fixed seed); its three
    dropouts are :class:`BatchDropout`."""
    net = googlenet(weights=None, num_classes=num_classes, aux_logits=True, transform_input=False,
                    init_weights=False, dropout=dropout, dropout_aux=dropout_aux)  # fmt: skip
    net.dropout, net.aux1.dropout, net.aux2.dropout = BatchDropout(dropout), BatchDropout(dropout_aux), BatchDropout(dropout_aux)
    return random_init(net)


def training_loss(outputs, target: torch.Tensor, aux_weight: float, label_smoothing: float = 0.0, count: int | None = None):
    """``(total, main)``: the main classifier's cross-entropy plus ``aux_weight`` x each auxiliary one's,
    summed over the rows and divided by ``count`` (default: the rows; a rank passes the global batch's)."""
    count = len(target) if count is None else count

    def ce(logits):
        return F.cross_entropy(logits, target, label_smoothing=label_smoothing, reduction="sum") / count

    main = ce(outputs.logits)
    return main + aux_weight * (ce(outputs.aux_logits1) + ce(outputs.aux_logits2)), main


def topk_correct(probs: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> dict[int, int]:
    """How many rows of ``probs [N, C]`` have their label among their ``k`` highest scores, per k."""
    k_max = min(max(ks), probs.shape[1])
    hit = probs.topk(k_max, dim=1).indices == labels.view(-1, 1)
    return {k: int(hit[:, : min(k, k_max)].any(dim=1).sum()) for k in ks}


def lr_factor(schedule: str, step: int, total: int, steps_per_epoch: int, warmup: int, decay: float, decay_epochs: float) -> float:
    """The learning rate's multiplier at ``step`` (0-based) of ``total``.

    ``step``: the published schedule, x ``decay`` (0.96) every ``decay_epochs`` (8) epochs;
    ``cosine``: linear warm-up from 0 over ``warmup`` steps, then half a cosine to 0;
    ``onecycle``: linear warm-up from 1/25 over ``warmup`` steps, then half a cosine to 0.
    """
    if schedule == "step":
        return decay ** math.floor(step / steps_per_epoch / decay_epochs)
    if step < warmup:
        start = 0.0 if schedule == "cosine" else 1 / 25
        return start + (1 - start) * (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def _seed(*parts: int) -> int:
    """One 63-bit seed from several integers (a sample's, a step's)."""
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (int(p) & 0xFFFFFFFFFFFF)) * 1099511628211) % (1 << 63)
    return h


class _TrainSet(torch.utils.data.Dataset):
    """Item ``(epoch, position, index)`` -> ``(uint8 crop [3, S, S], label, row)``, or None for a bad image;
    ``row``: the sample's place in its batch.

    The sample's augmentation is seeded by ``(seed, epoch, position)``: the same crop in any process."""

    def __init__(self, tree: ClassificationTree, crops: TrainCrops, seed: int, batch_size: int):
        self.tree, self.crops, self.seed, self.batch_size = tree, crops, seed, batch_size

    def __len__(self) -> int:
        return len(self.tree)

    def __getitem__(self, item):
        epoch, position, index = item
        img = self.tree.decode(index)
        if img is None:
            return None
        s = _seed(self.seed, epoch, position)
        random.seed(s)
        torch.manual_seed(s)
        return self.crops(img), self.tree.samples[index].label, position % self.batch_size


def _collate(items):
    """``(uint8 [B, 3, S, S], labels [B], rows [B])`` of the readable samples (B may be 0)."""
    items = [x for x in items if x is not None]
    if not items:
        return torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long)
    return tuple(torch.stack([torch.as_tensor(x[k]) for x in items]) for k in range(3))


class Pretrainer:
    """One pretraining run: network, its average, optimiser, schedule, and where it stands."""

    def __init__(self, pc, tree: ClassificationTree, device: torch.device, seed: int = 0, workers: int = 0):
        self.pc, self.tree, self.device, self.seed = pc, tree, device, seed
        self.model = pretrain_googlenet(len(tree.classes), pc.dropout, pc.dropout_aux)
        self.model = distributed.sync_batchnorm(self.model, device).to(device).to(memory_format=torch.channels_last)
        self.dropouts = [m for m in self.model.modules() if isinstance(m, BatchDropout)]
        self.forward = distributed.data_parallel(self.model, device)
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            (no_decay if p.ndim <= 1 else decay).append(p)  # no weight decay on biases and BatchNorm
        self.opt = torch.optim.SGD(
            [{"params": decay, "weight_decay": pc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=pc.lr, momentum=pc.momentum, nesterov=pc.nesterov,
        )  # fmt: skip
        self.steps_per_epoch = max(len(tree) // pc.batch_size, 1)
        self.total_steps = self.steps_per_epoch * pc.epochs
        warmup = round(pc.warmup_epochs * self.steps_per_epoch)
        sched = getattr(pc.schedule, "value", pc.schedule)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt,
            lambda s: lr_factor(sched, s, self.total_steps, self.steps_per_epoch, warmup, pc.lr_decay, pc.lr_decay_epochs),
        )
        self.ema = None
        if pc.ema_decay:
            self.ema = AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(pc.ema_decay), use_buffers=False)
        self.amp = amp_dtype(pc.precision, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp == torch.float16)  # fp16 needs loss scaling
        self.crops = TrainCrops(pc.input_size, pc.crop_scale, pc.crop_ratio, pc.interpolations, pc.flip, pc.jitter)
        self.workers = workers
        self.step = 0  # optimiser steps done
        self.history: list[dict] = []  # one record per epoch
        self.seconds = 0.0  # training compute time, across resumes
        self.images_seen = 0

    @property
    def epoch(self) -> int:
        return self.step // self.steps_per_epoch

    def autocast(self):
        return autocast(self.amp, self.device)

    def _order(self, epoch: int) -> torch.Tensor:
        return torch.randperm(len(self.tree), generator=torch.Generator().manual_seed(_seed(self.seed, epoch, -1)))

    def loader(self, epoch: int, first_batch: int = 0):
        """The batches of ``epoch`` from ``first_batch`` on: ``(uint8 [B, 3, S, S], labels [B])``."""
        order = self._order(epoch).tolist()
        bs = self.pc.batch_size
        mine = distributed.part(bs)  # under torchrun: this rank's part of each batch
        batches = [[(epoch, b * bs + p, order[b * bs + p]) for p in range(bs)[mine]] for b in range(first_batch, self.steps_per_epoch)]
        return torch.utils.data.DataLoader(
            _TrainSet(self.tree, self.crops, self.seed, bs), batch_sampler=batches, collate_fn=_collate,
            num_workers=self.workers, multiprocessing_context="forkserver" if self.workers else None,
            persistent_workers=False, prefetch_factor=4 if self.workers else None,
        )  # fmt: skip

    def train_step(self, images: torch.Tensor, labels: torch.Tensor, rows: torch.Tensor | None = None) -> dict | None:
        """One SGD step on a batch (under torchrun: this rank's part of it; ``rows``: the samples' places in
        the global batch). Returns the batch's mean loss, main loss and accuracy, or None when no image of the
        batch could be read."""
        rows = torch.arange(len(labels)) if rows is None else rows
        count = distributed.total(len(labels))  # the batch's readable images, every rank's
        if not count:
            self.step += 1
            self.sched.step()
            return None
        for k, m in enumerate(self.dropouts):  # a function of the step alone, for the whole batch
            m.draw = (torch.Generator().manual_seed(_seed(self.seed, self.step, -2, k)), rows, self.pc.batch_size)
        self.model.train()
        x, y = to_input(images.to(self.device, non_blocking=True)), labels.to(self.device)
        with self.autocast():
            outputs = self.forward(x)
            # This rank's share of the batch's mean loss, times the ranks: DDP averages their gradients.
            loss, main = training_loss(outputs, y, self.pc.aux_weight, self.pc.label_smoothing, count)
            scaled = loss * distributed.world_size()
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(scaled).backward()
        self.scaler.step(self.opt)
        self.scaler.update()
        self.sched.step()
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        self.step += 1
        self.images_seen += count
        correct = (outputs.logits.argmax(1) == y).sum()
        total = distributed.all_sum(torch.stack([loss.detach().float(), main.detach().float(), correct.float()]).cpu())
        return {"loss": total[0].item(), "main": total[1].item(), "accuracy": total[2].item() / count}

    def final_model(self, bn_batches: int) -> GoogLeNet:
        """The averaged weights with BatchNorm statistics recomputed on ``bn_batches`` training batches
        (the raw weights when averaging is off)."""
        if self.ema is None:
            return self.model.eval()
        net = self.ema.module
        bns = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over the batches
        net.train()
        with torch.no_grad(), self.autocast():  # under torchrun: each rank its part of every batch
            for k, batch in enumerate(self.loader(self.pc.epochs)):  # an epoch beyond the last: fresh crops
                if k >= bn_batches:
                    break
                if distributed.total(len(batch[1])):
                    net(to_input(batch[0].to(self.device)))
        for m in bns:
            m.momentum = 0.1
        return net.eval()

    # -- checkpoints -------------------------------------------------------------------------------

    def save(self, path: Path) -> None:
        torch_save(path, {
            "model": self.model.state_dict(), "ema": self.ema.state_dict() if self.ema is not None else None,
            "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(), "step": self.step,
            "history": self.history, "seconds": self.seconds, "images_seen": self.images_seen,
            "bad_images": self.tree.bad,
        })  # fmt: skip

    def load(self, path: Path) -> None:
        ck = torch.load(path, map_location=self.device, weights_only=False)  # our own run folder's file
        self.model.load_state_dict(ck["model"])
        if self.ema is not None and ck["ema"] is not None:
            self.ema.load_state_dict(ck["ema"])
        self.opt.load_state_dict(ck["optimizer"])
        self.sched.load_state_dict(ck["scheduler"])
        self.step, self.history, self.seconds = ck["step"], ck["history"], ck["seconds"]
        self.images_seen = ck["images_seen"]
        self.tree.bad[:0] = [b for b in ck["bad_images"] if b not in self.tree.bad]


@torch.inference_mode()
def evaluate(model: nn.Module, tree: ClassificationTree, scheme: str, size: int, device, dtype=None,
             batch_crops: int = 256, limit: int | None = None, progress: bool = False) -> dict:  # fmt: skip
    """Top-1 and top-5 accuracy of ``scheme`` (softmax averaged over each image's crops) on ``tree``.

    ``limit``: the first ``limit`` images of a fixed shuffle of the tree (every class represented).
    Returns ``{"top1", "top5", "images", "seconds"}``; unreadable images are left out (and counted).
    """
    from tqdm import tqdm

    model.eval()
    indices = list(range(len(tree)))
    if limit is not None and limit < len(tree):
        indices = torch.randperm(len(tree), generator=torch.Generator().manual_seed(0))[:limit].sort().values.tolist()
    start = time.perf_counter()
    hits, n = {1: 0, 5: 0}, 0
    pending: list[tuple[torch.Tensor, int]] = []

    def flush():
        nonlocal n
        crops = torch.cat([c for c, _ in pending])
        with autocast(dtype, device):
            logits = torch.cat([model(to_input(crops[k : k + batch_crops].to(device))).float()
                                for k in range(0, len(crops), batch_crops)])  # fmt: skip
        probs = logits.softmax(1).cpu()
        counts = torch.tensor([len(c) for c, _ in pending])
        owner = torch.repeat_interleave(torch.arange(len(pending)), counts)
        mean = torch.zeros(len(pending), probs.shape[1]).index_add_(0, owner, probs) / counts[:, None]
        for k, v in topk_correct(mean, torch.tensor([label for _, label in pending])).items():
            hits[k] += v
        n += len(pending)
        pending.clear()

    for i in tqdm(indices, desc=f"test {scheme}", unit="img", disable=not progress, leave=False):
        img = tree.decode(i)
        if img is None:
            continue
        pending.append((scheme_crops(img, scheme, size), tree.samples[i].label))
        if sum(len(c) for c, _ in pending) >= batch_crops:
            flush()
    if pending:
        flush()
    return {"top1": hits[1] / max(n, 1), "top5": hits[5] / max(n, 1), "images": n,
            "seconds": round(time.perf_counter() - start, 2)}  # fmt: skip


# -- the stage -------------------------------------------------------------------------------------


def pretrain_root(pc) -> Path:
    """The tree of ``pretrain.data``: a preset's folder or the path itself."""
    from rcnn.config import PRETRAIN_PRESETS

    preset = PRETRAIN_PRESETS.get(pc.data)
    return Path(preset["root"] if preset else pc.data)


def _forward_flops(num_classes: int, size: int) -> float:
    """FLOPs of one inference forward pass at ``size``."""
    from .backbone import googlenet_gflop_per_crop

    net = googlenet(weights=None, num_classes=num_classes, aux_logits=False, init_weights=False).eval()
    return googlenet_gflop_per_crop(net, size) * 1e9


def _plot(history: list[dict], path: Path) -> None:
    with png(path, size=(7, 4)) as ax:
        ep = [h["epoch"] for h in history]
        ax.plot(ep, [h["loss"] for h in history], marker="o", ms=2, label="train loss (total)")
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss")
        acc = ax.twinx()
        pts = [(h["epoch"], h["top1_center"]) for h in history if h.get("top1_center") is not None]
        if pts:
            acc.plot(*zip(*pts), color="tab:green", marker="s", ms=3, label="val top-1 (centre crop)")
        acc.plot(ep, [h["train_accuracy"] for h in history], color="tab:orange", lw=1, label="train batch accuracy")
        acc.set_ylim(0, 1)
        acc.set_ylabel("accuracy")
        lines = ax.get_lines() + acc.get_lines()
        ax.legend(lines, [ln.get_label() for ln in lines], loc="center right", fontsize=8)
        ax.set_title("pretraining")


def pretrain_store(ctx) -> StageStore:
    from rcnn.config import to_dict

    pc = ctx.cfg.pretrain
    shaping = {k: v for k, v in to_dict(pc).items()
               if k not in ("checkpoint_every", "loader_workers", "cache_images", "eval_every", "test_schemes", "test_limit",
                            "test_size")}  # fmt: skip
    return StageStore(ctx.run_dir, "pretrain", {"pretrain": shaping, "root": str(pretrain_root(pc).resolve()), "seed": ctx.cfg.seed},
                      version=FORMAT_VERSION)  # fmt: skip


def run_pretrain(ctx) -> dict:
    """Train (or resume), test with each scheme, write ``<out>/pretrain/model.pt`` and its metrics."""
    pc = ctx.cfg.pretrain
    store = pretrain_store(ctx)
    model_path = store.dir / "model.pt"
    test_size = pc.test_size or pc.input_size
    if store.complete and model_path.exists():
        metrics = json.loads((store.dir / "metrics.json").read_text())
        if not _tested_as_asked(metrics, test_size, pc.test_schemes):
            log.info("the cached model was tested at %s px (%s), not at %d px (%s): testing it again",
                     metrics.get("test_size", metrics.get("input_size")), ", ".join(metrics.get("test_images", {})),
                     test_size, ", ".join(pc.test_schemes))  # fmt: skip
            return _build_pretrain(ctx, store, model_path, test_size)
        _publish(store, model_path)
        store.finish(metrics)
        print(f"pretrained model cached: {store.stage_dir / 'model.pt'} (top-1 {metrics['top1_center']:.3f}, centre crop)")
        return metrics
    return _build_pretrain(ctx, store, model_path, test_size)


def _tested_as_asked(metrics: dict, test_size: int, schemes: list) -> bool:
    """Whether a finished run's metrics hold the tests asked for now (their crop size, every scheme). The tests
    do not shape the weights, so they are not in the stage's key: other tests rerun on the cached model."""
    return metrics.get("test_size", metrics.get("input_size")) == test_size and set(schemes) <= set(metrics.get("test_images", {}))


def _build_pretrain(ctx, store, model_path: Path, test_size: int) -> dict:
    """Train (or resume from the key's checkpoint; a finished one only retests), test, write the model."""
    from tqdm import tqdm

    cfg, pc = ctx.cfg, ctx.cfg.pretrain
    ctx.building(store)
    root = pretrain_root(pc)
    train = ClassificationTree(root, "train")
    val = ClassificationTree(root, "val", classes=train.classes)
    device = resolve_device(cfg.device.value)
    trainer = Pretrainer(pc, train, device, cfg.seed, pc.loader_workers)
    lead = distributed.rank() == 0  # under torchrun rank 0 writes the checkpoints, tests and writes the model
    checkpoint = store.dir / "checkpoint.pt"
    if checkpoint.exists():
        trainer.load(checkpoint)
        if trainer.step < trainer.total_steps:
            log.info("resuming pretraining at step %d of %d (epoch %d)", trainer.step + 1, trainer.total_steps, trainer.epoch + 1)
        else:
            log.info("pretraining finished (%d steps): testing the model only", trainer.step)
    cache = pc.cache_images if pc.cache_images is not None else train.cached_bytes_estimate() * 1.5 < 6 * 2**30
    if cache and trainer.step < trainer.total_steps:  # a finished run only tests: val is read once
        train.cache(cfg.progress)
        val.cache(cfg.progress)
    distributed.barrier()  # every rank has read the checkpoint before rank 0 writes the next
    log.info("pretraining on %s: %d train / %d val images, %d classes, %d px, %s, %d epochs of %d steps",
             root, len(train), len(val), len(train.classes), pc.input_size, trainer.amp or "fp32", pc.epochs,
             trainer.steps_per_epoch)  # fmt: skip
    bar = tqdm(total=trainer.total_steps * pc.batch_size, initial=trainer.step * pc.batch_size, desc="pretrain",
               unit="img", unit_scale=True, disable=not cfg.progress or not lead, smoothing=0.05)  # fmt: skip
    last_save = trainer.step
    while trainer.step < trainer.total_steps:
        epoch, first = trainer.epoch, trainer.step % trainer.steps_per_epoch
        t0, sums, count = time.perf_counter(), np.zeros(3), 0
        for batch in trainer.loader(epoch, first):
            rec = trainer.train_step(*batch)
            if rec is not None:
                check_loss(rec["loss"], "pretraining", f"step {trainer.step}", "pretrain.lr", pc.lr, checkpoint)
                sums += (rec["loss"], rec["main"], rec["accuracy"])
                count += 1
                bar.update(pc.batch_size)
                bar.set_postfix(epoch=f"{epoch + 1}/{pc.epochs}", loss=f"{rec['loss']:.3f}")
            if trainer.step - last_save >= pc.checkpoint_every:
                trainer.seconds += time.perf_counter() - t0
                t0 = time.perf_counter()
                if lead:
                    trainer.save(checkpoint)
                last_save = trainer.step
        trainer.seconds += time.perf_counter() - t0
        record = {"epoch": epoch + 1, "loss": sums[0] / max(count, 1), "main_loss": sums[1] / max(count, 1),
                  "lr": trainer.sched.get_last_lr()[0], "seconds": round(trainer.seconds, 1)}  # fmt: skip
        record["train_accuracy"] = sums[2] / max(count, 1)  # batch accuracy, augmented crops, dropout on
        if lead and pc.eval_every and ((epoch + 1) % pc.eval_every == 0 or epoch + 1 == pc.epochs):
            r = evaluate(trainer.model, val, "center", test_size, device, trainer.amp)
            record.update(top1_center=r["top1"], top5_center=r["top5"], eval_seconds=r["seconds"])
            bar.write(f"epoch {epoch + 1}: loss {record['loss']:.3f}, val top-1 {r['top1']:.3f} (centre crop), "
                      f"{trainer.seconds / 60:.1f} min of training")  # fmt: skip
        trainer.history.append(record)
        if lead:
            trainer.save(checkpoint)
        last_save = trainer.step
    bar.close()

    t = time.perf_counter()
    final = trainer.final_model(pc.bn_batches)  # on every rank: its BatchNorm statistics are the whole batches'
    train.bad[:] = list(dict.fromkeys(b for bad in distributed.gather(train.bad) for b in bad))  # every rank's
    if not lead:
        distributed.barrier()  # rank 0 tests and writes the model
        return json.loads((store.dir / "metrics.json").read_text())
    folded = fold_batchnorm(final)  # the same outputs, faster
    results = {}
    for scheme in pc.test_schemes:
        limit = pc.test_limit if scheme == "144crop" else None
        results[scheme] = evaluate(folded, val, scheme, test_size, device, trainer.amp, limit=limit, progress=cfg.progress)
        r = results[scheme]
        print(f"val {scheme}: top-1 {r['top1']:.4f}, top-5 {r['top5']:.4f} ({r['images']} images, {r['seconds']:.0f} s)")
    if pc.test_limit and "144crop" in results and pc.test_limit < len(val):  # the centre crop on the same images
        results["center_144subset"] = evaluate(folded, val, "center", test_size, device, trainer.amp, limit=pc.test_limit)
    test_seconds = time.perf_counter() - t
    raw_center = evaluate(fold_batchnorm(trainer.model), val, "center", test_size, device, trainer.amp) if trainer.ema is not None else None

    state = {k: v.detach().cpu() for k, v in final.state_dict().items() if not k.startswith("aux")}
    torch_save(model_path, {
        "format": WEIGHTS_FORMAT, "backbone": state, "normalization": NORMALIZATION_IMAGENET,
        "classes": train.classes, "input_size": pc.input_size, "source": f"stage=pretrain on {root}",
    })  # fmt: skip
    _publish(store, model_path)
    trainer.save(checkpoint)
    _plot(trainer.history, store.dir / "loss.png")
    shutil.copyfile(store.dir / "loss.png", store.stage_dir / "loss.png")

    from rcnn.machine import gemm_rates

    gemm = gemm_rates()
    flops = _forward_flops(len(train.classes), pc.input_size)
    ips = trainer.images_seen / trainer.seconds if trainer.seconds else None
    eval_seconds = sum(h.get("eval_seconds", 0.0) for h in trainer.history)  # the per-epoch val tests
    precision = precision_name(trainer.amp)
    limit_ips = (gemm.get(precision) or gemm["fp32"]) * 1e9 / (3 * flops)  # training ~ 3x the forward pass
    metrics = {
        "stage": "pretrain",
        "key": store.key,
        "data": str(root),
        "classes": len(train.classes),
        "train_images": len(train),
        "val_images": len(val),
        "bad_images": len(train.bad) + len(val.bad),
        "bad_image_list": (train.bad + val.bad)[:100],
        "input_size": pc.input_size,
        "test_size": test_size,
        "epochs": trainer.epoch,
        "steps": trainer.step,
        "precision": precision,
        "averaged": trainer.ema is not None,
        **{f"top{k}_{s}": round(results[s][f"top{k}"], 4) for s in results for k in (1, 5)},
        "test_images": {s: results[s]["images"] for s in results},
        "top1_center_raw_weights": round(raw_center["top1"], 4) if raw_center else None,
        "images_per_second": round(ips, 1) if ips else None,
        "gemm_gflops": gemm,
        "forward_gflops_per_image": round(flops / 1e9, 3),
        "gemm_limit_fraction": round(ips / limit_ips, 3) if ips else None,
        "train_seconds": round(trainer.seconds, 1),
        "eval_seconds": round(eval_seconds, 1),
        "test_seconds": round(test_seconds, 1),
        "seconds": round(trainer.seconds + eval_seconds + test_seconds, 1),
        "history": trainer.history,
        "model": str(store.stage_dir / "model.pt"),
    }
    store.finish(metrics)
    distributed.barrier()  # the other ranks go on when the model is written
    if metrics["bad_images"]:
        print(f"{metrics['bad_images']} unreadable images were skipped (metrics.json: bad_image_list)")
    print(f"pretrained: {store.stage_dir / 'model.pt'} (use it with backbone.weights=PATH)")
    return metrics


def _publish(store: StageStore, model_path: Path) -> None:
    """``<out>/pretrain/model.pt``: a copy of this key's model (the stage's latest, as metrics.json)."""
    target = store.stage_dir / "model.pt"
    if not target.exists() or target.stat().st_size != model_path.stat().st_size or target.read_bytes() != model_path.read_bytes():
        data = model_path.read_bytes()
        atomic_write(target, lambda f: f.write(data))
