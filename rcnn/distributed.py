"""torchrun: several processes (one per GPU, or CPU slots) taking part in one run.

Under ``torchrun`` (``WORLD_SIZE`` > 1), :func:`init` joins the process group (``nccl`` on CUDA, ``gloo``
on CPU) and every rank runs the same stages, in the chain's order:

* the per-image stages (data checks, proposals, features, detect) do their rank's shard of the images
  (:mod:`rcnn.shard`) and wait for each other at the end of the stage, so every rank goes on with every
  entry;
* the training stages (pretraining, MultiBox, fine-tuning) are data-parallel (``DistributedDataParallel``):
  every rank draws the same global batch and computes its part of it, gradients are averaged, BatchNorm's
  statistics are the whole batch's (:func:`sync_batchnorm`), rank 0 writes the checkpoints and the model;
* the SVMs (one fit from every image's features) and the evaluation are built by rank 0 while the others
  wait, then read from its cache.

Without torchrun every function here is a no-op for a single process.
"""

from __future__ import annotations

import datetime
import os
from contextlib import contextmanager

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

__all__ = [
    "init", "active", "solo", "rank", "world_size", "barrier", "all_sum", "total", "gather", "close", "part", "data_parallel", "sync_batchnorm",
    "CpuSyncBatchNorm", "RANK0_STAGES", "TIMEOUT",
]  # fmt: skip

# Stages rank 0 builds alone under torchrun (the rest wait for it): the SVMs (not data-parallel) and the
# evaluation of the whole split.
RANK0_STAGES = ("svm", "eval", "analyze", "benchmark")

# How long a rank waits for the others (a stage rank 0 builds alone can take hours on a large dataset).
TIMEOUT = datetime.timedelta(hours=24)


def launched() -> tuple[int, int] | None:
    """``(rank, world size)`` when started by torchrun (or another launcher setting its variables) with
    more than one process, else None."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    return (int(os.environ["RANK"]), world) if world > 1 and "RANK" in os.environ else None


def init(device: str) -> bool:
    """Join torchrun's process group (once): ``nccl`` when ``device`` is CUDA, else ``gloo``; each rank
    takes the GPU of its ``LOCAL_RANK``. Returns whether this process is one of several."""
    if not launched():
        return False
    if not dist.is_initialized():
        cuda = torch.device(device).type == "cuda"
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT)
    return True


_solo = False  # inside a stage rank 0 builds alone


def active() -> bool:
    """This process is one of several ranks of an initialised process group, working together (not
    inside :func:`solo`)."""
    return not _solo and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def in_solo() -> bool:
    return _solo


@contextmanager
def solo():
    """A stage one rank runs alone: inside, this process behaves as a single process (every image of a
    per-image stage, no waiting for the others)."""
    global _solo
    before, _solo = _solo, True
    try:
        yield
    finally:
        _solo = before


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def barrier() -> None:
    """Wait for every rank (nothing without torchrun)."""
    if active():
        dist.barrier()


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over the ranks (``t`` itself in one process)."""
    if active():
        t = t.clone()
        dist.all_reduce(t)
    return t


def total(count: int) -> int:
    """``count`` summed over the ranks (itself in one process): a stage's work done by every rank."""
    return int(all_sum(torch.tensor([count], dtype=torch.float64)).item()) if active() else count


def gather(obj) -> list:
    """Every rank's ``obj`` (picklable), in rank order (``[obj]`` in one process)."""
    if not active():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def close() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def part(n: int) -> slice:
    """This rank's contiguous part of ``n`` rows of a global batch (all of them in one process), cut as
    ``np.array_split`` cuts."""
    bounds = np.cumsum([0] + [len(a) for a in np.array_split(np.arange(n), world_size())])
    return slice(int(bounds[rank()]), int(bounds[rank() + 1]))


# -- BatchNorm over the whole batch ------------------------------------------------------------------


class _SyncBatchNormFunction(torch.autograd.Function):
    """Batch normalisation of ``x [N, C, ...]`` with the statistics of every rank's rows (training mode).

    Forward: each rank's count, mean and sum of squared deviations, gathered and combined (Chan et al.'s
    pairwise formula, as exact as one process's two passes), then PyTorch's fused BatchNorm with those
    statistics. Backward: the two per-channel sums the input's gradient needs (of ``dy`` and of
    ``dy * xhat``, from PyTorch's fused BatchNorm backward), summed over the ranks; the input's gradient
    ``w / std * (dy - mean(dy) - xhat * mean(dy * xhat))`` in two fused passes. Each rank's weight and bias
    gradients are its rows' share; DistributedDataParallel averages them as it does every parameter's."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps: float):
        dims = [0, *range(2, x.dim())]
        xf = x.float()
        n = torch.tensor([xf.numel() / xf.shape[1]], dtype=torch.float64)
        var, mean = torch.var_mean(xf, dim=dims, correction=0) if n.item() else (xf.new_zeros(x.shape[1]),) * 2
        local = torch.cat([n, mean.double().cpu(), (var.double() * n).cpu()])  # count, mean, M2
        gathered = [torch.empty_like(local) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, local.to(_comm_device(x)))
        stats = torch.stack([g.cpu() for g in gathered])
        counts, means, m2s = stats[:, :1], stats[:, 1 : 1 + x.shape[1]], stats[:, 1 + x.shape[1] :]
        count = counts.sum()  # every rank's rows (times the spatial positions)
        g_mean = (counts * means).sum(0) / count
        g_m2 = (m2s + counts * (means - g_mean) ** 2).sum(0)
        mean_t, var_t = g_mean.float().to(x.device), (g_m2 / count).float().to(x.device)
        invstd = torch.rsqrt(var_t + eps)
        y = F.batch_norm(xf, mean_t, var_t, weight.float(), bias.float(), False, 0.0, eps) if n.item() else xf.clone()
        ctx.save_for_backward(xf, weight, mean_t, invstd)
        ctx.count, ctx.eps = float(count), eps
        mean_out, var_out = g_mean.float(), (g_m2 / max(float(count) - 1, 1.0)).float()  # for the running stats
        ctx.mark_non_differentiable(mean_out, var_out)
        return y.to(x.dtype), mean_out, var_out

    @staticmethod
    def backward(ctx, dy, _dmean, _dvar):
        xf, weight, mean, invstd = ctx.saved_tensors
        dyf = dy.float().contiguous(memory_format=_memory_format(xf))
        if xf.numel():  # this rank's sum(dy * xhat) and sum(dy): the weight's and the bias's gradients of its rows
            _, grad_weight, grad_bias = torch.ops.aten.native_batch_norm_backward(
                dyf, xf, weight.float(), None, None, mean, invstd, True, ctx.eps, [False, True, True]
            )  # fmt: skip
        else:  # no rows here (a batch part of unreadable images): it still takes part in the sums
            grad_weight, grad_bias = torch.zeros_like(mean), torch.zeros_like(mean)
        total_sums = torch.stack([grad_bias, grad_weight]).to(_comm_device(dy))
        dist.all_reduce(total_sums)
        mean_dy, mean_dy_xhat = (total_sums.to(dy.device) / ctx.count).unbind()
        # dx = k * dy - (k * mean_dy + k * mean_dy_xhat * xhat), k = w / std: the bracket is an affine map of
        # x per channel, which PyTorch's fused (eval-mode) BatchNorm computes in one pass.
        k = weight.float() * invstd
        slope = k * mean_dy_xhat * invstd  # per unit of x
        offset = k * mean_dy - slope * mean
        if not xf.numel():
            return dy.new_zeros(dy.shape), grad_weight.to(weight.dtype), grad_bias.to(weight.dtype), None
        affine = F.batch_norm(xf, torch.zeros_like(mean), torch.ones_like(mean), slope, offset, False, 0.0, 0.0)
        dx = affine.neg_().addcmul_(dyf, k.view([1, -1] + [1] * (dy.dim() - 2)))
        return dx.to(dy.dtype), grad_weight.to(weight.dtype), grad_bias.to(weight.dtype), None


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format


def _comm_device(x: torch.Tensor) -> torch.device:
    return x.device if dist.get_backend() == "nccl" else torch.device("cpu")


class CpuSyncBatchNorm(nn.BatchNorm2d):
    """``BatchNorm2d`` whose training-mode statistics are those of the whole batch across the ranks (gloo),
    where PyTorch's ``SyncBatchNorm`` runs on GPUs only. Outside a torchrun (or inside :func:`solo`) and in
    eval mode it is ``BatchNorm2d``; its state dict is BatchNorm2d's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and active()):
            return super().forward(x)
        y, mean, var = _SyncBatchNormFunction.apply(x, self.weight, self.bias, self.eps)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.mul_(1 - m).add_(mean.to(self.running_mean), alpha=m)
                self.running_var.mul_(1 - m).add_(var.to(self.running_var), alpha=m)
        return y


def data_parallel(module: nn.Module, device: torch.device) -> nn.Module:
    """``module`` wrapped in ``DistributedDataParallel`` under torchrun (on this rank's GPU, or on CPU);
    ``module`` itself in one process."""
    if not active():
        return module
    from torch.nn.parallel import DistributedDataParallel

    device = torch.device(device)
    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)


def sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """``module`` with every BatchNorm2d computing the whole batch's statistics across the ranks: PyTorch's
    ``SyncBatchNorm`` on CUDA, :class:`CpuSyncBatchNorm` elsewhere. Unchanged in one process."""
    if not active():
        return module
    if torch.device(device).type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            bn = CpuSyncBatchNorm(child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats)
            bn.load_state_dict(child.state_dict())
            bn.train(child.training)
            setattr(module, name, bn.to(child.weight.device if child.affine else "cpu"))
        else:
            sync_batchnorm(child, device)
    return module
